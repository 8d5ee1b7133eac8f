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
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
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
        total = add_stats(total, run(params, put(batch) if put else batch))
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
