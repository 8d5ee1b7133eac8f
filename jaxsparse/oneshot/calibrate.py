"""Calibration: the inputs of a model's linear layers, seen without rewriting the model.

A *forward* is ``forward(params, batch, on_call)``: it runs the user's model on ``batch``
with ``params`` and calls ``on_call(module_path, x)`` with the input ``x`` of every linear
layer it executes, in execution order. Two adapters build one:

* :func:`linen_forward`: any function ``apply_fn(params, batch)`` that runs Flax linen modules
  (``model.apply``); ``nn.Dense`` calls are seen through ``flax.linen.intercept_methods``.
* :func:`nnx_forward`: an NNX model split as ``graphdef, params, rest``; every ``nnx.Linear``
  of the merged copy is given a recording subclass for the duration of the call (the user's
  model object is never touched).

:func:`layer_order` lists the linear layers in first-call order; :func:`layer_stats`
accumulates one layer's :class:`~jaxsparse.oneshot.methods.InputStats` over the calibration
batches under ``jit``. Only the target layer's inputs leave the compiled function, so XLA
drops the rest of the forward after it, and memory is one batch's activations plus one
layer's statistics.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from jaxsparse.oneshot.methods import InputStats, add_stats, input_stats

OnCall = Callable[[str, jax.Array], None]
Forward = Callable[[Any, Any, OnCall], Any]


def linen_forward(apply_fn: Callable[[Any, Any], Any]) -> Forward:
    """A forward for ``apply_fn(params, batch)`` built from Flax linen modules.

    ``module_path`` is the ``/``-joined linen module path (``Dense_0``,
    ``Block_1/MlpBlock_0/Dense_0``). Layers inside ``nn.scan`` / ``nn.remat`` / ``jax.jit``
    bodies within ``apply_fn`` are traced in an inner scope and cannot be recorded.
    """

    def forward(params, batch, on_call: OnCall):
        def interceptor(next_fun, args, kwargs, context):
            if (context.method_name == "__call__" and isinstance(context.module, nn.Dense)
                    and args):
                on_call("/".join(map(str, context.module.path)), args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return apply_fn(params, batch)

    return forward


_NNX_HOOK: contextvars.ContextVar = contextvars.ContextVar("jaxsparse_oneshot_nnx_hook")
_HOOKED_CLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    if cls not in _HOOKED_CLASSES:
        def __call__(self, inputs, *args, **kwargs):  # noqa: N807
            paths, on_call = _NNX_HOOK.get()
            on_call(paths[id(self)], inputs)
            return super(hooked, self).__call__(inputs, *args, **kwargs)

        hooked = type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})
        _HOOKED_CLASSES[cls] = hooked
    return _HOOKED_CLASSES[cls]


def nnx_forward(graphdef, rest, call: Callable[[nnx.Module, Any], Any] | None = None
                ) -> Forward:
    """A forward for an NNX model split as ``graphdef, params, rest = nnx.split(model,
    nnx.Param, ...)``; ``call(model, batch)`` runs it (default ``model(batch)``).

    ``module_path`` is the ``/``-joined attribute path of the ``nnx.Linear`` (``l1``,
    ``blocks/0/mlp``), the prefix of its kernel's path in the params state.
    """
    call = call or (lambda model, batch: model(batch))

    def forward(params, batch, on_call: OnCall):
        model = nnx.merge(graphdef, params, rest)
        paths = {}
        for path, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Linear):
                paths[id(node)] = "/".join(map(str, path))
                node.__class__ = _recording_class(type(node))
        token = _NNX_HOOK.set((paths, on_call))
        try:
            return call(model, batch)
        finally:
            _NNX_HOOK.reset(token)

    return forward


def layer_order(forward: Forward, params, batch) -> list[str]:
    """Module paths of the linear layers ``forward`` runs on ``batch``, in first-call order
    (traced abstractly: nothing is computed)."""
    seen: list[str] = []

    def on_call(path, x):
        del x
        if path not in seen:
            seen.append(path)

    jax.eval_shape(lambda p, b: forward(p, b, on_call), params, batch)
    return seen


def _stats_fn(forward: Forward, target: str, with_gram: bool):
    def run(params, batch):
        found: list[InputStats] = []

        def on_call(path, x):
            if path == target:
                found.append(input_stats(x, with_gram))

        forward(params, batch, on_call)
        if not found:
            raise LookupError(target)
        total = None
        for s in found:
            total = add_stats(total, s)
        return total

    return jax.jit(run)


@functools.lru_cache(maxsize=256)
def _cached_stats_fn(forward: Forward, target: str, with_gram: bool):
    return _stats_fn(forward, target, with_gram)


@functools.lru_cache(maxsize=32)
def cached_linen_forward(apply_fn) -> Forward:
    """:func:`linen_forward`, one per ``apply_fn`` (so repeated pruning of the same model
    reuses the compiled calibration passes)."""
    return linen_forward(apply_fn)


def layer_stats(forward: Forward, params, batches: Sequence, target: str, *,
                with_gram: bool, put: Callable[[Any], Any] | None = None) -> InputStats:
    """Sums the :class:`InputStats` of layer ``target``'s inputs over ``batches``.

    ``put`` (optional) places each batch before the call (e.g. ``jax.device_put`` with a
    data-parallel sharding); the sums then reduce across devices inside the compiled call.

    Raises:
      LookupError: ``target`` is not called on some batch.
    """
    run = _cached_stats_fn(forward, target, with_gram)
    total = None
    for batch in batches:
        total = _accumulate(total, run(params, put(batch) if put else batch))
    return total


def as_batches(batches: Iterable | None) -> list:
    """The calibration batches as a list (they are read once per layer)."""
    if batches is None:
        return []
    if isinstance(batches, (jax.Array,)) or hasattr(batches, "shape"):
        raise TypeError(
            "calibration_batches must be a sequence of batches (e.g. [x1, x2] or a list of "
            "dicts), not one array; wrap a single batch in a list"
        )
    return list(batches)


def trim_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc ``malloc_trim(0)``; a no-op where
    there is no glibc).

    Pruning frees and allocates matrices of many sizes layer after layer (a ``d_in^2``
    Hessian and its factors, kernels, activations); glibc keeps what is freed below its
    mmap threshold, which grows up to 32 MB as large blocks come and go, so the resident
    memory climbs hundreds of MB above what is live (measured in BENCHMARKS.md). ``prune``
    calls this after every layer's calibration and solve.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


# ------------------------------------------------------------------ one pass, carried forward


@functools.partial(jax.jit, donate_argnums=0)
def _add_into(total: InputStats, new: InputStats) -> InputStats:
    """``add_stats(total, new)`` reusing ``total``'s buffers (the running sum is donated)."""
    return add_stats(total, new)


