"""The one-shot entry point: prune a trained Flax model layer by layer from calibration data."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxsparse.masks import Masks, Prunable, as_predicate, path_to_str
from jaxsparse.oneshot import calibrate
from jaxsparse.oneshot.methods import (
    check_layer,
    magnitude_layer,
    pattern,
    sparsegpt_layer,
    wanda_layer,
)

PyTree = Any
METHODS = ("magnitude", "wanda", "sparsegpt")


class OneShotResult(NamedTuple):
    """What :func:`prune` returns.

    Attributes:
      params: the params with every pruned kernel replaced (exactly zero outside its mask;
        SparseGPT also changes the kept weights).
      masks: a ``Masks`` tree of the params' structure: bool at pruned kernels, ``None``
        elsewhere; ready for ``jaxsparse.apply_masks``, ``sparsity_table``, ``fixed_masks``.
      layers: the pruned leaves' paths in the order they were pruned.
      seconds: wall time per layer (calibration pass + solve), same order.
    """

    params: PyTree
    masks: Masks
    layers: tuple[str, ...]
    seconds: tuple[float, ...]


def _forward_of(model, params, call):
    if isinstance(model, nnx.Module):
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        return calibrate.nnx_forward(graphdef, rest, call), state if params is None else params
    if call is not None:
        raise TypeError("call= is for NNX models; for linen pass apply_fn(params, batch)")
    if params is None:
        raise TypeError("params is required for a linen model or an apply function")
    apply_fn = model.apply if isinstance(model, nn.Module) else model
    if callable(apply_fn):
        try:
            return calibrate.cached_linen_forward(apply_fn), params
        except TypeError:  # unhashable callable
            return calibrate.linen_forward(apply_fn), params
    raise TypeError(
        "model must be a flax.linen Module, an apply function (params, batch) -> outputs, or "
        f"an nnx.Module; got {type(model).__name__}"
    )


def _kernel_paths(order: list[str], paths: list[str]) -> dict[str, str]:
    """Maps each layer's kernel leaf path to its module path (linen params may sit under a
    ``params`` collection key)."""
    found = {}
    for module_path in order:
        for candidate in (f"{module_path}/kernel", f"params/{module_path}/kernel"):
            if candidate in paths and candidate not in found:
                found[candidate] = module_path
    return found


def prune(
    model,
    params: PyTree | None,
    calibration_batches: Iterable | None = None,
    *,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    prunable: Prunable = None,
    percdamp: float = 0.01,
    blocksize: int = 128,
    batch_sharding: jax.sharding.Sharding | None = None,
    call: Callable[[nnx.Module, Any], Any] | None = None,
    carry: bool = True,
    donate: bool = False,
) -> OneShotResult:
    """Prunes a trained model in one shot: magnitude, Wanda or SparseGPT, layer by layer.

    The linear layers are pruned in the order the forward pass first calls them; each one is
    calibrated on the outputs of the layers before it *after* those were pruned (sequential,
    as in SparseGPT), from statistics summed over ``calibration_batches`` (one layer's at a
    time: ``d_in^2`` floats for SparseGPT, ``d_in`` for Wanda). The pattern is per output
    neuron (each keeps the same number of weights) or N:M along the fan-in.

    Args:
      model: a Flax linen ``Module`` (called as ``model.apply(params, batch)``), any function
        ``apply_fn(params, batch)`` that runs linen modules, or an ``nnx.Module``.
      params: the trained params (linen variables dict, e.g. ``{"params": ...}``); for NNX,
        ``None`` (the model's ``nnx.Param`` state) or such a state.
      calibration_batches: a sequence of batches as the model takes them (read once per
        layer); not needed for ``method="magnitude"``.
      method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
      sparsity: fraction of every output neuron's weights to prune, in [0, 1); or
      nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs (2:4, 4:8).
      prunable: which kernels to prune (``jaxsparse.masks`` selector: predicate, regex or
        list of regexes on the leaf path); default: every kernel of rank >= 2. Every selected
        kernel must be a Dense / ``nnx.Linear`` kernel that the forward pass reaches.
      percdamp: SparseGPT's damping, a fraction of the mean Hessian diagonal.
      blocksize: SparseGPT's lazy-update block (inputs per block).
      batch_sharding: optional sharding for the batches (data-parallel calibration over a
        ``Mesh``, e.g. ``NamedSharding(mesh, P("data"))``); params are replicated on its mesh,
        the statistics are summed across devices inside the compiled pass and the per-layer
        solve runs replicated. Works across processes (``jax.distributed``; every process
        passes the same params and batches): tested with 2 processes x 2 CPU devices against
        1 process x 4 devices (``tests/test_oneshot_multiprocess.py``).
      call: NNX only: ``call(model, batch)`` runs the model (default ``model(batch)``).
      carry: run the forward pass once, carrying every batch's activations from one layer
        to the next (:class:`calibrate.Sequential`; memory: the activations live at one
        layer boundary, for all batches). ``False``, or a forward that cannot be cut there
        (a layer called twice in sequence, tied kernels, batches of different shapes):
        re-run the forward prefix for every layer, one batch at a time (memory: one batch's
        activations; time: about ``L / 2`` forward passes for ``L`` layers). Both give the
        same result.
      donate: free each pruned kernel's dense original (the arrays in ``params``, or the NNX
        model's own params when ``params`` is None) once its pruned copy exists, so the
        model is held about once instead of twice; the caller's dense arrays are deleted
        (``jax.Array.delete``) and must not be used afterwards.

    Returns:
      :class:`OneShotResult` ``(params, masks, layers, seconds)``; for NNX apply the params
      with ``nnx.update(model, result.params)``.

    Example:
      >>> result = jaxsparse.oneshot.prune(model, variables, [x1, x2, x3],
      ...                                  method="sparsegpt", nm=(2, 4))
      >>> jaxsparse.format_table(jaxsparse.sparsity_table(result.masks))
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    pat = pattern(sparsity, nm)
    forward, params = _forward_of(model, params, call)
    batches = calibrate.as_batches(calibration_batches)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    pred = as_predicate(prunable)
    selected = [p for p, leaf in zip(paths, leaves) if pred(p, leaf)]
    if not selected:
        raise ValueError(f"no prunable leaves in params (leaves: {paths[:8]})")
    index = {p: i for i, p in enumerate(paths)}
    for p in selected:
        check_layer(leaves[index[p]], pat, p)

    put = None
    if batch_sharding is not None:
        mesh = getattr(batch_sharding, "mesh", None)
        if mesh is None:
            raise TypeError("batch_sharding must be a NamedSharding (it names the mesh)")
        replicated = NamedSharding(mesh, PartitionSpec())
        leaves = [jax.device_put(leaf, replicated) for leaf in leaves]
        put = lambda batch: jax.device_put(batch, batch_sharding)  # noqa: E731

    originals = list(leaves) if put is None else [leaf for _, leaf in flat]
    del flat
    if method == "magnitude":
        order, module_of = selected, {}
    else:
        if not batches:
            raise ValueError(
                f"method {method!r} needs calibration_batches (a non-empty sequence of "
                "batches); got none")
        current = jax.tree_util.tree_unflatten(treedef, leaves)
        first = put(batches[0]) if put else batches[0]
        module_of = _kernel_paths(calibrate.layer_order(forward, current, first), paths)
        missing = [p for p in selected if p not in module_of]
        if missing:
            raise ValueError(
                f"layer {missing[0]!r} is never reached by the calibration pass (no Dense / "
                f"nnx.Linear call uses it; {len(missing)} such layers: {missing[:5]}); leave "
                "it out with prunable= or check the apply function")
        order = [p for p in module_of if p in set(selected)]
        del current, first

    seq = None
    if method != "magnitude" and carry:
        seq = calibrate.Sequential.plan(
            forward, jax.tree_util.tree_unflatten(treedef, leaves), batches,
            [module_of[p] for p in order], [index[p] for p in order],
            with_gram=method == "sparsegpt", put=put)
    masks = [None] * len(leaves)
    seconds = []
    for path in order:
        start = time.perf_counter()
        i = index[path]
        kernel = leaves[i]
        if method == "magnitude":
            res = magnitude_layer(kernel, sparsity=pat.sparsity, nm=pat.nm, name=path)
        else:
            try:
                if seq is not None:
                    stats = seq.stats(leaves)
                else:
                    stats = calibrate.layer_stats(
                        forward, jax.tree_util.tree_unflatten(treedef, leaves), batches,
                        module_of[path], with_gram=method == "sparsegpt", put=put)
            except LookupError:
                raise ValueError(
                    f"layer {path!r} is not reached on every calibration batch; give batches "
                    "that all run the same layers") from None
            jax.block_until_ready(stats)
            calibrate.trim_heap()  # the calibration pass's buffers are free now
            if method == "wanda":
                res = wanda_layer(kernel, stats, sparsity=pat.sparsity, nm=pat.nm, name=path)
            else:
                res = sparsegpt_layer(kernel, stats, sparsity=pat.sparsity, nm=pat.nm,
                                      percdamp=percdamp, blocksize=blocksize, name=path,
                                      donate_stats=True)
            del stats  # one layer's statistics alive at a time
        del kernel
        if donate:
            for old in {id(x): x for x in (leaves[i], originals[i])}.values():
                if isinstance(old, jax.Array) and old is not res.kernel and not old.is_deleted():
                    old.delete()
        originals[i] = None
        leaves[i], masks[i] = res.kernel, res.mask
        del res
        jax.block_until_ready(leaves[i])
        calibrate.trim_heap()
        seconds.append(time.perf_counter() - start)
    new_params = jax.tree_util.tree_unflatten(treedef, leaves)
    mask_tree = jax.tree_util.tree_unflatten(treedef, masks)
    return OneShotResult(new_params, mask_tree, tuple(order), tuple(seconds))
