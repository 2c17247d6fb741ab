"""HF interop of the LLaMA-like families with newer features: Llama-3.x / linear / yarn RoPE scaling, Mistral
and Qwen2/Qwen3 sliding windows, Qwen3 q/k norms, Phi-3's fused projections and partial rotary.

Each tiny random `transformers` model is run on sequences longer than its window and than the original
context of its scaled RoPE; `lm.hf.load` must match its logits, `lm.hf.save` must give it back, the KV cache
must match the full forward, and config.json fields no importer implements must be refused.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tr

import lm
from hf_refs import V, check_greedy, hf_logits, hf_model, our_logits, random_params, tokens
from lm import hf, hf_arch
from lm.model import Transformer, init_cache

_NO_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _shape(cls, heads=4, kv=2, layers=2, **kw):
    return cls(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, max_position_embeddings=96, rms_norm_eps=1e-5, **_NO_IDS, **kw)


_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 24,
           "low_freq_factor": 0.5, "high_freq_factor": 3.0}  # head_dim 16: wavelengths kept, ramped and scaled
_YARN = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16,
         "beta_fast": 8.0, "beta_slow": 0.5}

# name -> (architecture, config, sequence length): windows of 8 seen over 24 tokens, scaled RoPE with an original
# context of 16-24 over 40.
CASES = {
    "llama3_scaled": ("LlamaForCausalLM", lambda: _shape(tr.LlamaConfig, head_dim=16, rope_parameters=_LLAMA3), 40),
    "llama_linear": ("LlamaForCausalLM", lambda: _shape(
        tr.LlamaConfig, kv=4, tie_word_embeddings=True, attention_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), 24),
    "llama_yarn": ("LlamaForCausalLM", lambda: _shape(tr.LlamaConfig, kv=1, layers=3, rope_parameters=_YARN), 40),
    "llama_head_dim": ("LlamaForCausalLM", lambda: _shape(tr.LlamaConfig, heads=8, kv=4, head_dim=12), 24),
    "mistral_window": ("MistralForCausalLM", lambda: _shape(tr.MistralConfig, sliding_window=8), 24),
    "mistral_no_window": ("MistralForCausalLM", lambda: _shape(tr.MistralConfig, kv=1, head_dim=16, sliding_window=None,
                                                               tie_word_embeddings=True), 24),
    "qwen2_window_1_of_3": ("Qwen2ForCausalLM", lambda: _shape(tr.Qwen2Config, layers=3, use_sliding_window=True,
                                                               sliding_window=8, max_window_layers=1), 24),
    "qwen2_window_all": ("Qwen2ForCausalLM", lambda: _shape(tr.Qwen2Config, kv=4, use_sliding_window=True,
                                                            sliding_window=8, max_window_layers=0), 24),
    "qwen2_yarn_no_window": ("Qwen2ForCausalLM", lambda: _shape(
        tr.Qwen2Config, heads=2, kv=1, tie_word_embeddings=True, use_sliding_window=False, sliding_window=8,
        rope_parameters=dict(_YARN, attention_factor=1.2, truncate=False)), 40),
    "qwen3_bias": ("Qwen3ForCausalLM", lambda: _shape(tr.Qwen3Config, heads=3, kv=1, head_dim=8, attention_bias=True),
                   24),
    "qwen3_window": ("Qwen3ForCausalLM", lambda: _shape(tr.Qwen3Config, head_dim=16, tie_word_embeddings=True,
                                                        use_sliding_window=True, sliding_window=8, max_window_layers=1),
                     24),
    "phi3_window": ("Phi3ForCausalLM", lambda: _shape(tr.Phi3Config, sliding_window=8, partial_rotary_factor=0.5), 24),
    "phi3_mha": ("Phi3ForCausalLM", lambda: _shape(tr.Phi3Config, kv=4, head_dim=16, tie_word_embeddings=True), 24),
}


def _as_loaded(cfg):
    """`cfg` as `hf.load` returns it: how the layer stack compiles is not part of a Hugging Face checkpoint."""
    return dataclasses.replace(cfg, scan_unroll=lm.ModelConfig.scan_unroll)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_load_and_save(name, tmp_path):
    arch, config, length = CASES[name]
    model = hf_model(config())
    assert type(model).__name__ == arch
    toks = tokens(length=length)
    ref = hf_logits(model, toks)
    assert np.abs(ref).max() > 1.0  # random enough that layout mistakes show up in the logits
    model.save_pretrained(tmp_path / "hf")

    cfg, params = hf.load(tmp_path / "hf")
    err = np.abs(our_logits(cfg, params, toks) - ref).max()
    print(f"{name}: max |logit error| vs transformers {err:.2e}")
    assert err < 1e-4

    hf.save(cfg, params, tmp_path / "ours", architecture=arch)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [arch]
    back = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == arch
    np.testing.assert_allclose(hf_logits(back, toks), ref, atol=1e-5, rtol=0)
    assert hf.load(tmp_path / "ours")[0] == cfg


def _fields(name):
    arch, config, _ = CASES[name]
    return hf_arch.get(arch).from_hf(config().to_dict())


def test_config_fields_mapped():
    llama3, yarn = _fields("llama3_scaled"), _fields("qwen2_yarn_no_window")
    assert (llama3["rope_scaling"], llama3["rope_original_max_len"], llama3["rope_low_freq_factor"],
            llama3["head_dim"]) == ("llama3", 24, 0.5, 16)
    assert (yarn["rope_scaling"], yarn["rope_attention_factor"], yarn["rope_truncate"]) == ("yarn", 1.2, False)
    assert "sliding_window" not in yarn and yarn["qkv_bias"] and not yarn.get("out_bias")
    assert _fields("mistral_window")["sliding_window"] == 8 and _fields("mistral_no_window")["sliding_window"] is None
    assert (_fields("qwen2_window_1_of_3")["window_pattern"], _fields("qwen2_window_all")["window_pattern"]) == ("GLL",
                                                                                                               "L")
    qwen3 = _fields("qwen3_bias")
    assert qwen3["qk_norm"] and qwen3["qkv_bias"] and qwen3["out_bias"] and qwen3["n_kv_heads"] == 1
    phi3 = _fields("phi3_window")  # window on every layer: the default pattern
    assert (phi3["rope_fraction"], phi3["sliding_window"], phi3["n_kv_heads"]) == (0.5, 8, 2)
    assert "window_pattern" not in phi3


@pytest.mark.parametrize("cls", [tr.LlamaConfig, tr.MistralConfig, tr.Qwen2Config, tr.Qwen3Config, tr.Phi3Config])
def test_every_key_of_the_config_class_is_read(cls):
    arch = {tr.LlamaConfig: "LlamaForCausalLM", tr.MistralConfig: "MistralForCausalLM", tr.Qwen2Config:
            "Qwen2ForCausalLM", tr.Qwen3Config: "Qwen3ForCausalLM", tr.Phi3Config: "Phi3ForCausalLM"}[cls]
    windowed = [cls(use_sliding_window=True)] if cls in (tr.Qwen2Config, tr.Qwen3Config) else []
    for config in [cls()] + windowed:
        d = hf_arch.HFConfig(dict(config.to_dict(), architectures=[arch]))
        lm.ModelConfig(**hf_arch.get(arch).from_hf(d))
        hf_arch.check_consumed(d, arch)


def test_class_defaults_for_absent_keys():
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=32)
    mistral = hf_arch.get("MistralForCausalLM").from_hf(base)
    assert (mistral["n_kv_heads"], mistral["sliding_window"], mistral["max_len"]) == (8, 4096, 131072)
    qwen3 = hf_arch.get("Qwen3ForCausalLM").from_hf(dict(base, use_sliding_window=True, max_window_layers=2))
    assert (qwen3["head_dim"], qwen3["n_kv_heads"], qwen3["sliding_window"], qwen3["window_pattern"]) == (128, None,
                                                                                                         4096, "GGLL")
    assert hf_arch.get("Phi3ForCausalLM").from_hf(base)["norm_eps"] == 1e-5


@pytest.mark.parametrize("name", ["mistral_window", "llama3_scaled"])
def test_greedy_generate_matches_hf_past_window_and_original_context(name, tmp_path):
    prompts = [[5, 17, 3], [9, 1, 60, 22, 7, 44, 80, 12, 33, 2], [31]]
    # Up to 30 tokens: past the window (8) and the original context (24).
    check_greedy(hf_model(CASES[name][1](), seed=4, std=0.3), tmp_path, prompts, 20)


@pytest.mark.parametrize("name", ["mistral_window", "qwen3_window", "llama3_scaled", "phi3_window"])
def test_kv_cache_decode_matches_full_forward(name):
    cfg = lm.ModelConfig(**_fields(name))
    length, prefill = CASES[name][2], 5
    model = Transformer(cfg)

    @jax.jit
    def full_and_cached(params, toks):  # [B, T, V] twice: one forward; a prefill, then one token at a time
        variables = {"params": params}
        logits, cache = model.apply(variables, toks[:, :prefill], cache=init_cache(cfg, 2, length))

        def step(cache, t):
            token = jax.lax.dynamic_slice_in_dim(toks, t, 1, axis=1)
            out, cache = model.apply(variables, token, cache=cache, decode_index=jnp.full((2,), t))
            return cache, out[:, 0]

        _, decoded = jax.lax.scan(step, cache, jnp.arange(prefill, length))
        return model.apply(variables, toks), jnp.concatenate([logits, decoded.transpose(1, 0, 2)], axis=1)

    full, cached = full_and_cached(random_params(cfg, 3), tokens(3, length))
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)


def test_bfloat16_checkpoint(tmp_path):
    hf_model(CASES["qwen3_window"][1]()).to(torch.bfloat16).save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert cfg.param_dtype == "bfloat16" and params["layers"]["attn"]["q_norm"]["scale"].dtype == jnp.bfloat16
    cfg32, params32 = hf.load(tmp_path, dtype=jnp.float32)
    toks = tokens(5, 24)
    # The bf16 weights computed in f32 (`.float()` of the bf16 model would keep RoPE's inv_freq rounded to bf16).
    model = tr.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ref = hf_logits(model.eval(), toks)
    np.testing.assert_allclose(our_logits(cfg32, params32, toks), ref, atol=1e-4, rtol=0)


def _write_config(path, config, **changes):
    """config.json of `config` (a transformers config object or dict) with keys changed (None removes one)."""
    d = config if isinstance(config, dict) else config.to_dict()
    d = {k: v for k, v in {**d, **changes}.items() if v is not None or k not in changes}
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(d))
    return path


def test_refuses_what_the_importer_does_not_implement(tmp_path):
    mistral = dict(CASES["mistral_window"][1]().to_dict(), architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="LlamaForCausalLM importer: sliding_window=8"):
        hf.load(_write_config(tmp_path / "a", mistral))
    llama = dict(CASES["llama_head_dim"][1]().to_dict(), architectures=["LlamaForCausalLM"])
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="'dynamic'"):
        hf.load(_write_config(tmp_path / "b", llama, rope_parameters=None, rope_scaling=dynamic))
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        hf.load(_write_config(tmp_path / "c", llama, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                      "partial_rotary_factor": 0.5}))
    phi3 = dict(CASES["phi3_window"][1]().to_dict(), architectures=["Phi3ForCausalLM"])
    for kind in ("longrope", "su", "yarn"):
        rp = dict(phi3["rope_parameters"], rope_type=kind, short_factor=[1.0] * 2, long_factor=[2.0] * 2)
        with pytest.raises(ValueError, match=f"rope_type='{kind}'.*longrope"):
            hf.load(_write_config(tmp_path / kind, phi3, rope_parameters=rp))
    qwen2 = dict(CASES["qwen2_window_1_of_3"][1]().to_dict(), architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ValueError, match="sliding layers but there is no window"):
        hf.load(_write_config(tmp_path / "d", qwen2, use_sliding_window=False))
    with pytest.raises(ValueError, match="layer_types="):
        hf.load(_write_config(tmp_path / "e", mistral, architectures=["MistralForCausalLM"],
                              layer_types=["sliding_attention", "full_attention"]))


@pytest.mark.parametrize("name", ["llama3_scaled", "mistral_window", "qwen2_window_1_of_3", "qwen3_bias",
                                  "phi3_window"])
@pytest.mark.parametrize("extra", [{"foo_bar": 3}, {"quantization_config": {"quant_method": "gptq", "bits": 4}}])
def test_refuses_unknown_keys(name, extra, tmp_path):
    arch, config, _ = CASES[name]
    _write_config(tmp_path, dict(config().to_dict(), architectures=[arch], **extra))
    with pytest.raises(ValueError, match=f"{arch} importer: {next(iter(extra))}="):
        hf.load(tmp_path)


@pytest.mark.parametrize("preset,arch", [("llama3-tiny", "LlamaForCausalLM"), ("mistral-tiny", "MistralForCausalLM"),
                                         ("qwen2-tiny", "Qwen2ForCausalLM"), ("qwen3-tiny", "Qwen3ForCausalLM"),
                                         ("phi3-tiny", "LlamaForCausalLM")])
def test_presets_round_trip_as_their_family(preset, arch, tmp_path):
    cfg = lm.presets.get(preset)
    assert hf_arch.default_for(cfg) == arch
    params = random_params(cfg)
    hf.save(cfg, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    cfg2, params2 = hf.load(tmp_path)
    assert cfg2 == _as_loaded(cfg)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_default_architecture_of_loaded_configs():
    for name, (arch, _, _) in CASES.items():
        if name not in ("mistral_no_window", "phi3_mha"):  # a LLaMA without a window or partial rotary
            assert hf_arch.default_for(lm.ModelConfig(**_fields(name))) == arch, name
    cfg = lm.presets.get("qwen2-tiny", sliding_window=8, window_pattern="LG")
    assert hf_arch.default_for(cfg) == "Qwen2ForCausalLM"  # any pattern, through layer_types
    assert hf_arch.default_for(lm.presets.get("phi3-tiny", rope_fraction=0.5, sliding_window=8)) == "Phi3ForCausalLM"


def test_save_refuses_what_the_architecture_cannot_express(tmp_path):
    cfg = lm.presets.get("mistral-tiny", n_layers=4, window_pattern="LG")
    with pytest.raises(ValueError, match="MistralForCausalLM: window_pattern='LGLG' .*'LLLL'"):
        hf.save(cfg, {}, tmp_path)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM: .*qkv_bias=False"):
        hf.save(lm.presets.get("llama-tiny"), {}, tmp_path, architecture="Qwen2ForCausalLM")
    with pytest.raises(ValueError, match="Qwen3ForCausalLM: .*qk_norm=False"):
        hf.save(lm.presets.get("llama-tiny"), {}, tmp_path, architecture="Qwen3ForCausalLM")
    with pytest.raises(ValueError, match="rope_type='llama3'.*Phi-3"):
        hf.save(lm.presets.get("llama3-tiny"), {}, tmp_path, architecture="Phi3ForCausalLM")
    with pytest.raises(ValueError, match="LlamaForCausalLM: .*sliding_window=16"):
        hf.save(lm.presets.get("mistral-tiny"), {}, tmp_path, architecture="LlamaForCausalLM")
