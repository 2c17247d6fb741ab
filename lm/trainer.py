"""The thin, generic training loop shared by pretraining, SFT, reward modelling and DPO.

`fit` builds the mesh, optimiser and sharded state from the config, resumes from the newest checkpoint in
`WORKDIR/checkpoints` (parameters, optimiser, step, RNG and data position), then runs the jitted step
(lm.train) with logging (lm.logging_utils), periodic evaluation and checkpoints. A stage supplies only its
`loss_fn`, its parameter init and its data.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from lm import checkpoint, distributed, optim, sharding
from lm.logging_utils import MetricsLogger
from lm.train import LossFn, TrainState, init_state, make_eval_step, make_train_step, state_shardings


class TrainingStopped(RuntimeError):
    """Raised when too many updates in a row were skipped for non-finite loss or gradients."""


def mesh_and_rules(config):
    """The device mesh (`config.mesh.shape` over `config.mesh.axes`) and logical-axis rules of a run."""
    rules = sharding.rules_from_config(config.mesh.get("rules"))
    return sharding.make_mesh(config.mesh.shape, config.mesh.axes), rules


def local_batch_size(config) -> int:
    """Rows of each global batch that this process loads."""
    n = jax.process_count()
    if config.train.batch_size % n:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the {n} processes")
    return config.train.batch_size // n


def evaluate(eval_step, params, data: Iterable, num_batches: int, mesh, rules, rng) -> dict:
    """Token-weighted mean of the loss function's metrics over `num_batches` batches of `data`, plus perplexity."""
    sums, total = {}, 0.0
    for i, batch in zip(range(num_batches), data):
        m = jax.device_get(eval_step(params, sharding.global_batch(batch, mesh, rules), jax.random.fold_in(rng, i)))
        w = float(m.pop("weight", 1.0))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + w * float(v)
        total += w
    out = {f"eval_{k}": v / max(total, 1e-12) for k, v in sums.items()}
    if "eval_loss" in out:
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out


def fit(config, workdir: str, *, loss_fn: LossFn, build_params: Callable, train_data: Iterable,
        eval_data: Optional[Iterable] = None, meta: Optional[Mapping[str, Any]] = None,
        init_params: Optional[Callable] = None) -> TrainState:
    """Train for `config.train.steps` steps (resuming if `workdir` holds a checkpoint); returns the final state.

    loss_fn: `(params, batch, rng) -> (loss, metrics)` (lm.losses.lm_loss_fn for LM stages).
    build_params: `rng -> boxed params` (logically named), e.g. `Transformer(cfg).init(...)["params"]`.
    train_data: this process's batches (dicts of NumPy arrays); a grain IterDataset, so its position is
      checkpointed. eval_data: an iterable re-iterated from the start at each evaluation (make it repeat:
      every process must see `train.eval_batches` batches).
    meta: JSON-able metadata saved with every checkpoint (e.g. the model config).
    init_params: `abstract_params -> params`, used instead of the random init when there is nothing to
      resume (e.g. SFT loading pretrained weights).
    """
    tc = config.train
    mesh, rules = mesh_and_rules(config)
    sharding.check_batch(tc.batch_size, tc.micro_batches, mesh, rules)
    tx, lr = optim.make_optimizer(config.optim, tc.steps)
    abstract, shardings = state_shardings(build_params, tx, mesh, rules)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
                                   max_to_keep=config.checkpoint.max_to_keep,
                                   async_save=config.checkpoint.async_save)
    data_iter = iter(train_data)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract, data_iter=data_iter)
    else:
        params = None if init_params is None else init_params(abstract.params)
        state, _ = init_state(build_params, tx, jax.random.PRNGKey(config.seed), mesh, rules, params)
    start = int(state.step)

    step_fn = make_train_step(loss_fn, tx, shardings, mesh, rules=rules, micro_batches=tc.micro_batches,
                              lr_schedule=lr)
    eval_step = make_eval_step(loss_fn, shardings.params, mesh, rules=rules) if eval_data is not None else None
    eval_rng = jax.random.PRNGKey(config.seed + 1)
    log = MetricsLogger(workdir, total_steps=tc.steps, start_step=start, enabled=distributed.is_primary())
    if start:
        log.message(f"resumed from {ckpt.directory} at step {start}")
    meta = dict(meta or {})

    def report(done, extra):
        """Host side of a finished step: stop on a run of skipped updates, log, advance the bar."""
        step, metrics, tokens, seconds = done
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if m["bad_streak"] >= tc.max_bad_steps:
            raise TrainingStopped(f"stopping at step {step}: the last {int(m['bad_streak'])} updates had a "
                                  f"non-finite loss or gradient norm (loss={m['loss']}, grad_norm={m['grad_norm']}) "
                                  f"and were skipped; train.max_bad_steps={tc.max_bad_steps}")
        tok_s = tokens / max(seconds, 1e-9)
        if step % tc.log_every == 0 or extra or step == tc.steps:
            log.write(step, {**m, "tokens_per_sec": tok_s, **extra})
        log.progress(1, {"loss": f"{m['loss']:.4f}", "tok/s": f"{tok_s:,.0f}"})

    # A step's metrics are read one step late, so the host prepares batch s+1 while the device runs step s.
    pending = None
    last = time.perf_counter()
    try:
        for step in range(start + 1, tc.steps + 1):
            try:
                batch = next(data_iter)
            except StopIteration:
                log.message(f"training data exhausted after {step - 1} steps")
                break
            tokens = int(np.asarray(batch["inputs"]).size) * jax.process_count() if "inputs" in batch else 0
            state, metrics = step_fn(state, sharding.global_batch(batch, mesh, rules))
            if pending is not None:
                report(pending, {})
            now = time.perf_counter()
            pending, last = (step, metrics, tokens, now - last), now
            extra = {}
            if eval_step is not None and tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                extra = evaluate(eval_step, state.params, eval_data, tc.eval_batches, mesh, rules, eval_rng)
            if extra or ckpt.should_save(step) or step == tc.steps:
                report(pending, extra)  # logged before its checkpoint, so a resumed log has no gap
                pending = None
            ckpt.save(step, state, data_iter, meta)
        if pending is not None:
            report(pending, {})
        ckpt.save(int(state.step), state, data_iter, meta, force=True)
        ckpt.wait()
    finally:
        log.close()
        ckpt.close()
    return state
