"""Train state and the generic sharded train step: `state, metrics = step(state, batch)`.

The step knows nothing about the objective: it takes `loss_fn(params, batch, rng) -> (loss, metrics)`, so
pretraining, SFT, the reward model and DPO all reuse it. Inside: gradient accumulation over micro-batches
(`lax.scan`), global-norm clipping and AdamW (lm.optim), and a guard that skips any update whose loss or
gradients are not finite, counting it in the state.

If `metrics` has a `weight` entry (e.g. the number of counted tokens), micro-batches are averaged with
those weights, so accumulating k micro-batches gives the gradient of the whole batch's mean loss.
The loop around this step lives in lm.loop.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from lm import peft, sharding

# `(params, batch, rng) -> (loss, metrics)`; rng is None in evaluation (a loss with dropout then turns it off).
LossFn = Callable[[Any, Mapping[str, jax.Array], Optional[jax.Array]], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; all leaves are arrays, so the state checkpoints as one pytree.

    step: number of batches consumed (int32 scalar), including skipped updates.
    params: float32 parameters (unboxed).
    opt_state: optax state of the transformation the step was built with.
    rng: PRNG key (uint32 [2]); split once per step.
    skipped: total updates skipped for non-finite loss or gradients.
    bad_streak: skipped updates in a row (0 after any good step).
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    bad_streak: jax.Array


def _build_state(build_params: Callable, tx: optax.GradientTransformation, rng, params=None) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = build_params(init_rng) if params is None else params
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=state_rng, skipped=zero,
                      bad_streak=zero)


def state_shardings(build_params: Callable, tx, mesh: Mesh, rules=sharding.RULES):
    """`(abstract_state, shardings)` of the train state, from `jax.eval_shape` of the boxed init.

    build_params: `rng -> params` with logically named (boxed) leaves, e.g. `Transformer(cfg).init(...)`.
    abstract_state holds unboxed `jax.ShapeDtypeStruct`s that carry their sharding (restore targets).
    """
    boxed = jax.eval_shape(lambda r: _build_state(build_params, tx, r), jax.random.PRNGKey(0))
    shardings = sharding.tree_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                            shardings)
    return abstract, shardings


def init_state(build_params: Callable, tx, rng, mesh: Mesh, rules=sharding.RULES,
               params=None) -> tuple[TrainState, Any]:
    """A new sharded train state (each device builds only its shards) and its shardings.

    params: start from these (unboxed) parameters instead of a random init, e.g. pretrained weights.
    """
    _, shardings = state_shardings(build_params, tx, mesh, rules)
    with jax.set_mesh(mesh):
        if params is None:
            build = jax.jit(lambda r: nn.unbox(_build_state(build_params, tx, r)), out_shardings=shardings)
            return build(rng), shardings
        params = jax.device_put(params, shardings.params)
        build = jax.jit(lambda r, p: _build_state(build_params, tx, r, p), out_shardings=shardings)
        return build(rng, params), shardings


def split_micro_batches(batch, k: int, rules=sharding.RULES):
    """`[B, ...] -> [k, B/k, ...]`, micro-batch j taking rows j, j+k, ...: each stays spread over all shards."""
    axes = sharding.batch_axes(rules) or None

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, P(None, axes, *([None] * (x.ndim - 2))))

    return jax.tree.map(split, batch)


def _weighted_grads(loss_fn: LossFn, params, batch, rng, micro_batches: int, rules):
    """Gradients and metrics of the whole batch, accumulated over `micro_batches` with `lax.scan`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (_, metrics), grads = grad_fn(params, batch, rng)
        return grads, metrics

    micro = split_micro_batches(batch, micro_batches, rules)

    def body(carry, xs):
        g_sum, m_sum, w_sum = carry
        i, mb = xs
        (_, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        w = m.get("weight", jnp.float32(1.0))
        g_sum = jax.tree.map(lambda a, b: a + w * b.astype(a.dtype), g_sum, g)
        m_sum = {k: m_sum[k] + w * m[k] for k in m_sum}
        return (g_sum, m_sum, w_sum + w), None

    first = jax.tree.map(lambda x: x[0], micro)
    m_shape = jax.eval_shape(lambda: loss_fn(params, first, rng)[1])
    m0 = {k: jnp.zeros(v.shape, jnp.float32) for k, v in m_shape.items() if k != "weight"}
    g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (g_sum, m_sum, w_sum), _ = jax.lax.scan(body, (g0, m0, jnp.float32(0.0)),
                                            (jnp.arange(micro_batches), micro))
    denom = jnp.maximum(w_sum, 1e-12)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    metrics = {k: v / denom for k, v in m_sum.items()}
    if "weight" in m_shape:
        metrics["weight"] = w_sum
    return grads, metrics


def with_frozen(loss_fn: LossFn) -> Callable:
    """`(params, batch, rng, frozen) -> loss_fn(frozen + params, batch, rng)`: the model's whole param tree is
    the frozen leaves (a parameter-efficient run's base, lm.peft) merged with the trainable ones."""
    return lambda params, batch, rng, frozen: loss_fn(peft.merge(frozen, params), batch, rng)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, shardings, mesh: Mesh, *,
                    rules=sharding.RULES, micro_batches: int = 1, lr_schedule: Optional[optax.Schedule] = None,
                    donate: bool = True, frozen_shardings=None) -> Callable:
    """`step(state, batch) -> (state, metrics)`, jitted with the state's shardings and donated state.

    `step.lower(abstract_state, abstract_batch)` lowers it without running (ahead-of-time checks).
    With `frozen_shardings` (a parameter-efficient run) it is `step(state, batch, frozen)`: `frozen` is a
    param tree laid out so, never donated or written, and the loss sees it merged with the state's params;
    gradients and optimiser moments exist for the state's (trainable) params only.

    loss_fn: `(params, batch, rng) -> (loss, metrics)`; metrics are scalars, optionally with `weight`.
    shardings: the state's shardings (from `init_state`); batch arrays are split along `batch` over the
      mesh. The step adds `grad_norm`, `lr` (when `lr_schedule` is given), `skipped` (1 if this update was
      dropped for a non-finite loss/gradient), `skipped_total` and `bad_streak` to the metrics.
    """

    def step(state: TrainState, batch, *frozen):
        rng, step_rng = jax.random.split(state.rng)
        fn = functools.partial(with_frozen(loss_fn), frozen=frozen[0]) if frozen else loss_fn
        grads, metrics = _weighted_grads(fn, state.params, batch, step_rng, micro_batches, rules)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        # A non-finite update leaves params and optimiser state (moments, schedule count) as they were.
        # optax.apply_if_finite would too, but applies the update anyway after N bad steps; we stop instead.
        # lax.cond, not a select: a select would read and write every parameter twice on good steps.
        params, opt_state = jax.lax.cond(ok, update, lambda _: (state.params, state.opt_state), None)
        bad = (~ok).astype(jnp.int32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                               skipped=state.skipped + bad, bad_streak=(state.bad_streak + 1) * bad)
        metrics = dict(metrics, grad_norm=grad_norm, skipped=bad, skipped_total=new_state.skipped,
                       bad_streak=new_state.bad_streak)
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step - state.skipped)
        return new_state, metrics

    extra = () if frozen_shardings is None else (frozen_shardings,)
    return _JitPerBatchStructure(step, shardings, mesh, rules, donate=(0,) if donate else (), extra=extra)


