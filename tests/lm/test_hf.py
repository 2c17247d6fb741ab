"""HF interop: logits of `lm.hf.load`ed checkpoints match tiny random `transformers` models, and
`lm.hf.save` writes directories `transformers` loads back to the same logits."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers as tr
from safetensors import safe_open

import lm
from hf_refs import V, check_greedy, hf_logits, our_logits, random_params, tokens
import hf_refs
from lm import hf, hf_arch


def _llama(gqa, **kw):
    return tr.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=64,
                          rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, **kw)


HF_CONFIGS = {
    # Untied head, non-default rope_theta.
    "llama_gqa": lambda: _llama(True, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # Tied embeddings, biases on every projection.
    "llama_mha": lambda: _llama(False, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "bloom": lambda: tr.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, bos_token_id=None,
                                    eos_token_id=None),
    "gpt2": lambda: tr.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=None, eos_token_id=None),
    "glm": lambda: tr.GlmConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                rms_norm_eps=1e-5, pad_token_id=None, eos_token_id=None),
}
ARCH = {"llama_gqa": "LlamaForCausalLM", "llama_mha": "LlamaForCausalLM", "bloom": "BloomForCausalLM",
        "gpt2": "GPT2LMHeadModel", "glm": "GlmForCausalLM"}


def hf_model(name, seed=0, std=0.15):
    """A tiny random `transformers` model of one of HF_CONFIGS (or of a config object)."""
    return hf_refs.hf_model(HF_CONFIGS[name]() if isinstance(name, str) else name, seed, std)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_parity_load_and_save(name, tmp_path):
    model = hf_model(name)
    toks = tokens()
    ref = hf_logits(model, toks)
    assert np.abs(ref).max() > 1.0  # random enough that layout mistakes show up in the logits
    model.save_pretrained(tmp_path / "hf")

    cfg, params = hf.load(tmp_path / "hf")
    np.testing.assert_allclose(our_logits(cfg, params, toks), ref, atol=1e-4, rtol=0)

    hf.save(cfg, params, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [ARCH[name]]
    back = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == ARCH[name]
    np.testing.assert_allclose(hf_logits(back, toks), ref, atol=1e-6, rtol=0)


def test_config_fields_mapped():
    cfgs = {}
    for name in ("llama_gqa", "llama_mha", "glm", "bloom", "gpt2"):
        cfgs[name] = hf_arch.get(ARCH[name]).from_hf(HF_CONFIGS[name]().to_dict())
    assert cfgs["llama_gqa"]["n_kv_heads"] == 2 and cfgs["llama_gqa"]["rope_theta"] == 500.0
    assert cfgs["llama_mha"]["tie_embeddings"] and cfgs["llama_mha"]["out_bias"] and cfgs["llama_mha"]["mlp_bias"]
    glm = cfgs["glm"]
    assert (glm["rope_fraction"], glm["rope_interleaved"], glm["qkv_bias"], glm["out_bias"]) == (0.5, True, True,
                                                                                                False)
    assert cfgs["bloom"]["position"] == "alibi" and cfgs["bloom"]["embed_norm"] and cfgs["bloom"]["d_ff"] == 128
    assert cfgs["gpt2"]["position"] == "learned" and cfgs["gpt2"]["max_len"] == 64


def test_sharded_index(tmp_path):
    model = hf_model("llama_gqa")
    toks = tokens(1)
    ref = hf_logits(model, toks)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / hf.INDEX).exists() and not (tmp_path / "hf" / hf.WEIGHTS).exists()
    cfg, params = hf.load(tmp_path / "hf")
    np.testing.assert_allclose(our_logits(cfg, params, toks), ref, atol=1e-4, rtol=0)

    hf.save(cfg, params, tmp_path / "ours", max_shard_size=20_000)
    shards = sorted((tmp_path / "ours").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "ours" / hf.INDEX).read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    back = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(back, toks), ref, atol=1e-6, rtol=0)

    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        hf.load(tmp_path / "ours")


def _baichuan7b_dir(model, path):
    """A Baichuan-7B layout checkpoint (fused `W_pack` = [q; k; v]) holding a LLaMA model's weights."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        state[p + "W_pack.weight"] = np.concatenate([state.pop(p + f"{n}_proj.weight") for n in "qkv"])
    path.mkdir()
    safetensors.numpy.save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    c = model.config
    config = {"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan", "vocab_size": c.vocab_size,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
              "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    return state


def test_baichuan_7b_w_pack(tmp_path):
    model = hf_model(_llama(False))  # Baichuan-7B: LLaMA without GQA or biases, q/k/v packed in W_pack
    toks = tokens(2)
    ref = hf_logits(model, toks)
    state = _baichuan7b_dir(model, tmp_path / "bc")
    cfg, params = hf.load(tmp_path / "bc")
    assert (cfg.position, cfg.max_len, cfg.kv_heads) == ("rope", 64, 4)
    np.testing.assert_allclose(our_logits(cfg, params, toks), ref, atol=1e-4, rtol=0)

    hf.save(cfg, params, tmp_path / "ours", architecture="BaichuanForCausalLM")
    with safe_open(tmp_path / "ours" / hf.WEIGHTS, framework="numpy") as f:
        assert set(f.keys()) == set(state)
        for k in state:
            np.testing.assert_array_equal(f.get_tensor(k), state[k], err_msg=k)

    # A LLaMA layout (separate q/k/v) under a Baichuan config: the missing fused tensor is named.
    model.save_pretrained(tmp_path / "llama")
    config = json.loads((tmp_path / "bc" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.W_pack\.weight"):
        hf.load(tmp_path / "llama")


def _as_loaded(cfg):
    """`cfg` as `hf.load` returns it: how the layer stack compiles is not part of a Hugging Face checkpoint."""
    return dataclasses.replace(cfg, scan_unroll=lm.ModelConfig.scan_unroll)


def test_baichuan_13b_alibi_round_trip(tmp_path):
    cfg = lm.presets.get("baichuan-tiny")
    params = random_params(cfg)
    hf.save(cfg, params, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BaichuanForCausalLM"]
    assert config["model_max_length"] == cfg.max_len and "max_position_embeddings" not in config
    cfg2, params2 = hf.load(tmp_path)
    assert (cfg2.position, cfg2.norm, cfg2.mlp, cfg2.kv_heads) == ("alibi", "rmsnorm", "swiglu", cfg.n_heads)
    assert cfg2 == _as_loaded(cfg)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_chatglm6b_round_trip(tmp_path):
    cfg = lm.presets.get("glm-tiny")
    params = random_params(cfg, 1)
    hf.save(cfg, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ChatGLMForConditionalGeneration"]
    h, d, e = cfg.n_heads, cfg.dim_per_head, cfg.d_model
    with safe_open(tmp_path / hf.WEIGHTS, framework="numpy") as f:
        qkv = f.get_tensor("transformer.layers.1.attention.query_key_value.weight")
        assert "transformer.layers.1.mlp.dense_4h_to_h.bias" in f.keys()
    # ChatGLM-6B lays the fused output out per head: [H, (q, k, v), D].
    k_head2 = qkv.reshape(h, 3, d, e)[2, 1]
    np.testing.assert_array_equal(k_head2, params["layers"]["attn"]["k"]["kernel"][1][:, 2].T)
    cfg2, params2 = hf.load(tmp_path)
    assert cfg2 == _as_loaded(cfg)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_checkpoint(tmp_path):
    model = hf_model("llama_gqa").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert cfg.param_dtype == "bfloat16" and params["embed"]["embedding"].dtype == jnp.bfloat16
    cfg32, params32 = hf.load(tmp_path, dtype=jnp.float32)
    assert cfg32.param_dtype == "float32"
    weights = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(params32["embed"]["embedding"], weights["model.embed_tokens.weight"])
    q = weights["model.layers.1.self_attn.q_proj.weight"]  # [H*D, E]
    np.testing.assert_array_equal(params32["layers"]["attn"]["q"]["kernel"][1], q.T.reshape(32, 4, 8))


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="MambaForCausalLM.*supported: .*LlamaForCausalLM"):
        hf.load(tmp_path)
    with pytest.raises(ValueError, match="'Foo'.*GPT2LMHeadModel"):
        hf.save(lm.presets.get("gpt2-tiny"), {}, tmp_path, architecture="Foo")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        hf.load(tmp_path)
    hf_model("gpt2").save_pretrained(tmp_path)
    (tmp_path / hf.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / hf.WEIGHTS)):
        hf.load(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    hf_model("llama_gqa").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(48, 32\).*\(40, 32\)"):
        hf.load(tmp_path)


def test_save_rejects_what_the_architecture_cannot_express(tmp_path):
    cfg = lm.presets.get("bloom-tiny", n_kv_heads=2)
    with pytest.raises(ValueError, match="BloomForCausalLM.*n_kv_heads=2"):
        hf.save(cfg, {}, tmp_path)
    cfg = lm.presets.get("gpt2-tiny")
    params = random_params(cfg)
    params["layers"]["mlp"]["wi"]["kernel"] = params["layers"]["mlp"]["wi"]["kernel"][:, :, :100]
    with pytest.raises(ValueError, match=r"layers/mlp/wi/kernel.*\(2, 64, 100\).*\(2, 64, 256\)"):
        hf.save(cfg, params, tmp_path)


@pytest.mark.parametrize("name", ["llama_gqa", "bloom"])
def test_greedy_generate_matches_hf(name, tmp_path):
    check_greedy(hf_model(name, seed=4, std=0.3), tmp_path, [[5, 17, 3], [9, 1, 60, 22, 7, 44, 80], [31]], 8)


def test_save_extra_config_sets_token_ids(tmp_path):
    cfg = lm.presets.get("llama-tiny")
    hf.save(cfg, random_params(cfg), tmp_path, extra_config={"bos_token_id": 1, "eos_token_id": 2})
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)
