"""The one training loop, for every stage and algorithm: `run(config, workdir, program)`.

An algorithm describes itself as a `Program`: its state (any flax struct dataclass with a `params` field),
how to make a fresh one, its jitted `step(state, batch) -> (state, metrics[, aux])` and its data. The loop
owns everything else: resume from the newest intact checkpoint in `WORKDIR/checkpoints` (state, RNG, data
position), metrics (`metrics.jsonl`, TensorBoard, a progress bar), periodic evaluation, the non-finite
streak (a step reports `bad_streak`: updates skipped in a row), checkpoint cadence, and preemption: on
SIGTERM (or JAX's multi-host preemption notice) it saves the current step on every process and raises
`Preempted`, so rerunning the same command continues bit-identically.

`fit` is the loop for the loss-function stages (pretraining, SFT, reward model, DPO): it builds a
`TrainState` and the generic step of lm.train_step around a `loss_fn`.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm import checkpoint, distributed, optim, sharding
from lm.config import ModelConfig
from lm.logging_utils import MetricsLogger
from lm.train_step import LossFn, init_state, make_eval_step, make_train_step, state_shardings


class TrainingStopped(RuntimeError):
    """Raised when too many updates in a row were skipped for non-finite loss or gradients."""


class Preempted(RuntimeError):
    """Raised after the state at `step` was saved because the process was asked to stop (SIGTERM)."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"preempted: saved step {step} to {directory}; rerun the same command to resume")
        self.step = step


@dataclasses.dataclass
class Program:
    """What an algorithm hands the loop.

    abstract_state: the state filled with `jax.ShapeDtypeStruct`s carrying shardings (the restore target).
    init_state: `() -> state` for a run with nothing to resume (random init or another run's weights).
    step: `(state, batch) -> (state, metrics)` or `(state, metrics, aux)`, jitted; `batch` is what `data`
      yields on this process. metrics: device scalars including `bad_streak`; aux goes to `on_step`.
    data: this process's batches; a grain iterator (its position is checkpointed), endless or not.
    evaluate: optional `state -> dict of floats` run every `train.eval_every` steps and at the last step.
    on_step: optional host hook `(step, metrics as floats, aux)` after each step's metrics are read.
    tokens: optional `batch -> int`, this process's tokens in a batch (for tokens/s).
    max_bad_steps: stop after this many skipped updates in a row; bad_steps_flag names the config field.
    hint: appended to that stop's message (what to try).
    progress: metric names shown beside the progress bar.
    meta: JSON-able metadata saved with every checkpoint (the model config under "model").
    """
    abstract_state: Any
    init_state: Callable[[], Any]
    step: Callable
    data: Iterable
    max_bad_steps: int
    meta: Mapping[str, Any]
    evaluate: Optional[Callable[[Any], dict]] = None
    on_step: Optional[Callable[[int, dict, Any], None]] = None
    tokens: Optional[Callable[[Any], int]] = None
    bad_steps_flag: str = "train.max_bad_steps"
    hint: str = ""
    progress: tuple = ("loss",)


def mesh_and_rules(config):
    """The device mesh (`config.mesh.shape` over `config.mesh.axes`) and logical-axis rules of a run."""
    rules = sharding.rules_from_config(config.mesh.get("rules"))
    return sharding.make_mesh(config.mesh.shape, config.mesh.axes), rules


def check_streak(metrics: Mapping[str, Any], limit: int, step: int, flag: str = "train.max_bad_steps",
                 hint: str = "") -> None:
    """Raise `TrainingStopped` when `metrics["bad_streak"]` reached `limit` (updates skipped in a row)."""
    streak = int(metrics["bad_streak"])
    if streak >= limit:
        shown = ", ".join(f"{k}={float(metrics[k])}" for k in ("loss", "grad_norm", "skipped_total") if k in metrics)
        raise TrainingStopped(f"stopping at step {step}: the last {streak} updates had a non-finite loss, gradient "
                              f"or reward and were skipped ({shown}); {flag}={limit}. {hint}".rstrip())


def check_model(meta: Mapping[str, Any]) -> Callable[[dict, str], None]:
    """A `check_meta` for Checkpointer.restore: the saved model config must compute what `meta["model"]` does."""
    def check(saved: dict, where: str) -> None:
        if "model" in saved and "model" in meta:
            ModelConfig.from_dict(saved["model"]).check_same_model(ModelConfig.from_dict(meta["model"]),
                                                                   f"checkpoint {where}")
    return check


class _StopSignal:
    """Notices SIGTERM: JAX's preemption sync point with several processes (every host agrees on the step to
    save), a signal handler in a single process. On `close` the previous handler is back, and a SIGTERM the
    loop did not act on (one that came during the final save) is raised again, so the process still ends."""

    def __init__(self):
        self.received = self.handled = False
        self._installed = False
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def __call__(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self):
        if not self._installed:
            return
        # None: the previous handler was not installed from Python; the default action is the closest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
        if self.received and not self.handled:
            signal.raise_signal(signal.SIGTERM)


