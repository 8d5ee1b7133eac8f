"""The optax wrapper that turns any optimizer into a sparse one.

``sparse_transform(inner, rule, key=...)`` returns an optax ``GradientTransformationExtraArgs``
whose state (:class:`SparseState`) holds the masks, the inner optimizer's state, a step
counter, a PRNG key and per-algorithm extras. Each ``update``:

1. lets the rule accumulate per-step statistics (e.g. SNFS's gradient momentum);
2. on an update step (``rule.is_update_step(count)``, under ``lax.cond``, so a plain step
   pays almost nothing for it) computes new masks from the *dense* gradients, params and
   key; when any gradient is non-finite the masks keep their previous value for that step,
   so they are never corrupted (the weight update itself is the inner optimizer's business: wrap the
   whole transform in ``optax.apply_if_finite`` to skip it too);
3. zeroes, in every param-shaped leaf of the inner state (``optax.tree.map_params``), the
   entries of weights that were just grown, then runs the inner optimizer on gradients
   masked by the current (pre-update) masks: a grown weight's gradient is masked to zero,
   so its moments are zero after the step too;
4. emits ``updates`` with ``params + updates == where(kept, params + inner_updates, 0)``
   where ``kept = old_mask & new_mask``: kept weights take the inner update unchanged,
   dropped and grown weights become exactly zero.

So after ``optax.apply_updates`` the params are exactly sparse after every step, with no
second call to remember. The whole step is one traced computation: schedules and traced
counts never retrace it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsparse.masks import Masks, PyTree, map_masked, validate_masks
from jaxsparse.topology import count_true


class SparseState(NamedTuple):
    """State of a sparse optimizer.

    Attributes:
      masks: bool mask per prunable leaf (``None`` for dense leaves).
      inner_state: the wrapped optimizer's state.
      count: ``int32[]`` number of updates taken.
      key: PRNG key; update ``t`` uses ``fold_in(key, t)``.
      ever_active: union of all masks so far (for the ITOP rate), or ``None`` if untracked.
      extra: algorithm state (e.g. SNFS momentum), ``()`` when the rule has none.
    """

    masks: Masks
    inner_state: optax.OptState
    count: jax.Array
    key: jax.Array
    ever_active: Masks | None
    extra: Any


class UpdateInputs(NamedTuple):
    """What a mask-update rule sees at a topology update.

    ``grads`` are the dense gradients the user passed (RigL grows by them); ``params`` are
    the current, masked params; ``key`` is fresh for this step.
    """

    masks: Masks
    params: PyTree
    grads: PyTree
    step: jax.Array
    key: jax.Array
    extra: Any


def _no_extra(params, masks):
    del params, masks
    return ()


class SparsityRule(NamedTuple):
    """An algorithm, as four pure functions.

    Attributes:
      init_masks: ``(params, key) -> masks``: the initial masks (params give shapes).
      is_update_step: ``step -> bool[]``: whether step ``t`` changes the topology.
      update_masks: ``UpdateInputs -> (masks, extra)``: the new topology.
      init_extra: ``(params, masks) -> extra``: initial algorithm state.
      accumulate: optional ``(extra, grads, masks) -> extra`` run at every step.
    """

    init_masks: Callable[[PyTree, jax.Array], Masks]
    is_update_step: Callable[[jax.Array], jax.Array]
    update_masks: Callable[[UpdateInputs], tuple[Masks, Any]]
    init_extra: Callable[[PyTree, Masks], Any] = _no_extra
    accumulate: Callable[[Any, PyTree, Masks], Any] | None = None


def _all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf is finite. Counted by matrix products
    (``topology.count_true``), not reductions: each reduction in the topology branch costs
    every step a little on CPU, taken or not."""
    bad = [jnp.minimum(count_true(~jnp.isfinite(x)), 1) for x in jax.tree.leaves(tree)]
    return sum(bad) == 0 if bad else jnp.asarray(True)


def reset_moments(inner: optax.GradientTransformation, inner_state, grown: Masks):
    """Zeroes the entries of ``grown`` weights in every param-shaped leaf of ``inner_state``.

    Works for any optax optimizer (chain, inject_hyperparams, MultiSteps, ...) through
    ``optax.tree.map_params``. Leaves whose shape differs from the param (factored second
    moments, e.g. Adafactor's row/column statistics) cannot be reset per weight and are kept.
    """

    def reset(v, g):
        if g is None or not hasattr(v, "shape") or v.shape != g.shape:
            return v
        return jnp.where(g, jnp.zeros((), v.dtype), v)

    return optax.tree.map_params(inner, reset, inner_state, grown)


def _rewrites_extra(propose, masks, extra) -> bool:
    """Whether ``propose(masks, extra) -> (masks, extra)`` returns an ``extra`` other than
    its input, leaf for leaf (traced once, abstractly; no tracing for an empty ``extra``)."""
    n_extra = len(jax.tree.leaves(extra))
    if not n_extra:
        return False
    jaxpr = jax.make_jaxpr(propose)(masks, extra).jaxpr
    extra_in = jaxpr.invars[len(jaxpr.invars) - n_extra:]
    extra_out = jaxpr.outvars[len(jaxpr.outvars) - n_extra:]
    return len(extra_out) != n_extra or any(o is not i for o, i in zip(extra_out, extra_in))


def _masked_updates(old, new, u, p):
    kept = old & new
    return jnp.where(kept, u, -p.astype(u.dtype))


