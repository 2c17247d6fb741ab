"""PEFT adapter directories: `lm.hf_adapter` against `peft` on tiny random `transformers` models.

Our adapted logits must equal `PeftModel.from_pretrained(base, adapter)`'s for LoRA (GQA Llama with an lm_head
LoRA, Qwen2 with q/k/v biases and 3 heads over 1 K/V head, Mistral with a window shorter than the sequence, GPT-2's
Conv1D; rsLoRA once), prompt and prefix tuning; peft's `merge_and_unload` must equal our `merge_lora`; reading back what we
wrote must be exact, and bad directories must be refused by name.
"""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy

peft_lib = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_refs import our_logits, random_params, tokens  # noqa: E402
from lm import hf, hf_adapter, peft  # noqa: E402
from lm.config import ModelConfig  # noqa: E402
from lm.presets import get as preset  # noqa: E402

_TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=64)
# name -> (base config, LoRA targets)
CASES = {
    "llama_gqa": (ModelConfig(**_TINY), "q,k,v,o,wi,wg,wo,lm_head"),
    "qwen2_odd_heads": (ModelConfig(**dict(_TINY, d_model=24, n_heads=3, n_kv_heads=1), qkv_bias=True),
                        "q,k,v,o,wi,wg,wo"),
    "mistral_window": (ModelConfig(**_TINY, sliding_window=5), "q,k,v,o,wi,wg,wo"),
    "gpt2_conv1d": (preset("gpt2-tiny", vocab_size=64, d_model=32, d_ff=64, max_len=64), "o,wi,wo"),
}
TOKENS = tokens(length=12, vocab=64)


def _random(tree, seed):
    """Random non-zero values in place of every leaf of `tree`."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: rng.normal(0, 0.3, np.shape(x)).astype(np.float32), tree)


def _base(tmp_path, cfg):
    """`(cfg, params)` of a random base model written to `tmp_path / "base"` and read back."""
    hf.save(cfg, random_params(cfg), tmp_path / "base")
    return hf.load(tmp_path / "base")


def _adapted(cfg, pc, seed=1):
    """The adapted config and random non-zero adapters (LoRA B too, which PEFT and we initialise to zeros)."""
    adapted = peft.adapt(cfg, pc)
    shapes = jax.eval_shape(lambda r: nn.unbox(peft.boxed_trainable(adapted, r)), jax.random.key(seed))
    return adapted, _random(shapes, seed)


def _peft_logits(tmp_path, adapter_dir, n_virtual=0):
    """PEFT's model (`adapter_dir` on the base at `tmp_path / "base"`) and its logits of TOKENS, without the
    `n_virtual` prompt-tuning positions PEFT puts in front."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = peft_lib.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model, model(input_ids=torch.tensor(TOKENS)).logits.numpy()[:, n_virtual:]


@pytest.mark.parametrize("name", CASES)
def test_lora_matches_peft(tmp_path, name):
    cfg, base = _base(tmp_path, CASES[name][0])
    pc = peft.PeftConfig(method="lora", rank=4, alpha=8.0, dropout=0.1, targets=CASES[name][1],
                         rslora=name == "qwen2_odd_heads")
    adapted, trainable = _adapted(cfg, pc)
    ours = our_logits(adapted, peft.merge(base, trainable), TOKENS)
    out = hf_adapter.save_adapter(adapted, trainable, tmp_path / "base" / "adapter")
    model, theirs = _peft_logits(tmp_path, out)
    with model.disable_adapter(), torch.no_grad():  # the LoRAs change the logits
        assert np.abs(theirs - model(input_ids=torch.tensor(TOKENS)).logits.numpy()).max() > 0.05
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    back_cfg, back = hf_adapter.load_adapter(out, cfg)
    assert back_cfg == adapted
    jax.tree.map(np.testing.assert_array_equal, back, trainable)

    merged_cfg, merged = peft.merge_lora(adapted, peft.merge(base, trainable))
    hf.save(merged_cfg, jax.tree.map(np.asarray, merged), tmp_path / "merged")
    ref = {k: v.numpy() for k, v in model.merge_and_unload().state_dict().items()}
    for key, value in safetensors.numpy.load_file(tmp_path / "merged" / "model.safetensors").items():
        np.testing.assert_allclose(value, ref[key], atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize("name,method", [("llama_gqa", "prompt"), ("qwen2_odd_heads", "prefix"),
                                         ("mistral_window", "prefix")])
def test_prompt_and_prefix_match_peft(tmp_path, name, method):
    cfg, base = _base(tmp_path, CASES[name][0])
    adapted, trainable = _adapted(cfg, peft.PeftConfig(method=method, virtual_tokens=3))
    ours = our_logits(adapted, peft.merge(base, trainable), TOKENS)
    out = hf_adapter.save_adapter(adapted, trainable, tmp_path / "adapter")
    theirs = _peft_logits(tmp_path, out, n_virtual=3 if method == "prompt" else 0)[1]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    back_cfg, back = hf_adapter.load_adapter(out, cfg)
    assert back_cfg == adapted
    jax.tree.map(np.testing.assert_array_equal, back, trainable)


def test_fused_projections_are_refused(tmp_path):
    cfg = ModelConfig(**_TINY)
    for arch, targets, tensor in [("Phi3ForCausalLM", "q,o", "qkv_proj"), ("GlmForCausalLM", "wi", "gate_up_proj")]:
        adapted, trainable = _adapted(cfg, peft.PeftConfig(method="lora", rank=2, targets=targets))
        with pytest.raises(ValueError, match=f"{arch} fuses .*{tensor}"):
            hf_adapter.save_adapter(adapted, trainable, tmp_path / arch, architecture=arch)
    adapted, trainable = _adapted(cfg, peft.PeftConfig(method="lora", rank=2, targets="o,wo"))
    out = hf_adapter.save_adapter(adapted, trainable, tmp_path / "phi3", architecture="Phi3ForCausalLM")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["mlp.down_proj", "self_attn.o_proj"]
    assert hf_adapter.load_adapter(out, cfg, architecture="Phi3ForCausalLM")[0] == adapted


def test_bad_adapter_dirs_are_refused(tmp_path):
    cfg = ModelConfig(**_TINY)
    adapted, trainable = _adapted(cfg, peft.PeftConfig(method="lora", rank=2, targets="q,v"))
    out = hf_adapter.save_adapter(adapted, trainable, tmp_path / "adapter")
    conf_file, weights = out / "adapter_config.json", out / "adapter_model.safetensors"
    conf, tensors = json.loads(conf_file.read_text()), safetensors.numpy.load_file(weights)

    conf_file.write_text(json.dumps(dict(conf, peft_type="IA3")))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        hf_adapter.load_adapter(out, cfg)
    conf_file.write_text(json.dumps(dict(conf, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        hf_adapter.load_adapter(out, cfg)
    conf_file.write_text(json.dumps(dict(conf, r=3)))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight' in .*adapter_model.safetensors has shape \(2, 32\); "
                       r"adapter_config.json and the base imply \(3, 32\)"):
        hf_adapter.load_adapter(out, cfg)

    conf_file.write_text(json.dumps(conf))
    missing = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != missing}, weights)
    with pytest.raises(ValueError, match=f"tensor '{missing}' in .*adapter_model.safetensors is missing"):
        hf_adapter.load_adapter(out, cfg)
    extra = "base_model.model.model.embed_tokens.lora_embedding_A"
    safetensors.numpy.save_file(dict(tensors, **{extra: tensors[missing]}), weights)
    with pytest.raises(ValueError, match=f"not used: \\['{extra}'\\]"):
        hf_adapter.load_adapter(out, cfg)
