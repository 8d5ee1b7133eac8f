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
3. with ``kept = old_mask & new_mask`` (the weights active before and after the step),
   zeroes, in every param-shaped leaf of the inner state (``optax.tree.map_params``), the
   entries of every weight outside ``kept`` (just grown, just dropped or inactive), then
   runs the inner optimizer on gradients masked by ``kept``: such a weight's gradient is
   zero, so its moments are zero after the step too (grown weights start from zero
   moments; inactive weights hold none);
4. emits ``updates`` with ``params + updates == where(kept, params + inner_updates, 0)``:
   kept weights take the inner update unchanged, dropped and grown weights become exactly
   zero.

One mask, ``kept``, computed on the packed bits, is all a step reads: on a plain step
(``new == old``) each param-sized leaf is read once with one mask, as under ``static``.
Every select on it combines bits (:func:`jaxsparse.bitmask.select`), which XLA:CPU
vectorizes.

So after ``optax.apply_updates`` the params are exactly sparse after every step, with no
second call to remember. The whole step is one traced computation: schedules and traced
counts never retrace it.

Host-scheduled updates: ``tx.update(grads, state, params, topology_update=False)`` (a
Python bool, static under ``jit``) compiles the plain step without the ``lax.cond``, and
``True`` the update step without it; :func:`topology_due` gives the flag for a step count
from the rule's own schedule. The same computation (the contract suite holds every
algorithm's runs equal bit for bit; in a larger program XLA may fuse the surrounding
gradient pass differently without the cond: float32 rounding). A ``lax.cond`` that reads
every gradient is a scheduling barrier: no leaf's update can start before the last gradient
is computed, which on a CPU cost a full train step of a memory-bound MLP 1.2-1.8x in
BENCHMARKS.md's measurements (no leaf's update runs while its gradient is still in cache),
and an accelerator runtime may read the predicate on the host. On XLA:CPU a program that
holds the update branch also runs its plain steps slower, the branch untaken (BENCHMARKS.md,
"What the in-step cond costs"). Two compiled programs, chosen on the host each step, have
none of these.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import bitmask
from jaxsparse.bitmask import PackedMask
from jaxsparse.layermap import map_groups
from jaxsparse.masks import (
    Masks,
    PyTree,
    is_mask_leaf,
    map_masked,
    path_to_str,
    validate_prunable_masks,
)
from jaxsparse.sharding import auto_axes_like, like_params
from jaxsparse.topology import count_true


class SparseState(NamedTuple):
    """State of a sparse optimizer.

    Attributes:
      masks: per prunable leaf a :class:`jaxsparse.bitmask.PackedMask` (one bit per
        weight), ``None`` for dense leaves; :func:`get_masks` gives them as bool arrays.
      inner_state: the wrapped optimizer's state.
      count: ``int32[]`` number of updates taken.
      key: PRNG key; update ``t`` uses ``fold_in(key, t)``.
      ever_active: union of all masks so far (packed, for the ITOP rate), or ``None`` if
        untracked.
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

    ``masks`` are the current masks, bit-packed (:class:`jaxsparse.bitmask.PackedMask`;
    ``jaxsparse.bitmask.unpack_tree`` gives bool arrays, and :func:`jaxsparse.layerwise`
    hands a per-layer rule one unpacked layer at a time). ``grads`` are the dense gradients
    the user passed (RigL grows by them); ``params`` are the current, masked params;
    ``key`` is fresh for this step.
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
    """An algorithm, as pure functions.

    Attributes:
      init_masks: ``(params, key) -> masks``: the initial bool masks (params give shapes).
      is_update_step: ``step -> bool[]``: whether step ``t`` changes the topology.
      update_masks: ``UpdateInputs -> masks``: the new topology, as bool arrays or
        :class:`~jaxsparse.bitmask.PackedMask` leaves (``None`` for dense leaves).
      init_extra: ``(params, masks) -> extra``: initial algorithm state.
      accumulate: optional ``(extra, grads, masks) -> extra`` run at every step (``masks``
        packed).
      update_extra: optional ``(UpdateInputs, new_masks) -> extra`` run at topology updates
        only (``new_masks`` packed). Without it the algorithm state never enters the update
        branch, so a plain step does not copy it.
    """

    init_masks: Callable[[PyTree, jax.Array], Masks]
    is_update_step: Callable[[jax.Array], jax.Array]
    update_masks: Callable[[UpdateInputs], Masks]
    init_extra: Callable[[PyTree, Masks], Any] = _no_extra
    accumulate: Callable[[Any, PyTree, Masks], Any] | None = None
    update_extra: Callable[[UpdateInputs, Masks], Any] | None = None


def all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf is finite (one count per leaf, leaves of a shape
    sharing one compiled count: see :func:`jaxsparse.map_layers`)."""
    # Each count runs on its leaf's own buffer (``read``): no copy of the leaf.
    groups = map_groups(lambda read, _: read(lambda x: count_true(~jnp.isfinite(x))),
                        jax.tree.leaves(tree), read=True)
    # The stacked counts of each group reduced at once (per-leaf scalars added one by one
    # are a chain that XLA fuses into every consumer of the flag).
    return jnp.all(jnp.stack([jnp.all(c == 0) for _, c in groups])) if groups else (
        jnp.asarray(True))


