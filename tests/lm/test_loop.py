"""The one loop (lm.loop.run) on a toy algorithm whose state has an extra field (as PPO's KL coefficient):
SIGTERM saves the current step and a rerun ends bit-identical to an uninterrupted run, a damaged newest
checkpoint falls back to the previous one with a warning naming it, and a resume with another model is
refused naming the field."""
import logging
import os
import signal

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from lm import checkpoint, loop, presets
from lm.logging_utils import read_metrics

STEPS = 10
MODEL = presets.get("llama-tiny").to_dict()


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    params: dict
    coef: jax.Array  # algorithm state beside the params, checkpointed with them
    rng: jax.Array


def _config(every=3):
    c = common.base(model_preset="llama-tiny", steps=STEPS, batch_size=4, lr=0.1, warmup_steps=1,
                    checkpoint_every=every, log_every=1)
    c.checkpoint.async_save = False
    return c


@jax.jit
def _update(state, x):
    rng, noise_rng = jax.random.split(state.rng)
    target = x.mean(0) + 0.01 * jax.random.normal(noise_rng, x.shape[1:])
    w = state.params["w"] + state.coef * (target - state.params["w"])
    loss = jnp.mean((target - w) ** 2)
    new = ToyState(step=state.step + 1, params={"w": w}, coef=state.coef * 1.01, rng=rng)
    return new, {"loss": loss, "bad_streak": jnp.int32(0)}


def _program(meta=None, sigterm_at=None):
    rows = [{"x": np.random.RandomState(i).randn(4, 3).astype(np.float32)} for i in range(STEPS + 2)]
    abstract = ToyState(step=jax.ShapeDtypeStruct((), jnp.int32), params={"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
                        coef=jax.ShapeDtypeStruct((), jnp.float32), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))

    def step(state, batch):
        out = _update(state, jnp.asarray(batch["x"]))
        if sigterm_at is not None and int(state.step) + 1 == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption notice, mid-run
        return out

    fresh = lambda: ToyState(step=jnp.int32(0), params={"w": jnp.zeros(3)}, coef=jnp.float32(0.2),  # noqa: E731
                             rng=jax.random.PRNGKey(0))
    return loop.Program(abstract_state=abstract, init_state=fresh, step=step,
                        data=grain.MapDataset.source(rows).to_iter_dataset(), max_bad_steps=3,
                        meta=meta or {"model": MODEL})


def _final(workdir):
    return jax.device_get(loop.run(_config(), workdir, _program()))


def test_sigterm_saves_the_current_step_and_a_rerun_matches_an_uninterrupted_run(tmp_path):
    want = _final(str(tmp_path / "straight"))
    workdir = str(tmp_path / "preempted")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(loop.Preempted, match="saved step 5"):
        loop.run(_config(), workdir, _program(sigterm_at=5))
    assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 5  # not a multiple of every_steps=3
    assert signal.getsignal(signal.SIGTERM) == handler  # the loop's handler is gone after the run
    got = _final(workdir)
    jax.tree.map(np.testing.assert_array_equal, got, want)  # params, coef, rng and step
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    straight = read_metrics(str(tmp_path / "straight" / "metrics.jsonl"))
    assert [r["loss"] for r in records] == [r["loss"] for r in straight]


def _truncate_every_file(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(f.name) // 2))


def _preempted_at_5_then_damaged(tmp_path):
    """`(workdir, checkpoints dir)` of a run preempted at step 5 (saved at 3 and 5) whose step 5 is truncated."""
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.Preempted):
        loop.run(_config(), workdir, _program(sigterm_at=5))
    ckpts = os.path.join(workdir, "checkpoints")
    _truncate_every_file(os.path.join(ckpts, "5"))
    return workdir, ckpts


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    want = _final(str(tmp_path / "straight"))
    workdir, ckpts = _preempted_at_5_then_damaged(tmp_path)
    with caplog.at_level(logging.WARNING):
        got = _final(workdir)
    assert any(f"{ckpts}/5 is damaged" in r.getMessage() for r in caplog.records), caplog.text
    assert os.path.isdir(os.path.join(ckpts, "5.damaged"))
    jax.tree.map(np.testing.assert_array_equal, got, want)  # resumed from step 3, same end
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))

    # Nothing reads back: an error naming the directory and the newest step's problem, and nothing is set
    # aside (the same failure on every step is more likely this run's problem than damage).
    steps = sorted(d for d in os.listdir(ckpts) if d.isdigit())
    for step in steps:
        _truncate_every_file(os.path.join(ckpts, step))
    with pytest.raises(checkpoint.CheckpointError, match=rf"no checkpoint in {ckpts} reads back .* the newest, 10,"):
        checkpoint.load_meta(ckpts)
    with pytest.raises(checkpoint.CheckpointError):
        loop.run(_config(), workdir, _program())
    assert sorted(d for d in os.listdir(ckpts) if d.isdigit()) == steps


def test_a_reader_skips_a_damaged_checkpoint_without_moving_it(tmp_path, caplog):
    _, ckpts = _preempted_at_5_then_damaged(tmp_path)
    with caplog.at_level(logging.WARNING):
        params = checkpoint.load_params(ckpts, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert params["w"].shape == (3,) and any(f"{ckpts}/5 is damaged" in r.getMessage() for r in caplog.records)
    assert os.path.isdir(os.path.join(ckpts, "5")) and not os.path.exists(os.path.join(ckpts, "5.damaged"))


def test_resume_with_a_model_that_computes_another_function_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.Preempted):
        loop.run(_config(), workdir, _program(sigterm_at=2))
    alibi = dict(MODEL, position="alibi")
    with pytest.raises(ValueError, match=r"position: 'rope' there, 'alibi' here"):
        loop.run(_config(), workdir, _program(meta={"model": alibi}))
    # How the model runs may change between runs (bf16 compute, remat): that resumes.
    state = loop.run(_config(), workdir, _program(meta={"model": dict(MODEL, dtype="bfloat16", remat="full")}))
    assert int(state.step) == STEPS