def _accumulate(total: InputStats | None, new: InputStats) -> InputStats:
    return new if total is None else _add_into(total, new)


class _Segment(NamedTuple):
    run: Callable            # jitted (global values, carried values) -> (new values, stats)
    globals_: tuple          # what it reads of the params leaves (i) and consts (n_params + i)
    inputs: tuple            # carried vars it reads
    outputs: tuple           # vars it defines that a later segment reads
    drop: tuple              # carried vars that no later segment reads


class _Plan(NamedTuple):
    segments: tuple[_Segment, ...]
    batch_vars: tuple        # (leaf index in the batch, var) of the batch leaves read
    consts: tuple            # the traced forward's constants
    n_params: int


class Sequential:
    """Calibration that runs the forward pass once, carried forward layer by layer.

    The forward is traced once into a jaxpr and cut just before the first use of each target
    layer's kernel. Segment ``k`` (the equations between the cuts of layers ``k - 1`` and
    ``k``) runs on every calibration batch from the values carried out of segment ``k - 1``
    and returns layer ``k``'s :class:`InputStats` and the values later segments read; the
    caller then prunes kernel ``k`` and passes the new kernel to the next call. Every
    equation runs once, reading each kernel in the state it has when the sweep reaches it:
    the same computation as re-running the forward prefix with the already-pruned params for
    every layer (:func:`layer_stats`), in about one forward pass instead of ``L / 2``.

    Memory: the values carried across one cut for every batch (for a residual stack, each
    batch's residual stream), plus one segment's work and one layer's statistics.

    :meth:`plan` returns ``None`` (then use :func:`layer_stats` per layer) when the forward
    cannot be cut this way: a kernel read before its layer's input exists (a layer called
    again on its own output, tied weights), kernels first read out of order, or batches of
    different shapes.
    """

    def __init__(self, plan: _Plan, carried: list[dict]):
        self._plan = plan
        self._carried = carried          # one dict var -> value per batch
        self._next = 0

    @classmethod
    def plan(cls, forward: Forward, params, batches: Sequence, targets: Sequence[str],
             kernel_leaves: Sequence[int], *, with_gram: bool,
             put: Callable[[Any], Any] | None = None) -> Sequential | None:
        """Traces ``forward`` (once per model and shapes: cached) and cuts it before each of
        ``targets`` (module paths, in pruning order); ``kernel_leaves[k]`` is the index of
        target ``k``'s kernel among ``jax.tree.leaves(params)``. ``None`` when the forward
        cannot be cut (see the class)."""
        p_leaves, p_tree = jax.tree_util.tree_flatten(params)
        placed = [put(b) if put else b for b in batches]
        b_flat = [jax.tree_util.tree_flatten(b) for b in placed]
        b_tree = b_flat[0][1]
        b_avals = _avals(b_flat[0][0])
        if any(t != b_tree or _avals(v) != b_avals for v, t in b_flat[1:]):
            return None
        key = (forward, p_tree, _avals(p_leaves), b_tree, b_avals, tuple(targets),
               tuple(kernel_leaves), bool(with_gram))
        try:
            plan = _cached_plan(*key)
        except TypeError:  # an unhashable forward
            plan = _make_plan(*key)
        if plan is None:
            return None
        carried = [{v: leaves[j] for j, v in plan.batch_vars} for leaves, _ in b_flat]
        return cls(plan, carried)

    def stats(self, leaves: Sequence) -> InputStats:
        """Runs the next segment on every batch with the current params ``leaves`` (the
        already-pruned kernels in place) and returns the next target's summed statistics."""
        plan = self._plan
        seg = plan.segments[self._next]
        self._next += 1
        n_p = plan.n_params
        glob = [leaves[i] if i < n_p else plan.consts[i - n_p] for i in seg.globals_]
        total = None
        for env in self._carried:
            new, stats = seg.run(glob, [env[v] for v in seg.inputs])
            for v in seg.drop:
                del env[v]
            env.update(zip(seg.outputs, new))
            total = _accumulate(total, stats)
        return total


