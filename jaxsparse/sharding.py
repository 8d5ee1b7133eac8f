"""Sharding helpers: a device mesh, params sharded by logical axis rules, and per-weight
state (masks, ``ever_active``, SNFS momentum, packed masks) placed like the params.

A model names the axes of its params *logically* (``("embed", "mlp")``: flax's
``nn.with_logical_partitioning`` or NNX sharding metadata); a table of rules maps logical
names to mesh axes (``("mlp", "model")``), as in MaxText and t5x. jaxsparse keeps every
per-weight array of the sparse optimizer sharded exactly like its weight
(:func:`like_params`), so a layer's topology update runs on the shards that hold the layer
and checkpoints shard the masks with the params.

On a mesh with ``Auto`` axes (the default) pin the gradients to the params' shardings in
the train step, before ``tx.update``: ``grads = jax.lax.with_sharding_constraint(grads,
param_shardings)``. The topology update runs one compiled function over all layers of a
shape (:func:`jaxsparse.layermap.map_layers`), so XLA's propagation gives those layers one
sharding there (a row- and a column-sharded ``d x d`` kernel, a sharded bias and a
replicated LayerNorm scale); unpinned, that sharding flows back out of the update into the
gradients and the backward pass, and every step gathers activations and dense leaves.
Pinned, the plain step communicates like the dense one (all-reduces only) and the update
reshards the layers it needs inside its own branch.

Example:
  >>> mesh = make_mesh((4, 2), ("data", "model"))
  >>> shardings = logical_shardings(logical_specs, mesh, rules, shapes=abstract_params)
  >>> params = jax.device_put(params, shardings)
  >>> masks = like_params(masks, params)            # each mask sharded like its kernel
  >>> # in the jitted step:
  >>> grads = jax.lax.with_sharding_constraint(grads, shardings)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def _path(path) -> str:
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return "/".join(names)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices=None,
              explicit: bool = False) -> Mesh:
    """A ``Mesh`` of ``shape`` over ``devices`` (default: all devices of all processes).

    Axes are ``Auto`` (XLA's sharding propagation between the shardings you pin) unless
    ``explicit`` (JAX's sharding-in-types mode, where :func:`like_params` also works under
    ``jit``).

    Raises:
      ValueError: naming ``shape`` when its product is not the number of devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} and axis_names {axis_names} differ in length")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {shape} needs {int(np.prod(shape))} devices but {len(devices)} are "
            f"available ({jax.process_count()} process(es)); choose a shape whose product is "
            f"{len(devices)}")
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    types = (kind,) * len(shape)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, axis_names, devices=devices, axis_types=types)
    return Mesh(np.asarray(devices).reshape(shape), axis_names, axis_types=types)


def logical_to_mesh_spec(logical: PartitionSpec, rules: Rules) -> PartitionSpec:
    """Maps a spec of logical axis names to mesh axes with ``rules`` (first match wins;
    a logical name without a rule, or ``None``, is replicated)."""
    table = {}
    for name, axis in rules:
        table.setdefault(name, axis)
    out = []
    for name in logical:
        if name is None:
            out.append(None)
        elif isinstance(name, tuple):
            axes = [a for n in name for a in _as_tuple(table.get(n))]
            out.append(tuple(axes) or None)
        else:
            out.append(table.get(name))
    return PartitionSpec(*out)