def _is_masked_node(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def reset_moments(inner: optax.GradientTransformation, inner_state, grown: Masks):
    """Zeroes the entries of the weights selected by ``grown`` (a bool mask tree) in every
    param-shaped leaf of ``inner_state``. The sparse wrapper passes every weight outside
    ``old & new`` (grown, dropped and inactive ones).

    Works for any optax optimizer (chain, inject_hyperparams, MultiSteps, masked and
    multi_transform, whose states hold ``optax.MaskedNode`` for the leaves a group
    excludes) through ``optax.tree.map_params``. Leaves whose shape differs from the param
    (factored second moments, e.g. Adafactor's row/column statistics) cannot be reset per
    weight and are kept.
    """
    return _map_moments(inner, inner_state, grown,
                        lambda v, g: jnp.where(g, jnp.zeros((), v.dtype), v))


def _map_moments(inner, inner_state, masks, fn: Callable):
    """``fn(leaf, mask)`` on every param-shaped leaf of ``inner_state`` that has a mask of
    its shape in ``masks`` (a tree with the params' structure); every other leaf kept."""

    def one(v, g):
        # Not a per-weight leaf (no mask here, a state leaf that stands for a whole subtree,
        # or a factored statistic): kept.
        if (g is None or not hasattr(g, "shape") or not hasattr(v, "shape")
                or v.shape != g.shape):
            return v
        return fn(v, g)

    # MaskedNode (an empty tuple) stands where a group excludes a param: kept as a leaf so
    # that the masks still pair with the state. Only passed when present (Flax NNX states
    # do not map with it).
    masked = any(_is_masked_node(x)
                 for x in jax.tree.leaves(inner_state, is_leaf=_is_masked_node))
    return optax.tree.map_params(inner, one, inner_state, masks,
                                 is_leaf=_is_masked_node if masked else None)


def _masked_updates(kept: jax.Array, u, p):
    return bitmask.select(kept, u, -p.astype(u.dtype))


def _repack(masks: Masks, params: PyTree) -> Masks:
    """Mask leaves as :class:`PackedMask` again where a container handed back their bits
    without the node (Flax NNX's ``nnx.jit`` turns an unknown pytree node into its own
    ``State`` of the children): the param of the same position gives the shape."""
    if masks is None:
        return None
    p_def = jax.tree.structure(params)
    subtrees = p_def.flatten_up_to(masks)
    if all(m is None or isinstance(m, PackedMask) for m in subtrees):
        return masks
    p_leaves = jax.tree.leaves(params)
    out = []
    for m, p in zip(subtrees, p_leaves, strict=True):
        if m is not None and not isinstance(m, PackedMask):
            bits = jax.tree.leaves(m)
            m = None if not bits else PackedMask(bits[0], np.shape(p))
        out.append(m)
    return jax.tree.unflatten(p_def, out)


def _place_like(tree, params):
    """Per-weight algorithm state (a tree with the params' structure) placed like the
    params; any other state as it is."""
    if jax.tree.structure(tree, is_leaf=is_mask_leaf) != jax.tree.structure(params):
        return tree
    return like_params(tree, params)


def check_grads(grads: PyTree, params: PyTree) -> None:
    """Raises naming the first leaf where ``grads`` and ``params`` differ in path or shape
    (a gradient tree paired by position would apply the wrong gradient)."""
    g_flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for i in range(max(len(g_flat), len(p_flat))):
        if i >= len(g_flat) or i >= len(p_flat):
            which = "params" if i >= len(g_flat) else "gradients"
            leaf = (p_flat if i >= len(g_flat) else g_flat)[i][0]
            raise ValueError(
                f"gradients and params differ: {which} have an extra leaf "
                f"{path_to_str(leaf)!r} ({len(g_flat)} gradient leaves, {len(p_flat)} params)")
        (gp, g), (pp, p) = g_flat[i], p_flat[i]
        if path_to_str(gp) != path_to_str(pp):
            raise ValueError(
                f"gradients and params differ at leaf {i}: gradient {path_to_str(gp)!r} vs "
                f"param {path_to_str(pp)!r}; pass gradients with the params' structure")
        if np.shape(g) != np.shape(p):
            raise ValueError(
                f"gradient for {path_to_str(pp)!r} has shape {np.shape(g)} but the param has "
                f"shape {np.shape(p)}")


def _raise_outside(paths, where=""):
    def check(counts):
        bad = [(p, int(c)) for p, c in zip(paths, np.asarray(counts)) if c]
        if bad:
            raise ValueError(
                f"params are nonzero outside their masks{where}: {bad[:3]} "
                "(leaf, count). A transformation after the sparse one changed its updates "
                "(e.g. optax.chain(jaxsparse.rigl(optax.scale_by_adam(), ...), "
                "optax.scale_by_learning_rate(lr))): put every transformation inside it, "
                "jaxsparse.rigl(optax.chain(...), ...), and apply the initial masks to the "
                "params (jaxsparse.init_masked)")
    return check


def _masked_paths(masks: Masks) -> list[str]:
    """The paths of the prunable (masked) leaves, in flattening order."""
    m_flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_mask_leaf)[0]
    return [path_to_str(path) for path, m in m_flat if m is not None]


