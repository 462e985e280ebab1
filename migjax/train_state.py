"""The train state (a plain pytree orbax saves directly) and the optimizer that updates it."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: updates attempted so far
    params: dict  # {name: array}, see migjax.models.split
    opt_state: optax.OptState
    skips: jax.Array  # int32 scalar: consecutive updates skipped for non-finite values


def make_optimizer(*, lr: float, warmup_steps: int = 0, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, grad_clip: float = 1.0
                   ) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a linear warm-up to a constant learning rate."""
    sched = (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0
             else optax.constant_schedule(lr))
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    chain.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*chain)


def init_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jnp.zeros((), jnp.int32))


def state_shardings(state: TrainState, mesh):
    """Each leaf's sharding, with unsharded leaves (counters) replicated over the mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else rep,
                        state)


def place_state(state: TrainState, mesh) -> tuple[TrainState, object]:
    """(state on the mesh, its shardings): pass the shardings to the jitted steps."""
    sh = state_shardings(state, mesh)
    return jax.device_put(state, sh), sh


def apply_if_finite(state: TrainState, grads, loss, optimizer) -> tuple[TrainState, jax.Array]:
    """One optimizer step, skipped (parameters and moments unchanged) when the loss or any
    gradient is not finite. Returns the new state and whether the step was applied."""
    leaves = jax.tree.leaves(grads)
    ok = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
    safe = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, new_opt = optimizer.update(safe, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return TrainState(state.step + 1, keep(new_params, state.params),
                      keep(new_opt, state.opt_state),
                      jnp.where(ok, 0, state.skips + 1).astype(jnp.int32)), ok