def sparse_transform(
    inner: optax.GradientTransformation,
    rule: SparsityRule,
    *,
    key: jax.Array,
    track_itop: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that its params stay exactly sparse under ``rule``.

    Args:
      inner: any optax gradient transformation.
      rule: the algorithm (see :class:`SparsityRule`); the public factories (``rigl``,
        ``set``, ...) build one.
      key: PRNG key for the initial masks and random choices (``jax.random.key(0)``).
      track_itop: keep the union of all masks in the state (one bool per prunable weight)
        for the in-time over-parameterisation rate.

    Returns:
      A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

    Example:
      >>> tx = jaxsparse.sparse_transform(optax.adam(1e-3), my_rule, key=jax.random.key(0))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grads, state, params)
    """
    if not isinstance(rule, SparsityRule):
        raise TypeError(f"rule must be a jaxsparse.SparsityRule, got {type(rule).__name__}")
    if key is None:
        raise ValueError("key must be a PRNG key, e.g. key=jax.random.key(0); got None")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        masks = rule.init_masks(params, key)
        validate_masks(masks, params)
        return SparseState(
            masks=masks,
            inner_state=inner.init(params),
            count=jnp.zeros((), jnp.int32),
            # A copy: a train step that donates its state must not delete the caller's key.
            key=jnp.copy(key),
            ever_active=map_masked(jnp.copy, masks) if track_itop else None,
            extra=rule.init_extra(params, masks),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "jaxsparse optimizers need the params: call tx.update(grads, state, params)"
            )
        grads = updates
        step = state.count
        extra = state.extra
        if rule.accumulate is not None:
            extra = rule.accumulate(extra, grads, state.masks)

        def propose(masks, extra):
            key = jax.random.fold_in(state.key, step)
            return rule.update_masks(UpdateInputs(masks, params, grads, step, key, extra))

        # The topology update runs under lax.cond. The algorithm state goes through the cond
        # only when the rule rewrites it: a rule that returns ``extra`` untouched, as all
        # built-in ones do, keeps it out (XLA would copy SNFS's momentum on every step).
        masks = state.masks
        rewrites_extra = _rewrites_extra(propose, masks, extra)

        def topology(masks, extra, ever):
            proposed, new_extra = propose(masks, extra)
            # Non-finite gradients: the masks (and extra) keep their value for this step.
            finite = _all_finite(grads)
            new_masks = map_masked(lambda new, old: jnp.where(finite, new, old), proposed, masks)
            if ever is not None:
                ever = map_masked(jnp.logical_or, ever, new_masks)
            if not rewrites_extra:
                return new_masks, ever, ()
            return new_masks, ever, jax.tree.map(
                lambda a, b: jnp.where(finite, a, b), new_extra, extra)

        def keep(masks, extra, ever):
            return masks, ever, (extra if rewrites_extra else ())

        new_masks, ever, cond_extra = jax.lax.cond(
            rule.is_update_step(step), topology, keep, masks, extra, state.ever_active
        )
        if rewrites_extra:
            extra = cond_extra
        # Gradients of inactive weights never reach the inner optimizer.
        masked = map_masked(lambda m, g: jnp.where(m, g, jnp.zeros((), g.dtype)), masks, grads)
        # Grown weights were inactive, so their masked gradient is zero: zeroing their
        # moments *before* the inner step leaves them zero after it (any optimizer whose
        # state update maps zero state and zero gradient to zero state: momentum, Adam,
        # RMSProp, Adagrad, Lion, MultiSteps, ...). Done before rather than after, XLA fuses
        # the reset into the moment update and writes the moments in place: resetting after
        # made it keep a copy of the old moments on every step (the updates are computed
        # from the pre-reset moments).
        grown = map_masked(lambda old, new: new & ~old, masks, new_masks)
        inner_state = reset_moments(inner, state.inner_state, grown)
        inner_updates, inner_state = inner.update(masked, inner_state, params, **extra_args)
        out = map_masked(
            _masked_updates, masks, new_masks, inner_updates, params, dense=lambda n, u, p: u
        )
        return out, SparseState(new_masks, inner_state, step + 1, state.key, ever, extra)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_sparse_states(state) -> list[SparseState]:
    """All :class:`SparseState` nodes inside an optimizer state (chain, inject, MultiSteps)."""
    found = []

    def visit(x):
        if isinstance(x, SparseState):
            found.append(x)
            return True
        return False

    jax.tree.leaves(state, is_leaf=visit)
    return found


def _unwrap_variables(tree):
    # Flax NNX wraps optimizer-state arrays in Variables; masks come back as plain arrays.
    return jax.tree.map(
        lambda x: x if x is None or not hasattr(x, "get_value") else x.get_value(),
        tree,
        is_leaf=lambda x: x is None or hasattr(x, "get_value"),
    )


def get_sparse_state(state) -> SparseState:
    """The unique :class:`SparseState` inside ``state``; a clear error if none or several."""
    found = find_sparse_states(state)
    if not found:
        raise ValueError(
            "no jaxsparse SparseState found in this optimizer state; was the optimizer built "
            "with a jaxsparse algorithm (e.g. jaxsparse.rigl(optax.adam(1e-3), ...))?"
        )
    if len(found) > 1:
        raise ValueError(
            f"found {len(found)} SparseStates in this optimizer state; pass the one you "
            "mean (e.g. state[1]) to get_masks"
        )
    return found[0]


def get_masks(state) -> Masks:
    """The masks of the sparse optimizer found anywhere inside ``state``.

    Example:
      >>> params = jaxsparse.apply_masks(params, jaxsparse.get_masks(opt_state))
    """
    return _unwrap_variables(get_sparse_state(state).masks)


def get_ever_active(state) -> Masks:
    """The union of all masks so far (for :func:`jaxsparse.metrics.itop_rate`)."""
    ever = get_sparse_state(state).ever_active
    if ever is None:
        raise ValueError("this optimizer was built with track_itop=False")
    return _unwrap_variables(ever)
