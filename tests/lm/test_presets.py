"""Presets: parameter counts against published figures; config validation errors name the field."""
import pytest

import lm
from lm import ModelConfig, presets

# Published parameter counts (LLaMA paper; BigScience model cards; GPT-2 small; GPT-3 paper).
PUBLISHED = {
    "llama-7b": 6.74e9,
    "llama-13b": 13.0e9,
    "bloom-7b1": 7.07e9,
    "bloom-560m": 559e6,
    "gpt2-124m": 124e6,
    "gpt3-175b": 175e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_count_params_matches_published(name):
    n = lm.count_params(presets.get(name))
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, f"{name}: {n:,} vs published {PUBLISHED[name]:,.0f}"


def test_every_preset_builds_and_tiny_presets_are_tiny():
    for name in presets.names():
        cfg = presets.get(name)
        assert isinstance(cfg, ModelConfig)
        if name.endswith("-tiny"):
            assert lm.count_params(cfg) < 1e6, name
    assert {n.split("-")[0] for n in presets.names() if n.endswith("-tiny")} >= {"llama", "bloom", "glm",
                                                                                  "baichuan", "gpt2"}


def test_unknown_preset_names_it():
    with pytest.raises(KeyError, match="llama-8b"):
        presets.get("llama-8b")


BASE = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=4, d_ff=32)


@pytest.mark.parametrize("changes, field", [
    (dict(norm="batchnorm"), "norm"),
    (dict(residual="postnorm"), "residual"),
    (dict(mlp="tanh"), "mlp"),
    (dict(position="sinusoidal"), "position"),
    (dict(mask="bidirectional"), "mask"),
    (dict(attention_impl="cuda"), "attention_impl"),
    (dict(remat="some"), "remat"),
    (dict(scan_unroll=-1), "scan_unroll"),
    (dict(dtype="int8"), "dtype"),
    (dict(d_model=0), "d_model"),
    (dict(n_layers=-1), "n_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=18), "d_model"),
    (dict(rope_fraction=1.5), "rope_fraction"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**BASE, **changes})


def test_replace_and_from_dict_reject_unknown_fields():
    cfg = ModelConfig(**BASE)
    assert cfg.replace(n_layers=3).n_layers == 3
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_layer"):
        cfg.replace(n_layer=3)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict({**cfg.to_dict(), "hidden_size": 16})
    with pytest.raises(ValueError, match="n_heads"):
        cfg.replace(n_heads=5)
