"""HF interop for Gemma2, Gemma3 (text), GPT-NeoX, OPT and ChatGLM2/3: `lm.hf.load` matches tiny random
`transformers` models, `lm.hf.save` writes directories `transformers` loads back (ChatGLM2, remote code, through
our own loader), greedy decoding and the KV cache agree, and configs we do not implement are refused by name."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from safetensors import safe_open

import hf_refs
import lm
from hf_refs import V, check_greedy, hf_logits, our_logits, random_params, tokens
from lm import hf, hf_arch

_NO_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _gemma2(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=12,
                sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **_NO_IDS)
    return tr.Gemma2Config(**dict(base, **kw))


def _neox(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, **_NO_IDS)
    return tr.GPTNeoXConfig(**dict(base, **kw))


def _opt(**kw):
    base = dict(vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32, **_NO_IDS)
    return tr.OPTConfig(**dict(base, **kw))


HF_CONFIGS = {
    # GQA 4:2, heads wider than d_model / n_heads, window 8 < T = 24, soft-caps small enough to bind, "LG" layers.
    "gemma2_gqa": _gemma2,
    # Three query heads sharing one K/V head, untied head, attention biases, no soft-caps, a global first layer.
    "gemma2_mqa": lambda: _gemma2(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                                  head_dim=8, attention_bias=True, tie_word_embeddings=False,
                                  attn_logit_softcapping=None, final_logit_softcapping=None,
                                  layer_types=["full_attention", "sliding_attention"],
                                  rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # Gemma3: q/k norms, two local layers per global one, local base 1e4 and global 1e6 (they differ at T = 24).
    "gemma3_local_base": lambda: tr.Gemma3TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}}, **_NO_IDS),
    # Pythia: parallel residual, a quarter of each head rotated, three heads.
    "neox_parallel": lambda: _neox(hidden_size=24, num_attention_heads=3, use_parallel_residual=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.25}),
    # Sequential residual, half of each head rotated, tanh GELU, tied head, no attention biases.
    "neox_serial": lambda: _neox(use_parallel_residual=False, hidden_act="gelu_new", tie_word_embeddings=True,
                                 attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                                        "partial_rotary_factor": 0.5}),
    "opt": _opt,
    "opt_untied_odd": lambda: _opt(hidden_size=24, word_embed_proj_dim=24, num_attention_heads=3,
                                   tie_word_embeddings=False, enable_bias=False),
}
ARCH = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "neox": "GPTNeoXForCausalLM",
        "opt": "OPTForCausalLM"}
LENGTH = 24  # past the Gemma2 window


def hf_model(name, seed=0, std=0.15):
    return hf_refs.hf_model(HF_CONFIGS[name](), seed, std)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_parity_load_and_save(name, tmp_path):
    arch = ARCH[name.split("_")[0]]
    model = hf_model(name)
    toks = tokens(length=LENGTH)
    ref = hf_logits(model, toks)
    assert np.abs(ref).max() > 1.0  # random enough that layout mistakes show up in the logits
    model.save_pretrained(tmp_path / "hf")

    cfg, params = hf.load(tmp_path / "hf")
    np.testing.assert_allclose(our_logits(cfg, params, toks), ref, atol=1e-4, rtol=0)
    assert hf_arch.default_for(cfg) == arch

    hf.save(cfg, params, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [arch]
    back = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == arch
    np.testing.assert_allclose(hf_logits(back, toks), ref, atol=1e-5, rtol=0)


def test_config_fields_mapped():
    def fields(name):
        return hf_arch.get(ARCH[name.split("_")[0]]).from_hf(HF_CONFIGS[name]().to_dict())

    g = fields("gemma2_gqa")
    assert (g["sliding_window"], g["window_pattern"], g["attn_softcap"], g["final_softcap"]) == (8, "LG", 5.0, 3.0)
    assert (g["norm_scale_offset"], g["post_norms"], g["embed_scale"], g["head_dim"]) == (1.0, True, True, 16)
    assert g["query_pre_attn_scalar"] == 12.0 and g["mlp"] == "geglu" and g["gelu_approximate"]
    g = fields("gemma2_mqa")
    assert (g["window_pattern"], g["attn_softcap"], g["n_kv_heads"], g["tie_embeddings"]) == ("GL", None, 1, False)
    g = fields("gemma3_local_base")
    assert (g["window_pattern"], g["qk_norm"], g["rope_theta"], g["local_rope_theta"]) == ("LLG", True, 1e6, 1e4)
    assert (g["attn_softcap"], g["final_softcap"]) == (None, None)
    n = fields("neox_parallel")
    assert (n["residual"], n["rope_fraction"], n["gelu_approximate"], n["tie_embeddings"]) == ("parallel", 0.25,
                                                                                               False, False)
    n = fields("neox_serial")
    assert (n["residual"], n["rope_fraction"], n["rope_theta"], n["qkv_bias"]) == ("prenorm", 0.5, 500.0, False)
    o = fields("opt")
    assert (o["mlp"], o["position"], o["pos_offset"], o["tie_embeddings"]) == ("relu", "learned", 2, True)


def test_neox_config_before_transformers_5():
    """Pythia's own config.json names the rotary fraction and base rotary_pct / rotary_emb_base."""
    config = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": 50304,
              "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 8192,
              "hidden_act": "gelu", "layer_norm_eps": 1e-5, "max_position_embeddings": 2048, "rotary_pct": 0.25,
              "rotary_emb_base": 10000, "use_parallel_residual": True, "tie_word_embeddings": False,
              "initializer_range": 0.02, "use_cache": True, "bos_token_id": 0, "eos_token_id": 0,
              "torch_dtype": "float16", "transformers_version": "4.24.0"}
    hf_config = hf_arch.HFConfig(config)
    fields = hf_arch.get("GPTNeoXForCausalLM").from_hf(hf_config)
    hf_arch.check_consumed(hf_config, "GPTNeoXForCausalLM")
    assert lm.ModelConfig(**fields) == lm.presets.get("pythia-1.4b")


