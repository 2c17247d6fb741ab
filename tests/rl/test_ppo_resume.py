"""RL through the one loop, as a user runs it: `python -m experiments.ppo` killed (-9) at a random iteration and
rerun logs exactly the metrics of an uninterrupted run, iteration by iteration, and ends with the same actor;
PPO trained whole, and GRPO as adapters on one int8 base (QLoRA), whose checkpoints hold the adapters only and
whose base is read (and quantised) again on every start."""
import json
import os
import random
import shutil
import signal

import jax
import numpy as np
import optax
import pytest

import lm
from configs import sft as sft_config
from launchers import ROOT, cache_env, finish, launch, signal_after
from lm import checkpoint, presets
from lm.logging_utils import read_metrics
from lm.model import init_params
from lm.tokenizer import Tokenizer
from lm.train_step import TrainState
from rl import reward

STEPS = 8
TIMING = ("seconds", "tokens_per_sec")


def _run_dir(path, params, meta, tok):
    """A run directory as a training stage leaves it: a checkpoint with metadata and the tokenizer."""
    tx = optax.adam(1e-3)
    zero = np.zeros((), np.int32)
    state = TrainState(step=zero, params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(0), skipped=zero,
                       bad_streak=zero)
    ckpt = checkpoint.Checkpointer(str(path / "checkpoints"), async_save=False)
    ckpt.save(1, state, meta=meta, force=True)
    ckpt.close()
    shutil.copyfile(tok.path, path / "tokenizer.model")
    return str(path)


GRPO_QLORA = ["--config.rl.algorithm=grpo", "--config.rl.group_size=2", "--config.peft.method=qlora",
              "--config.peft.quant=int8", "--config.peft.rank=4"]


@pytest.mark.parametrize("peft", [[], GRPO_QLORA], ids=["ppo-full", "grpo-qlora"])
def test_rl_killed_and_rerun_logs_every_metric_of_an_uninterrupted_run(tmp_path, peft):
    tok = Tokenizer.train(os.path.join(ROOT, "data/text/en.txt"), 320, str(tmp_path / "tok"), character_coverage=0.99)
    cfg = presets.get("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      d_ff=64, max_len=64)
    sft = jax.device_get(init_params(cfg, jax.random.key(0)))
    sft_dir = _run_dir(tmp_path / "sft", sft, {"model": cfg.to_dict(), "stage": "sft", "head": "lm"}, tok)
    rm = jax.device_get(reward.init_from_sft(cfg, sft, jax.random.key(1)))
    rm_dir = _run_dir(tmp_path / "rm", rm, {"model": cfg.to_dict(), "stage": "reward", "head": "scalar"}, tok)
    reward.save_normalization(rm_dir, 0.1, 2.0, 100)
    prompts = tmp_path / "prompts.jsonl"
    with open(os.path.join(ROOT, "data/qa/rl_prompts.jsonl")) as f:
        prompts.write_text("".join(f.readlines()[:40]))

    args = ["--config=configs/ppo.py:tiny", f"--config.init_from={sft_dir}", f"--config.reward_from={rm_dir}",
            f"--config.data.path={prompts}", f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
            "--config.ppo.response_length=6", "--config.ppo.epochs=2", "--config.data.prompt_len=48",
            "--config.checkpoint.every_steps=3", "--config.train.log_every=1", *peft]
    env = cache_env(tmp_path)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    finish(launch("experiments.ppo", straight, *args, env=env))
    kill_after = random.randint(2, STEPS - 2)
    signal_after(launch("experiments.ppo", killed, *args, env=env), killed, kill_after, signal.SIGKILL)
    finish(launch("experiments.ppo", killed, *args, env=env))

    a, b = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (straight, killed))
    assert [r["step"] for r in b] == list(range(1, STEPS + 1)), f"killed after {kill_after}"
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b], f"killed after iteration {kill_after}"
    assert {"score", "kl", "kl_coef", "policy_loss", "lr", "bad_streak"} <= set(a[-1])
    assert ("kl_loss" if peft else "value_loss") in a[-1]  # GRPO's KL is a loss term; PPO has a critic
    # The run directory loads as a policy: the actor, with the SFT run's tokenizer.
    cfg_a, actor_a, tok_a = lm.load(straight)
    _, actor_b, _ = lm.load(killed)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(actor_a), jax.device_get(actor_b))
    assert cfg_a == cfg and tok_a.vocab_size == tok.vocab_size  # adapters come back merged into the base
    if peft:
        assert lm.runs.load_meta(straight)["params"] == {"actor": "lm"}  # no critic
        assert np.abs(jax.device_get(actor_a)["layers"]["attn"]["q"]["kernel"] - sft["layers"]["attn"]["q"]["kernel"]
                      ).max() > 0  # int8 rounding and the trained adapters
        return
    meta = json.loads(json.dumps(lm.runs.load_meta(straight)))
    assert meta["policy"] == "actor" and meta["params"] == {"actor": "lm", "critic": "scalar"}
    # A stage started from it (init_from) starts from the actor; one started from a reward model is refused.
    config = sft_config.get_config("tiny")
    config.init_from = straight
    _, start_from = lm.runs.init_from(config)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(start_from(lm.abstract_params(cfg))),
                 jax.device_get(actor_a))
    config.init_from = rm_dir
    with pytest.raises(ValueError, match="holds a model with a 'scalar' head.*a reward model"):
        lm.runs.init_from(config)[1](lm.abstract_params(cfg))