def _outside_counts(masks: Masks, params: PyTree) -> jax.Array:
    """``int32[n]``: per prunable leaf (in the order of :func:`_masked_paths`), the number of
    finite params that are nonzero outside the (packed) mask; one compiled count per shape."""
    m_leaves = jax.tree.leaves(masks, is_leaf=is_mask_leaf)
    layers = [(m, p) for m, p in zip(m_leaves, jax.tree.leaves(params)) if m is not None]
    if not layers:
        return jnp.zeros((0,), jnp.int32)

    def outside(layer):
        m, p = layer
        return count_true((p != jnp.zeros((), p.dtype)) & jnp.isfinite(p) & ~bitmask.unpack(m))

    groups = map_groups(lambda read, _: read(outside), layers, read=True)
    # The stacked counts come grouped by shape: back to the leaves' order.
    order = np.array([i for members, _ in groups for i in members])
    return jnp.concatenate([c for _, c in groups])[np.argsort(order)]


def _check_inside(masks: Masks, params: PyTree) -> None:
    """At a topology update (under ``lax.cond``): raises, through a host callback, when a
    finite param is nonzero outside its mask."""
    paths = _masked_paths(masks)
    if not paths:
        return

    _host_check(_raise_outside(paths, " at a topology update"), _outside_counts(masks, params))