def _as_tuple(axis):
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def check_divisible(shapes: PyTree, shardings: PyTree) -> None:
    """Raises if a mesh axis does not divide the dimension of a leaf it shards.

    Args:
      shapes: a tree of arrays or ``jax.ShapeDtypeStruct`` (the params).
      shardings: the matching tree of ``NamedSharding``.

    Raises:
      ValueError: naming the leaf, the dimension and the mesh axes.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes)
    sh = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    if len(sh) != len(flat):
        raise ValueError(f"{len(sh)} shardings for {len(flat)} leaves")
    for (path, leaf), s in zip(flat, sh):
        for dim, axis in enumerate(s.spec):
            axes = _as_tuple(axis)
            n = int(np.prod([s.mesh.shape[a] for a in axes])) if axes else 1
            if leaf.shape[dim] % n:
                raise ValueError(
                    f"leaf {_path(path)!r}: dimension {dim} of shape {tuple(leaf.shape)} "
                    f"is not divisible by mesh axes {axes} of size {n}; change the mesh "
                    f"shape or the model size, or map this logical axis to None in the rules")


def logical_shardings(logical_specs: PyTree, mesh: Mesh, rules: Rules,
                      shapes: PyTree | None = None) -> PyTree:
    """``NamedSharding`` per leaf from logical specs (``nn.get_partition_spec``) and rules.

    With ``shapes`` (the params or their ``jax.eval_shape``), checks that every sharded
    dimension divides evenly (:func:`check_divisible`).
    """
    out = jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh_spec(spec, rules)), logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec))
    if shapes is not None:
        check_divisible(shapes, out)
    return out


def _is_packed(x) -> bool:
    """A bit-packed mask node (``bits`` of the mask's shape with the last axis packed eight
    to a byte, and a static ``shape``), e.g. ``jaxsparse.bitmask.PackedMask``."""
    return hasattr(x, "bits") and hasattr(x, "shape") and not hasattr(x, "dtype")


def packed_sharding(s: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """The sharding for a mask of ``shape`` and sharding ``s`` packed along its last axis
    (``ceil(n / 8)`` bytes): the same spec, with the last axis replicated when its shards do
    not hold whole bytes."""
    spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
    axes = _as_tuple(spec[-1]) if spec else ()
    if axes:
        n = int(np.prod([s.mesh.shape[a] for a in axes]))
        if shape[-1] % (8 * n):
            spec[-1] = None
    return NamedSharding(s.mesh, PartitionSpec(*spec))


def explicit_sharding(x) -> NamedSharding | None:
    """The sharding in ``x``'s type when its mesh has explicit axes (JAX's
    sharding-in-types mode, ``make_mesh(..., explicit=True)``), else ``None``."""
    try:
        s = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - no sharding in the type (a Python scalar, ...)
        return None
    types = getattr(getattr(s, "mesh", None), "axis_types", ())
    if isinstance(s, NamedSharding) and any(t == jax.sharding.AxisType.Explicit
                                            for t in types):
        return s
    return None


def auto_axes_like(f, like, *args):
    """``f(*args)``, run with the mesh's explicit axes made automatic
    (``jax.sharding.auto_axes``) when an argument's type carries an explicit sharding, its
    outputs then placed in the shardings of ``like`` (a pytree with the structure of
    ``f``'s outputs). Code inside ``f`` that reshapes sharded arrays or picks among arrays
    of different shardings needs no sharding annotations: XLA's propagation places it, as
    on an ``Auto`` mesh. Without explicit shardings: plain ``f(*args)``."""
    if not any(explicit_sharding(x) is not None for x in jax.tree.leaves(args)):
        return f(*args)
    out = jax.tree.map(explicit_sharding, like)
    missing = [jax.typeof(x) for x in jax.tree.leaves(like) if explicit_sharding(x) is None]
    if missing:
        raise ValueError(f"auto_axes_like: outputs of types {missing[:3]} have no explicit "
                         "sharding to be placed in")
    return jax.sharding.auto_axes(f, out_sharding=out)(*args)


def _known_sharding(p):
    """The param's sharding when known: a concrete array's ``NamedSharding``, or under
    ``jit`` the type's sharding when its mesh has explicit axes; else ``None``."""
    if isinstance(p, jax.core.Tracer):
        return explicit_sharding(p)
    s = getattr(p, "sharding", None)
    return s if isinstance(s, NamedSharding) else None


def like_params(tree: PyTree, params: PyTree) -> PyTree:
    """``tree`` with every array leaf placed with the sharding of its param.

    ``tree`` has the params' structure, with ``None`` allowed for dense leaves (masks,
    ``ever_active``, per-weight algorithm state). For concrete params with a
    ``NamedSharding`` each leaf is ``jax.device_put`` there; under ``jit`` the leaf gets
    ``jax.sharding.reshard`` to the param's sharding when the param's type carries one
    (explicit-axes meshes) and is left as it is otherwise (XLA's propagation decides).
    Leaves whose shape differs from their param's (factored statistics) are left as they
    are, as are params without a ``NamedSharding`` (single device).

    Args:
      tree: param-shaped pytree; ``None`` leaves stay ``None``.
      params: the params (arrays, or tracers under ``jit``).

    Returns:
      ``tree`` with the same structure and values.
    """

    def put(x, s, traced):
        if traced or isinstance(x, jax.core.Tracer):
            return jax.sharding.reshard(x, s.spec)
        return jax.device_put(x, s)

    def place(x, p):
        if x is None or not hasattr(x, "shape") or tuple(x.shape) != tuple(np.shape(p)):
            return x
        s = _known_sharding(p)
        if s is None:
            return x
        traced = isinstance(p, jax.core.Tracer)
        if _is_packed(x):  # bits of a packed mask: the param's spec, adapted to bytes
            ps = packed_sharding(s, tuple(x.shape))
            return jax.tree.map(lambda b: put(b, ps, traced), x)
        return put(x, s, traced)

    return jax.tree.map(place, tree, params, is_leaf=lambda x: x is None or _is_packed(x))


def shardings_of(tree: PyTree) -> PyTree:
    """The ``sharding`` of every array leaf (``None`` leaves stay ``None``)."""
    return jax.tree.map(lambda x: None if x is None else x.sharding, tree,
                        is_leaf=lambda x: x is None)


def _keystr_parts(path) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in path)


