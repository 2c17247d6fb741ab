"""Adapters through every stage, end to end, from a tiny random Hugging Face Llama (GQA): LoRA SFT (3 steps) ->
reward model as int8-QLoRA adapters (2) -> PPO with actor, critic and reward model as three adapter sets on one
int8 base (2 iterations) and prefix-tuned DPO (2) -> checkpoints hold adapters only -> the LoRA export loads in
`peft` and computes what the run computes."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import configs.dpo
import configs.ppo
import configs.reward
import configs.sft
import lm
from lm import checkpoint, hf, peft, runs, stages
from lm.config import ModelConfig
from rl import stages as rl_stages
from test_hf_start import _checkpoint, _config, _data

pytest.importorskip("peft")
import peft as hf_peft  # noqa: E402


def _adapted(c, method, **fields):
    c.peft.method, c.peft.rank, c.peft.alpha, c.peft.dropout = method, 4, 8.0, 0.0
    for k, v in fields.items():
        setattr(c.peft, k, v)
    return c


@pytest.fixture(scope="module")
def runs_(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    ckpt = _checkpoint(root)
    alpaca, pairs = _data(root)
    cache = str(root / "cache")
    sft = stages.sft(_adapted(_config(configs.sft, ckpt, alpaca, 3, cache), "lora", targets="q,k,v,o,wi,wg,wo,lm_head"),
                     str(root / "sft"))
    c = _adapted(_config(configs.reward, sft, pairs, 2, cache), "qlora", quant="int8")
    c.data.k, c.train.batch_size, c.reward.normalize_batches = 2, 8, 1
    rm = rl_stages.reward(c, str(root / "reward"))
    c = _adapted(_config(configs.ppo, sft, pairs, 2, cache), "qlora", quant="int8")
    c.reward_from, c.train.batch_size, c.ppo.response_length, c.ppo.ptx_coef = rm, 8, 8, 0.0
    c.data.prompt_len = 48
    ppo = rl_stages.ppo(c, str(root / "ppo"))
    c = _adapted(_config(configs.dpo, sft, pairs, 2, cache), "prefix", virtual_tokens=3)
    c.data.k, c.train.batch_size = 2, 8
    dpo = rl_stages.dpo(c, str(root / "dpo"))
    return {"root": root, "checkpoint": ckpt, "sft": sft, "reward": rm, "ppo": ppo, "dpo": dpo}


def _saved(run):
    """Leaf paths of the newest checkpoint's params and train items (optimiser state included), as on disk."""
    mngr = checkpoint._manager(os.path.join(run, "checkpoints"), create=False)
    try:
        md = mngr.item_metadata(mngr.latest_step())
        return {k: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(md[k].tree)[0]]
                for k in ("params", "train")}
    finally:
        mngr.close()


def test_checkpoints_hold_adapters_and_their_moments_only(runs_):
    adapter = lambda path: any(f"['{n}']" in path for n in peft.ADAPTER_LEAVES) or "['score']" in path  # noqa: E731
    for stage in ("sft", "reward", "ppo", "dpo"):
        saved = _saved(runs_[stage])
        assert saved["params"] and all(adapter(p) for p in saved["params"]), (stage, saved["params"])
        moments = [p for p in saved["train"] if "opt_state" in p and ("'mu'" in p or "'nu'" in p)]
        assert moments and all(adapter(p) for p in moments), (stage, moments)
    assert any("['score']" in p for p in _saved(runs_["reward"])["params"])  # the head trains with the adapters
    ppo = _saved(runs_["ppo"])["params"]
    assert any(p.startswith("['actor']") for p in ppo) and any(p.startswith("['critic']['score']") for p in ppo)
    meta = runs.load_meta(runs_["ppo"])
    assert meta["base"] == os.path.abspath(runs_["sft"]) and meta["model"]["quant"] == "int8"


def test_ppo_uses_one_base_and_its_reference_is_the_base(runs_):
    rows = [json.loads(line) for line in open(os.path.join(runs_["ppo"], "metrics.jsonl"))]
    kl = [r["kl"] for r in rows if "kl" in r]
    # Zero-initialised actor adapters: the first rollout's policy is exactly the reference (base, adapters off).
    assert kl[0] == 0.0 and kl[1] != 0.0
    # The reward run holds adapters on the same base as the PPO run, so PPO reads them onto its own base.
    assert runs.load_meta(runs_["reward"])["base"] == runs.load_meta(runs_["ppo"])["base"]
    meta = runs.load_meta(runs_["reward"])
    reward = runs.read_trainable(runs_["reward"], ModelConfig.from_dict(meta["model"]), meta, "scalar")
    assert "embed" not in reward and "score" in reward


def test_lora_export_loads_in_peft_with_equal_logits(runs_):
    out = str(hf.export_run(runs_["sft"], str(runs_["root"] / "export_adapter"), adapter=True))
    merged = str(hf.export_run(runs_["sft"], str(runs_["root"] / "export_merged")))
    cfg, params, tok = lm.load(runs_["sft"])
    ids = tok.encode("Why is the sky blue? Air molecules scatter blue sunlight.")
    ours = np.asarray(lm.Transformer(cfg).apply({"params": params}, np.asarray([ids])))
    base = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(torch.tensor([ids])).logits.numpy()
        model = hf_peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
        theirs = model(torch.tensor([ids])).logits.numpy()
        whole = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(whole, ours, atol=1e-4, rtol=1e-4)
    assert np.abs(before - ours).max() > 1e-3  # the adapters changed the model
    with pytest.raises(ValueError, match="reward-model adapters"):
        hf.export_run(runs_["reward"], str(runs_["root"] / "export_rm"), adapter=True)


def test_prefix_tuned_policy_loads_and_generates(runs_):
    cfg, params, tok = lm.load(runs_["dpo"])
    assert cfg.prefix_tokens == 3 and params["layers"]["attn"]["prefix_k"].shape[1] == 3
    prompt = tok.encode("What is the capital of France?")
    out = lm.generate(cfg, params, [prompt], 6)[0]
    full = np.asarray(lm.Transformer(cfg).apply({"params": params}, np.asarray([prompt + out[:-1]])))[0]
    assert out == [int(t) for t in full[len(prompt) - 1:].argmax(-1)]