def _host_check(check: Callable, *args) -> None:
    """``check(*args)`` on the host (``jax.debug.callback``; it raises to report), lowered
    for this process's own backend only: a program lowered here for another platform (an
    ahead-of-time TPU lowering on a CPU host) skips it."""
    backend = jax.default_backend()
    platforms = ("cuda", "rocm") if backend == "gpu" else (backend,)
    jax.lax.platform_dependent(
        *args, default=lambda *a: None,
        **{p: lambda *a: jax.debug.callback(check, *a) for p in platforms})


_outside_counts_jit = jax.jit(_outside_counts)


def check_sparse(params: PyTree, opt_state) -> None:
    """Raises, naming the leaves, when a finite param is nonzero outside its mask.

    Exact sparsity holds after every step unless a transformation chained *after* the sparse
    one changes its updates (``optax.chain(jaxsparse.rigl(...),
    optax.scale_by_learning_rate(lr))``). Call this outside the jitted step, e.g. at
    evaluation or checkpoint time: one count per layer on the device, a few integers to the
    host. The in-step check, ``sparse_transform(..., check_params=True)``, does the same at
    every topology update through a host callback, which costs every call of the step JAX's
    fast dispatch path.

    Example:
      >>> jaxsparse.check_sparse(params, opt_state)
    """
    params = _unwrap_variables(params)
    masks = _repack(_unwrap_variables(get_sparse_state(opt_state).masks), params)
    _raise_outside(_masked_paths(masks))(jax.device_get(_outside_counts_jit(masks, params)))