def test_gemma3_config_before_transformers_5():
    """gemma-3-1b's config.json: global base rope_theta, local rope_local_base_freq, sliding_window_pattern."""
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
              "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
              "cache_implementation": "hybrid", "eos_token_id": [1, 106], "final_logit_softcapping": None,
              "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
              "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
              "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
              "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
              "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
              "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
              "vocab_size": 262144}
    hf_config = hf_arch.HFConfig(config)
    cfg = lm.ModelConfig(**hf_arch.get("Gemma3ForCausalLM").from_hf(hf_config))
    hf_arch.check_consumed(hf_config, "Gemma3ForCausalLM")
    assert cfg.layer_windows() == tuple(lm.config.GLOBAL_WINDOW if (i + 1) % 6 == 0 else 512 for i in range(26))
    assert (cfg.rope_theta, cfg.local_rope_theta, cfg.n_kv_heads, cfg.head_dim) == (1e6, 1e4, 1, 256)
    assert (cfg.qk_norm, cfg.attn_softcap, cfg.final_softcap, cfg.tie_embeddings) == (True, None, None, True)
    assert lm.model.count_params(cfg) == 999_885_952  # gemma-3-1b


def test_gemma2_preset_save_matches_transformers(tmp_path):
    """Our Gemma2 preset (query_pre_attn_scalar unlike head_dim, window 16 < T) as transformers runs it."""
    cfg = lm.presets.get("gemma2-tiny", vocab_size=V, max_len=64)
    params = random_params(cfg, seed=3)
    toks = tokens(3, length=LENGTH)
    hf.save(cfg, params, tmp_path)
    model = tr.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == hf_arch.default_for(cfg)
    np.testing.assert_allclose(our_logits(cfg, params, toks), hf_logits(model, toks), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gemma2_gqa", "neox_parallel", "opt"])
def test_greedy_generate_matches_hf(name, tmp_path):
    # 6 + 12 positions: past Gemma2's window of 8.
    check_greedy(hf_model(name, seed=4, std=0.3), tmp_path, [[5, 17, 3, 9, 1, 60], [31]], 12)


def test_gemma2_kv_cache_decode_matches_full_forward(tmp_path):
    """Prefill then one token at a time (local layers' window, soft-caps, post-norms) vs one full forward."""
    hf_model("gemma2_gqa", seed=5).save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    toks = jnp.asarray(tokens(5, length=LENGTH))
    full = our_logits(cfg, params, toks)
    model = lm.Transformer(cfg)
    prefill = 5
    logits, cache = jax.jit(model.apply)({"params": params}, toks[:, :prefill],
                                         cache=lm.model.init_cache(cfg, toks.shape[0], LENGTH))
    np.testing.assert_allclose(logits, full[:, :prefill], atol=1e-5, rtol=0)
    step = jax.jit(lambda tok, cache, index: model.apply({"params": params}, tok, cache=cache, decode_index=index))
    for t in range(prefill, LENGTH):
        logits, cache = step(toks[:, t:t + 1], cache, jnp.full((toks.shape[0],), t, jnp.int32))
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0, err_msg=f"position {t}")


