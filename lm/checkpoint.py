"""Orbax checkpoints of any train state, the data iterator's position and the run's metadata.

A state is a flax struct dataclass whose leaves are arrays and which has a `params` field (lm.train_step's
`TrainState`, rl.ppo_step's `PPOState`, or any new algorithm's). One step directory holds four items:
`params` (the parameters alone, so later stages load them without the optimiser), `train` (every other
field of the state: optimiser, step, RNG, counters, a KL coefficient...), `data` (grain iterator state, one
JSON file per process) and `meta` (JSON: model config, run config). Saves are asynchronous and atomic
(orbax writes to a temporary directory and renames it on commit); all processes take part in every save.

A committed checkpoint can still be damaged later (a truncated copy, a full disk on another tool's write):
resuming then names it, moves it aside as `STEP.damaged` and continues from the newest step that reads back
on every process; readers (`load_params`, `load_meta`) skip it with the same warning and rename nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Optional

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lm import distributed

log = logging.getLogger(__name__)


def _handlers():
    return {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
            "data": grain_ckpt.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _manager(directory: str, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(directory), item_handlers=_handlers(),
                                 options=ocp.CheckpointManagerOptions(**options))


def _train_item(state) -> dict:
    """Every field of `state` but its params."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "params"}


def _with_sharding(abstract):
    """Give leaves without a sharding the first local device (orbax would otherwise reuse the saved layout,
    which fails when the checkpoint came from another topology, e.g. a multi-process run)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: a if getattr(a, "sharding", None) is not None
                        else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def check_shapes(saved, expected, where: str) -> None:
    """Raise a ValueError naming every tensor whose saved shape differs from (or is missing in) `expected`."""
    def flat(tree):
        return {"params" + jax.tree_util.keystr(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    have, want = flat(saved), flat(expected)
    problems = [f"{k}: checkpoint has shape {have[k]}, the model expects {want[k]}"
                for k in sorted(want) if k in have and have[k] != want[k]]
    problems += [f"{k}: missing from the checkpoint (model expects {want[k]})" for k in sorted(set(want) - set(have))]
    problems += [f"{k}: in the checkpoint {have[k]} but not in the model" for k in sorted(set(have) - set(want))]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"checkpoint {where} does not fit this model (another model shape?):\n  "
                         + "\n  ".join(problems[:5]) + more)


class CheckpointError(RuntimeError):
    """No checkpoint of a directory reads back."""


class CheckpointMismatch(ValueError):
    """The checkpoint is intact but belongs to another model: an error of the run's config, not damage."""


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _check_fits(mngr: ocp.CheckpointManager, step: int, abstract_params, where: str,
                check: Optional[Callable[[], None]] = None) -> None:
    """Raise CheckpointMismatch when the readable checkpoint `step` is not this model's (`check`, then the
    params' shapes); unreadable metadata raises as it is, which counts as damage."""
    saved = mngr.item_metadata(step)["params"].tree
    try:
        if check is not None:
            check()
        check_shapes(saved, abstract_params, where)
    except ValueError as e:
        raise CheckpointMismatch(str(e)) from None


def _all_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (each one reads its own files, so damage can be local)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def _set_aside(directory: str, step: int) -> str:
    """Rename a damaged step directory out of orbax's view (process 0), keeping it for a look."""
    target = os.path.join(directory, f"{step}.damaged")
    n = 1
    while os.path.exists(target):
        target, n = os.path.join(directory, f"{step}.damaged.{n}"), n + 1
    if distributed.is_primary():
        os.replace(os.path.join(directory, str(step)), target)
    distributed.barrier(f"damaged_checkpoint_{step}")
    return target