def sparse_transform(
    inner: optax.GradientTransformation,
    rule: SparsityRule,
    *,
    key: jax.Array,
    track_itop: bool = True,
    check_params: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that its params stay exactly sparse under ``rule``.

    Args:
      inner: any optax gradient transformation.
      rule: the algorithm (see :class:`SparsityRule`); the public factories (``rigl``,
        ``set``, ...) build one.
      key: PRNG key for the initial masks and random choices (``jax.random.key(0)``).
      track_itop: keep the union of all masks in the state (one bit per prunable weight)
        for the in-time over-parameterisation rate.
      check_params: at each topology update, raise (naming the leaf) if a param is nonzero
        outside its mask: the sign of a transformation chained *after* this one, which
        breaks exact sparsity. Off by default: the check is a host callback, and a compiled
        step that holds one loses JAX's fast dispatch path on *every* call (about 3 ms per
        call at 10M params on a 2-core CPU, BENCHMARKS.md). :func:`check_sparse` makes the
        same check from outside the step. Also checks a host-given ``topology_update``
        flag against the rule's schedule at every step.

    Returns:
      A ``GradientTransformationExtraArgs``; ``update`` requires ``params`` and takes
      ``topology_update``: ``None`` (default) decides in the step, under ``lax.cond``,
      whether the topology changes; a Python bool (static under ``jit``, from
      :func:`topology_due`) says so from the host, and the step compiles without the
      ``lax.cond`` (see the module docstring).

    Example:
      >>> tx = jaxsparse.sparse_transform(optax.adam(1e-3), my_rule, key=jax.random.key(0))
      >>> params, state = jaxsparse.init_masked(tx, params)
      >>> updates, state = tx.update(grads, state, params)
    """
    if not isinstance(rule, SparsityRule):
        raise TypeError(f"rule must be a jaxsparse.SparsityRule, got {type(rule).__name__}")
    if key is None:
        raise ValueError("key must be a PRNG key, e.g. key=jax.random.key(0); got None")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        bool_masks = rule.init_masks(params, key)
        validate_prunable_masks(bool_masks, params)
        masks = like_params(bitmask.pack_tree(bool_masks), params)
        return SparseState(
            masks=masks,
            inner_state=inner.init(params),
            count=jnp.zeros((), jnp.int32),
            # A copy: a train step that donates its state must not delete the caller's key.
            key=jnp.copy(key),
            ever_active=jax.tree.map(jnp.copy, masks) if track_itop else None,
            extra=_place_like(rule.init_extra(params, bool_masks), params),
        )

    def update_fn(updates, state, params=None, *, topology_update: bool | None = None,
                  **extra_args):
        if params is None:
            raise ValueError(
                "jaxsparse optimizers need the params: call tx.update(grads, state, params)"
            )
        if topology_update is not None and not isinstance(topology_update, (bool, np.bool_)):
            raise TypeError(
                "topology_update must be None (decided in the step) or a Python bool (static "
                f"under jit: jaxsparse.topology_due(tx, step)); got {type(topology_update)}")
        from_host = topology_update is not None  # the caller's flag (check_params checks it)
        if from_host:
            topology_update = bool(topology_update)
        else:
            # A schedule that does not depend on the step (static sparsity: never) is known
            # while tracing: no lax.cond, and no update branch to trace and lower.
            with jax.ensure_compile_time_eval():
                due = rule.is_update_step(state.count)
            if not isinstance(due, jax.core.Tracer):
                topology_update = bool(due)
        grads = updates
        check_grads(grads, params)
        state = state._replace(masks=_repack(state.masks, params),
                               ever_active=_repack(state.ever_active, params))
        step = state.count
        extra = state.extra
        if rule.accumulate is not None:
            extra = rule.accumulate(extra, grads, state.masks)
        with_extra = rule.update_extra is not None

        # The topology update runs under lax.cond on bit-packed masks: the branch that
        # keeps the topology passes 1/8 byte per weight through, and the algorithm state
        # enters the cond only when the rule updates it (XLA would copy SNFS's momentum on
        # every step otherwise).
        def topology(masks, cond_extra, params, grads, step, key, extra):
            if check_params:
                _check_inside(masks, params)

            def update(masks, cond_extra):
                # Without update_extra the branch only reads the algorithm state (closed
                # over); with it, the state is an operand and an output of the cond.
                inputs = UpdateInputs(masks, params, grads, step, jax.random.fold_in(key, step),
                                      cond_extra if with_extra else extra)
                new = bitmask.pack_tree(rule.update_masks(inputs))
                return new, rule.update_extra(inputs, new) if with_extra else ()

            # Non-finite gradients: the masks (and extra) keep their value for this step.
            # A second cond rather than a select per leaf: the new masks come out of the
            # rule's stacked per-shape results, and a select fused with each leaf's slice
            # would be one more compiled kernel per leaf.
            return jax.lax.cond(all_finite(grads), update, keep, masks, cond_extra)

        def keep(masks, extra):
            return masks, extra

        # On a mesh with explicit axes the update runs with them automatic (its
        # selections reshape and switch over layers of different shardings; the new masks
        # come back in the old ones' shardings).
        def update_branch(masks, cond_extra):
            return auto_axes_like(topology, (masks, cond_extra), masks, cond_extra, params,
                                  grads, step, state.key, extra)

        cond_in = (state.masks, extra if with_extra else ())
        if topology_update is None:  # decided in the step
            new_masks, cond_extra = jax.lax.cond(due, update_branch, keep, *cond_in)
        else:
            if check_params and from_host:
                _check_schedule(rule.is_update_step(step), topology_update, step)
            new_masks, cond_extra = (update_branch if topology_update else keep)(*cond_in)
        if with_extra:
            extra = cond_extra
        if topology_update is False:
            # Known on the host: the masks (and their union) stay as they are.
            ever, kept = state.ever_active, state.masks
        else:
            # The ITOP union outside the cond: one pass over 1 bit per weight, where the
            # cond would copy the bits through its untaken branch on every plain step.
            ever = (None if state.ever_active is None
                    else map_masked(bitmask.or_packed, state.ever_active, new_masks))
            # The weights active before and after this step, intersected on the packed
            # bits: the one mask the step reads (fused into each leaf's update).
            kept = map_masked(bitmask.and_packed, state.masks, new_masks)
        # Unpacked once per leaf, as words of the param's width (all ones where kept): the
        # three selects below combine bits, which XLA:CPU vectorizes (bitmask.select).
        kept = map_masked(lambda m, p: bitmask.word_mask(m, p.dtype), kept, params,
                          dense=lambda p: None)
        # Gradients of weights outside ``kept`` never reach the inner optimizer, and their
        # moments are zeroed *before* the inner step, so they stay zero after it (any
        # optimizer whose state update maps zero state and zero gradient to zero state:
        # momentum, Adam, RMSProp, Adagrad, Lion, MultiSteps, ...): a grown weight starts
        # from zero moments, a dropped or inactive one holds none. Done before rather than
        # after, XLA fuses the reset into the moment update and writes the moments in place.
        masked = map_masked(bitmask.select, kept, grads)
        inner_state = _map_moments(inner, state.inner_state, kept,
                                   lambda v, w: bitmask.select(w, v))
        inner_updates, inner_state = inner.update(masked, inner_state, params, **extra_args)
        out = map_masked(_masked_updates, kept, inner_updates, params,
                         dense=lambda u, p: u)
        return out, SparseState(new_masks, inner_state, step + 1, state.key, ever, extra)

    _RULES[update_fn] = rule
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The rule of each sparse transform's update function, for topology_due.
_RULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_SCHEDULE_BLOCK = 1024


@functools.lru_cache(maxsize=64)
def _host_schedule(is_update_step: Callable) -> Callable:
    """``count -> bool``: the rule's schedule, evaluated for blocks of
    ``_SCHEDULE_BLOCK`` consecutive counts at a time, on the host's CPU (so an
    accelerator's stream is never waited on), the next block dispatched as soon as one is
    first read. A flag read per step would wait, on a CPU backend, for every computation
    already queued there (the train step in flight): the steps of a host-scheduled loop
    would no longer overlap their dispatch (BENCHMARKS.md, stop 40)."""
    flags_of = jax.jit(jax.vmap(is_update_step))
    cpu = jax.local_devices(backend="cpu")[0]
    blocks: dict[int, Any] = {}  # block -> flags (a jax.Array until first read, then numpy)
    lock = threading.Lock()  # loops in several threads may share one transform

    def dispatch(b: int) -> None:
        if b not in blocks:
            counts = np.arange(b * _SCHEDULE_BLOCK, (b + 1) * _SCHEDULE_BLOCK, dtype=np.int32)
            blocks[b] = flags_of(jax.device_put(counts, cpu))

    def due(count: int) -> bool:
        b = count // _SCHEDULE_BLOCK
        with lock:
            dispatch(b)
            flags = blocks[b]
            if not isinstance(flags, np.ndarray):
                flags = blocks[b] = np.asarray(flags)
                dispatch(b + 1)  # done long before a loop reaches it
                for old in [k for k in blocks if k not in (b, b + 1)]:
                    del blocks[old]
        return bool(flags[count % _SCHEDULE_BLOCK])

    return due


def topology_due(tx: optax.GradientTransformation | SparsityRule, count: int) -> bool:
    """Whether the update at step counter ``count`` (the number of earlier ``update``
    calls: ``SparseState.count``) changes the topology, by the rule's own schedule: the
    ``topology_update`` flag of a host-scheduled step.

    Example:
      >>> step = jax.jit(train_step, static_argnames="topology_update")
      >>> for t in range(num_steps):
      ...     state = step(state, batch, topology_update=jaxsparse.topology_due(tx, t))

    Args:
      tx: the transform :func:`sparse_transform` (or a public factory such as
        ``jaxsparse.rigl``) returned, or its :class:`SparsityRule`.
      count: the step counter, a Python int.

    Raises:
      TypeError: ``tx`` is neither (e.g. an ``optax.chain`` around it: pass the sparse
        transform itself, before chaining).
      ValueError: ``count`` is negative or past the int32 step counter.
    """
    rule = tx if isinstance(tx, SparsityRule) else _RULES.get(getattr(tx, "update", None))
    if rule is None:
        raise TypeError("topology_due needs the transform that jaxsparse returned (or its "
                        f"SparsityRule), not a {type(tx).__name__} around it: keep a "
                        "reference to the sparse transform before chaining it")
    if not isinstance(count, (int, np.integer)):
        raise TypeError(f"count must be a Python int (the step on the host), got "
                        f"{type(count).__name__}")
    if not 0 <= count < np.iinfo(np.int32).max - _SCHEDULE_BLOCK:
        raise ValueError(f"count must be a step counter in [0, 2**31 - {_SCHEDULE_BLOCK + 1}), "
                         f"got {count}")
    return _host_schedule(rule.is_update_step)(int(count))


def _check_schedule(due: jax.Array, flag: bool, step: jax.Array) -> None:
    """With ``check_params``: raises, through a host callback, when a host-given
    ``topology_update`` flag disagrees with the rule's schedule at this step."""

    def check(due, step):
        if bool(due) != flag:
            raise ValueError(
                f"topology_update={flag} at step counter {int(step)}, where the rule's "
                f"schedule says {bool(due)}: pass jaxsparse.topology_due(tx, count)")

    _host_check(check, due, step)