# --- ChatGLM2/3-6B: transformers' Glm (GLM-4) computes the same function --------------------------------

def _glm(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, **_NO_IDS)
    return tr.GlmConfig(**dict(base, **kw))


def _v2_names(n_layers: int) -> set:
    p = "transformer.encoder.layers.{i}."
    per_layer = ["input_layernorm.weight", "self_attention.query_key_value.weight",
                 "self_attention.query_key_value.bias", "self_attention.dense.weight",
                 "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"]
    return {"transformer.embedding.word_embeddings.weight", "transformer.encoder.final_layernorm.weight",
            "transformer.output_layer.weight"} | {(p + n).format(i=i) for i in range(n_layers) for n in per_layer}


@pytest.mark.parametrize("glm_kw", [
    {},  # ChatGLM2-6B's shape: 2 K/V groups
    # Three heads in one group with heads wider than d_model / n_heads, ChatGLM3-32k-style rope_ratio.
    dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
         rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5}),
], ids=["groups2", "mqa_ratio50"])
def test_chatglm2_layout_round_trip(glm_kw, tmp_path):
    model = hf_refs.hf_model(_glm(**glm_kw))
    toks = tokens(6, length=LENGTH)
    ref = hf_logits(model, toks)
    model.save_pretrained(tmp_path / "glm")
    cfg, params = hf.load(tmp_path / "glm")

    hf.save(cfg, params, tmp_path / "chatglm2", architecture="ChatGLMModel")
    config = json.loads((tmp_path / "chatglm2" / "config.json").read_text())
    c = model.config
    assert config["architectures"] == ["ChatGLMModel"] and config["model_type"] == "chatglm"
    assert (config["padded_vocab_size"], config["num_layers"], config["ffn_hidden_size"], config["kv_channels"],
            config["multi_query_group_num"], config["seq_length"]) == (
        V, c.num_hidden_layers, c.intermediate_size, c.head_dim, c.num_key_value_heads, c.max_position_embeddings)
    assert config["multi_query_attention"] and config["add_qkv_bias"] and not config["add_bias_linear"]
    assert config["rope_ratio"] == c.rope_parameters["rope_theta"] / 10000.0
    with safe_open(tmp_path / "chatglm2" / hf.WEIGHTS, framework="numpy") as f:
        assert set(f.keys()) == _v2_names(c.num_hidden_layers)

    cfg2, params2 = hf.load(tmp_path / "chatglm2")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    np.testing.assert_allclose(our_logits(cfg2, params2, toks), ref, atol=1e-4, rtol=0)


