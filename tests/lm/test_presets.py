"""Presets: parameter counts against published figures; config validation errors name the field."""
import pytest

import lm
from lm import ModelConfig, presets

# Published parameter counts (LLaMA and Llama 2 papers; BigScience model cards; GPT-2 small; GPT-3 paper; the model cards of
# Llama 3 / 3.2, Qwen2.5, Qwen3, Mistral, Gemma 2, Phi-3, Pythia and ChatGLM2).
PUBLISHED = {
    "llama3-8b": 8.03e9,
    "llama3.2-1b": 1.24e9,
    "qwen2.5-7b": 7.62e9,
    "qwen3-8b": 8.19e9,
    "mistral-7b": 7.24e9,
    "gemma2-9b": 9.24e9,
    "gemma3-1b": 999_885_952,
    "phi3-mini": 3.82e9,
    "pythia-1.4b": 1.41e9,
    "chatglm2-6b": 6.24e9,
    "llama-7b": 6.74e9,
    "llama-13b": 13.0e9,
    "llama2-70b": 68.98e9,
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
    assert {n.split("-")[0] for n in presets.names() if n.endswith("-tiny")} >= {
        "llama", "bloom", "glm", "baichuan", "gpt2", "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "neox",
        "opt", "chatglm2"}


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
    (dict(rope_scaling="dynamic"), "rope_scaling"),
    (dict(rope_scaling="llama3", rope_factor=8.0), "rope_original_max_len"),
    (dict(rope_scaling="linear", rope_factor=0.5), "rope_factor"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=8, mask="prefix"), "sliding_window"),
    (dict(sliding_window=8, window_pattern="LX"), "window_pattern"),
    (dict(attn_softcap=-1.0), "attn_softcap"),
    (dict(pos_offset=2), "pos_offset"),
    (dict(residual="parallel", post_norms=True), "post_norms"),
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