def state_shardings(state: PyTree, params: PyTree, param_shardings: PyTree,
                    default: NamedSharding) -> PyTree:
    """A ``NamedSharding`` for every leaf of an optimizer state (or any pytree holding
    param-shaped trees): a leaf whose key path ends with a param's key path and whose shape
    equals that param's gets the param's sharding (moments, masks, ``ever_active``, SNFS
    momentum, whatever the nesting: chain, inject_hyperparams, MultiSteps); every other
    leaf (counters, keys, hyperparameters) gets ``default``. The ``bits`` of a bit-packed
    mask (a node with ``bits`` and ``shape``, last axis packed) get the param's sharding
    adapted by :func:`packed_sharding`.

    Args:
      state: the state or its ``jax.eval_shape``.
      params: the params or their ``jax.eval_shape``.
      param_shardings: the params' shardings (same structure as ``params``).
      default: the sharding of everything else (usually replicated: ``P()``).
    """
    p_flat, _ = jax.tree_util.tree_flatten_with_path(params)
    s_leaves = jax.tree.leaves(param_shardings,
                               is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    by_path = {_keystr_parts(path): (tuple(np.shape(leaf)), s)
               for (path, leaf), s in zip(p_flat, s_leaves)}
    lengths = sorted({len(k) for k in by_path}, reverse=True)

    def lookup(parts, shape, packed):
        for n in lengths:
            hit = by_path.get(parts[len(parts) - n:]) if len(parts) >= n else None
            if hit is None:
                continue
            want, s = hit
            if not packed and want == shape:
                return s
            if (packed and want and shape == (*want[:-1], -(-want[-1] // 8))
                    and isinstance(s, NamedSharding)):
                return packed_sharding(s, want)
        return None

    def pick(path, leaf):
        parts = _keystr_parts(path)
        shape = tuple(np.shape(leaf))
        found = lookup(parts, shape, packed=False)
        if found is None and len(parts) > 1 and str(getattr(leaf, "dtype", "")) == "uint8":
            found = lookup(parts[:-1], shape, packed=True)  # a packed mask's bits
        return default if found is None else found

    return jax.tree_util.tree_map_with_path(pick, state)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree`` resharded to ``shardings`` by a jitted identity: works for arrays that span
    several processes, where eager ``device_put`` between meshes may not."""
    return jax.jit(lambda t: t, out_shardings=shardings)(tree)