def test_chatglm2_fused_layouts_follow_the_reference_code():
    """query_key_value and dense_h_to_4h read as ChatGLM2's modeling_chatglm.py splits them."""
    cfg = lm.presets.get("chatglm2-tiny", n_heads=3, n_kv_heads=1, head_dim=4, d_model=8, d_ff=5)
    h, g, d, e = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
    maps = {m.hf.split(".{i}.")[-1]: m for m in hf_arch.get("ChatGLMModel").tensors(cfg)}
    rng = np.random.RandomState(0)
    x = rng.normal(size=(2, e))

    weight, bias = rng.normal(size=((h + 2 * g) * d, e)), rng.normal(size=((h + 2 * g) * d,))
    # The reference: mixed = x W^T + b; split [H*D, G*D, G*D]; view each as [heads, D].
    mixed = x @ weight.T + bias
    ref = [t.reshape(2, -1, d) for t in np.split(mixed, [h * d, (h + g) * d], axis=-1)]
    kernels = maps["self_attention.query_key_value.weight"].from_hf(weight, [(e, h, d), (e, g, d), (e, g, d)])
    biases = maps["self_attention.query_key_value.bias"].from_hf(bias, [(h, d), (g, d), (g, d)])
    for r, k, b in zip(ref, kernels, biases):
        np.testing.assert_allclose(np.einsum("be,ehd->bhd", x, k) + b, r, atol=1e-12)
    np.testing.assert_array_equal(maps["self_attention.query_key_value.weight"].to_hf(kernels), weight)

    # dense_h_to_4h: [gate; up], and the reference's swiglu is silu(first half) * second half.
    w = rng.normal(size=(2 * cfg.d_ff, e))
    first, second = np.split(x @ w.T, 2, axis=-1)
    wg, wi = maps["mlp.dense_h_to_4h.weight"].from_hf(w, [(e, cfg.d_ff), (e, cfg.d_ff)])
    silu = jax.nn.silu
    np.testing.assert_allclose(silu(x @ wg) * (x @ wi), silu(first) * second, atol=1e-6)


def test_chatglm2_is_written_only_when_asked(tmp_path):
    cfg = lm.presets.get("chatglm2-tiny")
    assert hf_arch.default_for(cfg) == "GlmForCausalLM"
    assert hf_arch.default_for(lm.presets.get("glm-tiny")) == "ChatGLMForConditionalGeneration"
    with pytest.raises(ValueError, match="ChatGLMModel.*tie_embeddings=True"):
        hf.save(cfg.replace(tie_embeddings=True), random_params(cfg.replace(tie_embeddings=True)), tmp_path,
                architecture="ChatGLMModel")


# --- Refusals name the field ------------------------------------------------------------------------------

def _write_config(path, config: dict, arch: str):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(config, architectures=[arch])))
    return path


def test_refusals_name_the_field(tmp_path):
    gemma = _write_config(tmp_path / "gemma", _gemma2(use_bidirectional_attention=True).to_dict(),
                          "Gemma2ForCausalLM")
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        hf.load(gemma)
    opt = _write_config(tmp_path / "opt", _opt(do_layer_norm_before=False).to_dict(), "OPTForCausalLM")
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        hf.load(opt)
    opt = _write_config(tmp_path / "opt_proj", _opt(word_embed_proj_dim=16).to_dict(), "OPTForCausalLM")
    with pytest.raises(ValueError, match="word_embed_proj_dim=16"):
        hf.load(opt)

    cfg = lm.presets.get("chatglm2-tiny")
    hf.save(cfg, random_params(cfg), tmp_path / "chatglm2", architecture="ChatGLMModel")
    config = json.loads((tmp_path / "chatglm2" / "config.json").read_text())
    (tmp_path / "chatglm2" / "config.json").write_text(json.dumps(dict(config, quantization_bit=4)))
    with pytest.raises(ValueError, match="quantization_bit=4"):
        hf.load(tmp_path / "chatglm2")
    (tmp_path / "chatglm2" / "config.json").write_text(json.dumps(dict(config, interleaved_qkv=True)))
    with pytest.raises(ValueError, match="ChatGLMModel importer: interleaved_qkv=True"):
        hf.load(tmp_path / "chatglm2")