def _newest_intact(mngr: ocp.CheckpointManager, directory: str, read: Callable[[int], Any],
                   step: Optional[int] = None, set_aside: bool = False):
    """`(step, read(step))` for `step`, or else the newest step that reads back on every process.

    A newer step that fails to read (truncated JSON, missing arrays) while an older one reads back is damaged:
    named in a warning and, with `set_aside` (the run that owns the directory), renamed `STEP.damaged` so the
    run can write that step again. When no step reads back nothing is renamed: the same error on every step
    is a problem of this run (another process count, another data pipeline), raised with the newest's error.
    """
    steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no committed checkpoint in {directory}")
    failed = []
    for s in steps:
        try:
            value, error = read(s), None
        except CheckpointMismatch:
            raise
        except Exception as e:  # orbax, tensorstore and grain raise many types for unreadable files
            value, error = None, e
        if _all_ok(error is None):
            for bad, e in failed:
                log.warning("checkpoint %s/%d is damaged (%s: %s); resuming from step %d", directory, bad,
                            type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", s)
                if set_aside:
                    _set_aside(directory, bad)
            if failed and set_aside:
                mngr.reload()
            return s, value
        failed.append((s, error or RuntimeError("unreadable on another process")))
    s, e = failed[0]
    raise CheckpointError(f"no checkpoint in {directory} reads back (steps {[f for f, _ in failed]}); the newest, "
                       f"{s}, fails with {type(e).__name__}: {e}") from e


class Checkpointer:
    """Saves every `every_steps` steps (and when forced), keeps the last `max_to_keep`, restores any of them."""

    def __init__(self, directory: str, *, every_steps: int = 0, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
        self._saved = set()
        self._mngr = _manager(self.directory, max_to_keep=max_to_keep, create=True,
                              enable_async_checkpointing=async_save, cleanup_tmp_directories=True)

    def latest_step(self) -> Optional[int]:
        """The newest committed step, or None."""
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state, data_iter=None, meta: Optional[Mapping[str, Any]] = None,
             force: bool = False) -> bool:
        """Save `state` (and the iterator position and metadata) as `step` if due or `force`; returns saved?"""
        if not (force or self.should_save(step)) or step in self._saved or step in self._mngr.all_steps():
            return False
        self._saved.add(step)
        items = {"params": ocp.args.StandardSave(state.params), "train": ocp.args.StandardSave(_train_item(state)),
                 "meta": ocp.args.JsonSave(dict(meta or {}))}
        if data_iter is not None:
            items["data"] = grain_ckpt.CheckpointSave(data_iter)
        return self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, step: Optional[int] = None, data_iter=None,
                check_meta: Optional[Callable[[dict, str], None]] = None):
        """The state saved at `step` (default: the newest intact one) laid out as `abstract_state` says.

        abstract_state: the state's type filled with `jax.ShapeDtypeStruct`s that carry shardings (any mesh;
        see lm.train_step.state_shardings). When `data_iter` is given its position is restored in place.
        check_meta: `f(saved_meta, where)` raising a ValueError when the checkpoint does not belong to this
        run (e.g. another model config); it is not mistaken for damage.
        """
        def read(s):
            where = f"{self.directory}/{s}"
            meta = _read_meta(self._mngr, s)
            _check_fits(self._mngr, s, abstract_state.params, where,
                        None if check_meta is None else lambda: check_meta(meta, where))
            items = {"params": ocp.args.StandardRestore(abstract_state.params),
                     "train": ocp.args.StandardRestore(_train_item(abstract_state))}
            if data_iter is not None:
                items["data"] = grain_ckpt.CheckpointRestore(data_iter)
            out = self._mngr.restore(s, args=ocp.args.Composite(**items))
            return type(abstract_state)(params=out["params"], **out["train"])

        _, state = _newest_intact(self._mngr, self.directory, read, step, set_aside=True)
        return state

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def latest_step(directory: str) -> Optional[int]:
    """Newest committed step in a checkpoint directory (None if there is none)."""
    if not os.path.isdir(directory):
        return None
    mngr = _manager(directory, create=False)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def _read(directory: str, read: Callable[[ocp.CheckpointManager, int], Any], step: Optional[int]):
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    mngr = _manager(directory, create=False)
    try:
        return _newest_intact(mngr, directory, lambda s: read(mngr, s), step)[1]
    finally:
        mngr.close()


def load_params(directory: str, abstract_params, step: Optional[int] = None):
    """Only the parameters of a checkpoint (e.g. SFT starting from pretraining), laid out as `abstract_params`.

    directory: a run's checkpoint directory (`WORKDIR/checkpoints`); a clear error if it holds none or if
    the saved tensors do not have the shapes of `abstract_params`. Leaves of `abstract_params` without a
    sharding are loaded onto the first local device. Without `step`, the newest intact checkpoint.
    """
    def read(mngr, s):
        _check_fits(mngr, s, abstract_params, f"{directory}/{s}")
        target = ocp.args.StandardRestore(_with_sharding(abstract_params))
        return mngr.restore(s, args=ocp.args.Composite(params=target))["params"]

    return _read(directory, read, step)


def load_meta(directory: str, step: Optional[int] = None) -> dict:
    """The JSON metadata (model config, run config) of a checkpoint directory's `step` (default: newest)."""
    return _read(directory, _read_meta, step)