def run(config, workdir: str, program: Program):
    """Run `program` to `config.train.steps` steps (resuming from `workdir`); returns the final state.

    Reads `config.train` (steps, log_every, eval_every) and `config.checkpoint` (every_steps, max_to_keep,
    async_save). Raises `TrainingStopped` on a run of skipped updates and `Preempted` after saving on SIGTERM.
    """
    tc = config.train
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
                                   max_to_keep=config.checkpoint.max_to_keep,
                                   async_save=config.checkpoint.async_save)
    meta = dict(program.meta)
    data_iter = iter(program.data)
    stop = _StopSignal()
    log = None
    try:
        if ckpt.latest_step() is not None:
            state = ckpt.restore(program.abstract_state, data_iter=data_iter, check_meta=check_model(meta))
        else:
            state = program.init_state()
        start = int(state.step)
        log = MetricsLogger(workdir, total_steps=tc.steps, start_step=start, enabled=distributed.is_primary())
        if start:
            log.message(f"resumed from {ckpt.directory} at step {start}")

        def report(done, extra):
            """Host side of a finished step: stop on a run of skipped updates, log, advance the bar."""
            step, metrics, aux, tokens, seconds = done
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            check_streak(m, program.max_bad_steps, step, program.bad_steps_flag, program.hint)
            m["seconds"] = seconds
            if tokens:
                m["tokens_per_sec"] = tokens / max(seconds, 1e-9)
            if step % tc.log_every == 0 or extra or step == tc.steps:
                log.write(step, {**m, **extra})
            if program.on_step is not None:
                program.on_step(step, m, aux)
            shown = {k: f"{m[k]:.4f}" for k in program.progress if k in m}
            if tokens:
                shown["tok/s"] = f"{m['tokens_per_sec']:,.0f}"
            log.progress(1, shown)

        # A step's metrics are read one step late, so the host prepares batch s+1 while the device runs step s.
        pending = None
        last = time.perf_counter()
        for step in range(start + 1, tc.steps + 1):
            try:
                batch = next(data_iter)
            except StopIteration:
                log.message(f"training data exhausted after {step - 1} steps")
                break
            tokens = program.tokens(batch) * jax.process_count() if program.tokens else 0
            state, metrics, *aux = program.step(state, batch)
            if pending is not None:
                report(pending, {})
            now = time.perf_counter()
            pending, last = (step, metrics, aux[0] if aux else None, tokens, now - last), now
            extra = {}
            if program.evaluate is not None and tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                extra = program.evaluate(state)
            preempted = stop(step)
            if extra or preempted or ckpt.should_save(step) or step == tc.steps:
                report(pending, extra)  # logged before its checkpoint, so a resumed log has no gap
                pending = None
            ckpt.save(step, state, data_iter, meta, force=preempted)
            if preempted:
                ckpt.wait()
                stop.handled = True
                raise Preempted(step, ckpt.directory)
        if pending is not None:
            report(pending, {})
        ckpt.save(int(state.step), state, data_iter, meta, force=True)
        ckpt.wait()
    finally:
        if log is not None:
            log.close()
        ckpt.close()  # waits for a pending save
        stop.close()
    return state


def evaluate(eval_step, params, data: Iterable, num_batches: int, mesh, rules, *frozen) -> dict:
    """Token-weighted mean of the loss function's metrics over `num_batches` batches of `data`, plus perplexity.

    frozen: the frozen params, for an eval step built with them (lm.train_step.make_eval_step)."""
    sums, total = {}, 0.0
    for batch in itertools.islice(data, num_batches):
        m = jax.device_get(eval_step(params, sharding.global_batch(batch, mesh, rules), *frozen))
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
        init_params: Optional[Callable] = None, frozen=None):
    """Train `loss_fn` for `config.train.steps` steps through `run`; returns the final `TrainState`.

    loss_fn: `(params, batch, rng) -> (loss, metrics)` (lm.losses.lm_loss_fn for LM stages).
    build_params: `rng -> boxed params` (logically named), e.g. `functools.partial(lm.model.boxed_params, cfg)`.
    train_data: this process's batches (dicts of NumPy arrays); a grain IterDataset, so its position is
      checkpointed. eval_data: an iterable re-iterated from the start at each evaluation (make it repeat:
      every process must see `train.eval_batches` batches).
    meta: JSON-able metadata saved with every checkpoint (the model config under "model").
    init_params: `abstract_params -> params`, used instead of the random init when there is nothing to
      resume (e.g. SFT loading pretrained weights).
    frozen: a parameter-efficient run's `lm.peft.Frozen` (the base, never trained); build_params and the
      state then hold the trainable leaves only, and the loss sees both merged.
    """
    tc = config.train
    mesh, rules = mesh_and_rules(config)
    sharding.check_batch(tc.batch_size, tc.micro_batches, mesh, rules)
    tx, lr = optim.make_optimizer(config.optim, tc.steps)
    abstract, shardings = state_shardings(build_params, tx, mesh, rules)

    def fresh():
        params = None if init_params is None else init_params(abstract.params)
        return init_state(build_params, tx, jax.random.PRNGKey(config.seed), mesh, rules, params)[0]

    frozen_sh, extra = (None, ()) if frozen is None else (frozen.shardings, (frozen.params,))
    step_fn = make_train_step(loss_fn, tx, shardings, mesh, rules=rules, micro_batches=tc.micro_batches,
                              lr_schedule=lr, frozen_shardings=frozen_sh)
    eval_step = None if eval_data is None else make_eval_step(loss_fn, shardings.params, mesh, rules=rules,
                                                                frozen_shardings=frozen_sh)

    def evaluate_fn(state):
        return evaluate(eval_step, state.params, eval_data, tc.eval_batches, mesh, rules, *extra)
    program = Program(
        abstract_state=abstract, init_state=fresh, data=train_data, meta=dict(meta or {}),
        evaluate=None if eval_step is None else evaluate_fn,
        step=lambda state, batch: step_fn(state, sharding.global_batch(batch, mesh, rules), *extra),
        tokens=lambda batch: int(np.asarray(batch["inputs"]).size) if "inputs" in batch else 0,
        max_bad_steps=tc.max_bad_steps)
    return run(config, workdir, program)