def init_masked(tx: optax.GradientTransformation, params: PyTree) -> tuple[PyTree, Any]:
    """``(masked params, opt_state)``: ``tx.init(params)`` and the params with its initial
    masks applied, so training starts exactly sparse.

    Example:
      >>> params, opt_state = jaxsparse.init_masked(jaxsparse.rigl(...), params)
    """
    state = tx.init(params)
    masks = get_masks(state)
    masked = map_masked(lambda m, w: jnp.where(m, w, jnp.zeros((), w.dtype)), masks, params)
    return masked, state


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


def get_masks(state, params: PyTree | None = None) -> Masks:
    """The masks (bool arrays, ``None`` for dense leaves) of the sparse optimizer found
    anywhere inside ``state``.

    Args:
      state: an optimizer state holding one :class:`SparseState`.
      params: the params; needed only when a container stored the state without its
        :class:`~jaxsparse.bitmask.PackedMask` nodes (``flax.nnx.Optimizer`` after a jitted
        update), whose shapes are then taken from the params.

    Example:
      >>> params = jaxsparse.apply_masks(params, jaxsparse.get_masks(opt_state))
    """
    return _unpack(_unwrap_variables(get_sparse_state(state).masks), params)


def _unpack(masks, params=None):
    """Bool masks from packed ones (bool leaves, written by older versions, pass through)."""
    subtrees = jax.tree.leaves(masks, is_leaf=is_mask_leaf)
    if any(m is not None and not isinstance(m, PackedMask)
           and getattr(m, "dtype", None) != jnp.bool_ for m in subtrees):
        if params is None:
            raise ValueError(
                "the masks in this optimizer state lost their PackedMask nodes (a container "
                "such as flax.nnx.Optimizer stored only their bits): pass the params, "
                "jaxsparse.get_masks(opt_state, params) (for NNX: nnx.state(model, nnx.Param))")
        masks = _repack(masks, _unwrap_variables(params))
    return bitmask.unpack_tree(masks)


def get_ever_active(state, params: PyTree | None = None) -> Masks:
    """The union of all masks so far (for :func:`jaxsparse.metrics.itop_rate`); ``params``
    as in :func:`get_masks`."""
    ever = get_sparse_state(state).ever_active
    if ever is None:
        raise ValueError("this optimizer was built with track_itop=False")
    return _unpack(_unwrap_variables(ever), params)