def make_eval_step(loss_fn: LossFn, params_shardings, mesh: Mesh, *, rules=sharding.RULES,
                   frozen_shardings=None) -> Callable:
    """`eval_step(params, batch[, frozen]) -> metrics`: the loss function's metrics with `rng=None` (no
    dropout), jitted, nothing donated; with `frozen_shardings` the loss sees `frozen` merged with `params`
    (see make_train_step)."""

    def step(params, batch, *frozen):
        fn = with_frozen(loss_fn) if frozen else loss_fn
        return fn(params, batch, None, *frozen)[1]

    extra = () if frozen_shardings is None else (frozen_shardings,)
    return _JitPerBatchStructure(step, params_shardings, mesh, rules, extra=extra)


class _JitPerBatchStructure:
    """`fn(first, batch, *extra)` jitted once per batch structure (keys and ranks), under the mesh and rules.

    Calling it runs the step; `.lower(first, batch, *extra)` lowers it for abstract inputs (no allocation),
    e.g. to check that a real-size step traces and partitions on a mesh.
    """

    def __init__(self, fn, first_shardings, mesh, rules, donate=(), extra=()):
        self.fn, self.first_shardings, self.mesh, self.rules = fn, first_shardings, mesh, rules
        self.donate, self.extra, self._jitted = donate, extra, {}

    def _traced(self, *args):
        with nn.logical_axis_rules(self.rules):
            return self.fn(*args)

    def _get(self, batch):
        key = tuple(sorted((k, len(v.shape)) for k, v in batch.items()))
        if key not in self._jitted:
            batch_sh = {k: sharding.batch_sharding(self.mesh, nd, self.rules) for k, nd in key}
            out = (self.first_shardings, None) if self.donate else None
            self._jitted[key] = jax.jit(self._traced, in_shardings=(self.first_shardings, batch_sh, *self.extra),
                                        out_shardings=out, donate_argnums=self.donate)
        return self._jitted[key]

    def __call__(self, first, batch, *rest):
        with jax.set_mesh(self.mesh):
            return self._get(batch)(first, batch, *rest)

    def lower(self, first, batch, *rest):
        with jax.set_mesh(self.mesh):
            return self._get(batch).lower(first, batch, *rest)