def _avals(leaves) -> tuple:
    avals = [jax.typeof(x) for x in leaves]
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals)


def _make_plan(forward, p_tree, p_avals, b_tree, b_avals, targets, kernel_leaves,
               with_gram) -> _Plan | None:
    from jax.extend import core as jcore

    index = {m: k for k, m in enumerate(targets)}

    def traced(p_vals, b_vals):
        xs: list[list] = [[] for _ in targets]

        def on_call(path, x):
            if path in index:
                xs[index[path]].append(x)

        forward(jax.tree_util.tree_unflatten(p_tree, p_vals),
                jax.tree_util.tree_unflatten(b_tree, b_vals), on_call)
        return xs

    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(list(p_avals),
                                                                   list(b_avals))
    jaxpr = closed.jaxpr
    counts = [len(x) for x in out_shape]
    if not all(counts):
        return None  # a target never called: the per-layer path names it
    is_var = lambda v: not isinstance(v, jcore.Literal)  # noqa: E731
    outs = list(jaxpr.outvars)
    x_vars, pos = [], 0
    for n in counts:
        x_vars.append(tuple(outs[pos:pos + n]))
        pos += n
    if not all(is_var(v) for xs in x_vars for v in xs):
        return None
    n_p = len(p_avals)
    param_vars = list(jaxpr.invars[:n_p])
    batch_vars = list(jaxpr.invars[n_p:])
    global_of = {v: i for i, v in enumerate(param_vars)}
    global_of.update({v: n_p + i for i, v in enumerate(jaxpr.constvars)})

    # Cut k: the first equation that reads target k's kernel.
    first_use: dict = {}
    defined_at: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in filter(is_var, eqn.invars):
            first_use.setdefault(v, i)
        for v in eqn.outvars:
            defined_at[v] = i
    cuts = [first_use.get(param_vars[leaf]) for leaf in kernel_leaves]
    if None in cuts or any(b <= a for a, b in zip(cuts, cuts[1:])):
        return None
    if any(defined_at.get(v, -1) >= cuts[k] for k, xs in enumerate(x_vars) for v in xs):
        return None  # an input that needs its own kernel (or a later one) first

    eqn_seg = list(np.searchsorted(np.asarray(cuts), np.arange(len(jaxpr.eqns)), "right"))
    n_run = cuts[-1]  # the equations after the last cut never run
    last_use: dict = {}
    for i, eqn in enumerate(jaxpr.eqns[:n_run]):
        for v in filter(is_var, eqn.invars):
            if v not in global_of:
                last_use[v] = max(last_use.get(v, -1), int(eqn_seg[i]))
    for k, xs in enumerate(x_vars):
        for v in xs:
            if v not in global_of:
                last_use[v] = max(last_use.get(v, -1), k)
    def_seg = {v: -1 for v in batch_vars}
    for i, eqn in enumerate(jaxpr.eqns[:n_run]):
        for v in eqn.outvars:
            def_seg[v] = int(eqn_seg[i])

    segments, compiled = [], {}
    start = 0
    for k, cut in enumerate(cuts):
        eqns = jaxpr.eqns[start:cut]
        start = cut
        reads = [v for eqn in eqns for v in filter(is_var, eqn.invars)] + list(x_vars[k])
        glob = tuple(dict.fromkeys(v for v in reads if v in global_of))
        inputs = tuple(dict.fromkeys(v for v in reads
                                     if v not in global_of and def_seg[v] < k))
        outputs = tuple(v for eqn in eqns for v in eqn.outvars if last_use.get(v, -1) > k)
        drop = tuple(v for v, s in def_seg.items() if s < k and last_use.get(v, -1) == k)
        n_in, n_out = len(glob) + len(inputs), len(outputs) + len(x_vars[k])
        info = jcore.DebugInfo(
            "jaxsparse.oneshot calibration", f"segment {k} (up to {targets[k]})",
            tuple(f"in{j}" for j in range(n_in)), tuple(f"out{j}" for j in range(n_out)))
        sub = jcore.Jaxpr((), list(glob) + list(inputs), list(outputs) + list(x_vars[k]),
                          eqns, jaxpr.effects, info)
        # Segments that print alike (the blocks of a stack) share one compiled function.
        key = (str(sub), len(outputs), with_gram)
        if key not in compiled:
            compiled[key] = _segment_fn(sub, len(outputs), with_gram)
        segments.append(_Segment(compiled[key],
                                 tuple(global_of[v] for v in glob), inputs, outputs, drop))
    used = tuple((j, v) for j, v in enumerate(batch_vars) if v in last_use)
    return _Plan(tuple(segments), used, tuple(closed.consts), n_p)


_cached_plan = functools.lru_cache(maxsize=16)(_make_plan)


def _segment_fn(sub, n_out: int, with_gram: bool):
    def run(glob, inputs):
        vals = jax.core.eval_jaxpr(sub, [], *glob, *inputs)
        total = None
        for x in vals[n_out:]:
            total = add_stats(total, input_stats(x, with_gram))
        return vals[:n_out], total

    return jax.jit(run)
