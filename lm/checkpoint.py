"""Orbax checkpoints of a train state, the data iterator's position and the run's metadata.

One step directory holds four items: `params` (the parameters alone, so later stages can load them without
the optimiser), `train` (optimiser state, step, RNG, skip counters), `data` (grain iterator state, one JSON
file per process) and `meta` (JSON: model config, run config). Saves are asynchronous and atomic (orbax
writes to a temporary directory and renames it on commit); all processes take part in every save.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp

from lm.train import TrainState


def _handlers():
    return {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
            "data": grain_ckpt.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _manager(directory: str, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(directory), item_handlers=_handlers(),
                                 options=ocp.CheckpointManagerOptions(**options))


def _train_item(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng, "skipped": state.skipped,
            "bad_streak": state.bad_streak}


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

    def save(self, step: int, state: TrainState, data_iter=None, meta: Optional[Mapping[str, Any]] = None,
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

    def restore(self, abstract_state: TrainState, step: Optional[int] = None, data_iter=None) -> TrainState:
        """The state saved at `step` (default: latest) laid out as `abstract_state` says (any mesh).

        abstract_state: `jax.ShapeDtypeStruct`s with shardings (see lm.train.state_shardings). When
        `data_iter` is given its position is restored in place.
        """
        step = self.latest_step() if step is None else step
        where = f"{self.directory}/{step}"
        check_shapes(self._mngr.item_metadata(step)["params"].tree, abstract_state.params, where)
        items = {"params": ocp.args.StandardRestore(abstract_state.params),
                 "train": ocp.args.StandardRestore(_train_item(abstract_state))}
        if data_iter is not None:
            items["data"] = grain_ckpt.CheckpointRestore(data_iter)
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return TrainState(params=out["params"], **out["train"])

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


def load_params(directory: str, abstract_params, step: Optional[int] = None):
    """Only the parameters of a checkpoint (e.g. SFT starting from pretraining), laid out as `abstract_params`.

    directory: a run's checkpoint directory (`WORKDIR/checkpoints`); a clear error if it holds none or if
    the saved tensors do not have the shapes of `abstract_params`. Leaves of `abstract_params` without a
    sharding are loaded onto the first local device.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    mngr = _manager(directory, create=False)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {directory}")
        check_shapes(mngr.item_metadata(step)["params"].tree, abstract_params, f"{directory}/{step}")
        target = ocp.args.StandardRestore(_with_sharding(abstract_params))
        return mngr.restore(step, args=ocp.args.Composite(params=target))["params"]
    finally:
        mngr.close()


def load_meta(directory: str, step: Optional[int] = None) -> dict:
    """The JSON metadata (model config, run config) of a checkpoint directory's `step` (default: latest)."""
    directory = os.path.abspath(directory)
    mngr = _manager(directory, create=False)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {directory}")
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mngr.close()
