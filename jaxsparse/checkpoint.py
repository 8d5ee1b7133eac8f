"""Sharded Orbax checkpoints of training states that hold sparse masks, with the masks
bit-packed on disk and a manifest that refuses the wrong model.

* :func:`pack_masks` / :func:`unpack_masks`: every ``bool`` leaf of a tree (masks,
  ``ever_active``) <-> ``uint8`` with its last axis packed eight to a byte
  (``ceil(n / 8)`` bytes per row: at most 1 bit per weight plus row padding). Every other
  axis, and the sharding, are kept: packing runs under ``jit`` with the mask's
  ``PartitionSpec`` (the packed axis stays sharded when each shard holds a multiple of 8
  entries, and is replicated otherwise); unpacking puts each mask back on the sharding of
  the target you restore into. (Flattening before ``packbits`` loses both.)
* :class:`Checkpointer`: ``save(step, state)`` from every process of a multi-process job
  (each writes its own shards, Orbax/TensorStore), ``restore(target)`` onto any mesh and
  process count: the target's shardings decide where every shard goes (2 -> 1 process,
  4x2 -> 8x1 mesh). A JSON manifest next to the arrays records every leaf's path, shape,
  dtype and the writer's mesh and process count; restoring into a different model fails
  naming the first mismatching leaf and the manifest file, and with
  ``allow_reshard=False`` a different mesh or process count is refused. An existing step
  is never overwritten.

Typed PRNG keys are stored as their ``key_data`` and re-wrapped on restore. Nothing is
loaded with pickle.

Example:
  >>> ckpt = Checkpointer(workdir + "/checkpoints")
  >>> ckpt.save(step, state)                       # every process calls it
  >>> state = ckpt.restore(fresh_state)            # fresh_state: arrays or ShapeDtypeStructs
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding

from jaxsparse.sharding import packed_sharding

PyTree = Any
FORMAT = "jaxsparse-checkpoint-1"
MANIFEST = "manifest"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the target (other model, other topology), or a save
    that would overwrite one."""


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl_name(x) -> str:
    """The PRNG implementation's name of a key array or of its ``ShapeDtypeStruct``."""
    return str(x.dtype._impl.name)


def _is_bool(x) -> bool:
    return hasattr(x, "dtype") and x.dtype == jnp.bool_ and len(getattr(x, "shape", ())) >= 1


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a packed mask: the last axis becomes ``ceil(n / 8)``."""
    return (*shape[:-1], -(-shape[-1] // 8))


def _packed_sharding(s, shape):
    """The mask's sharding with the last axis replicated when its shards do not hold whole
    bytes (or ``None`` without a ``NamedSharding``)."""
    if not isinstance(s, NamedSharding):
        return None
    return packed_sharding(s, shape)


def _pack_one(m):
    out_sharding = _packed_sharding(getattr(m, "sharding", None), m.shape)
    fn = jax.jit(lambda x: jnp.packbits(x, axis=-1), out_shardings=out_sharding)
    return fn(m)


def pack_masks(tree: PyTree) -> PyTree:
    """Every ``bool`` leaf of rank >= 1 as ``uint8`` with the last axis bit-packed; other
    leaves (and ``None``) unchanged. Sharding is kept (see the module docstring)."""
    return jax.tree.map(lambda x: _pack_one(x) if _is_bool(x) else x, tree)


def unpack_masks(packed: PyTree, like: PyTree) -> PyTree:
    """Inverse of :func:`pack_masks`: where ``like`` (arrays or ``ShapeDtypeStruct``) has a
    ``bool`` leaf, unpacks ``packed``'s leaf to ``like``'s shape and sharding.

    Raises:
      CheckpointError: naming the leaf when a packed leaf does not fit ``like``'s shape.
    """
    flat_like, treedef = jax.tree_util.tree_flatten_with_path(like)
    flat_packed = treedef.flatten_up_to(packed)
    out = []
    for (path, want), got in zip(flat_like, flat_packed):
        if not _is_bool(want):
            out.append(got)
            continue
        if tuple(got.shape) != packed_shape(tuple(want.shape)) or got.dtype != jnp.uint8:
            raise CheckpointError(
                f"packed mask {jax.tree_util.keystr(path)} has shape {tuple(got.shape)} "
                f"{got.dtype}; expected uint8{packed_shape(tuple(want.shape))} for a mask "
                f"of shape {tuple(want.shape)}")
        n = want.shape[-1]
        s = getattr(want, "sharding", None)
        fn = jax.jit(lambda x, n=n: jnp.unpackbits(x, axis=-1, count=n).astype(jnp.bool_),
                     out_shardings=s if isinstance(s, NamedSharding) else None)
        out.append(fn(got))
    return treedef.unflatten(out)


def _to_disk(tree):
    """Keys -> key data, masks -> packed bits; returns the tree and the manifest leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves, manifest = [], []
    for path, x in flat:
        entry = {"path": jax.tree_util.keystr(path), "shape": list(np.shape(x))}
        if _is_key(x):
            entry["dtype"] = f"key<{_key_impl_name(x)}>"
            x = jax.random.key_data(x)
        else:
            entry["dtype"] = str(np.dtype(x.dtype))
            if _is_bool(x):
                entry["packed"] = True
                x = _pack_one(x)
        leaves.append(x)
        manifest.append(entry)
    return treedef.unflatten(leaves), manifest


def _abstract_on_disk(target):
    """What :func:`_to_disk` of ``target`` would write, as ``ShapeDtypeStruct`` with the
    target's shardings (where the restored shards go)."""

    def one(x):
        s = getattr(x, "sharding", None)
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=s)
        if _is_bool(x):
            shape = packed_shape(tuple(x.shape))
            return jax.ShapeDtypeStruct(shape, jnp.uint8,
                                        sharding=_packed_sharding(s, tuple(x.shape)))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, target)


def _from_disk(restored, target):
    flat_t, treedef = jax.tree_util.tree_flatten_with_path(target)
    flat_r = treedef.flatten_up_to(restored)
    out = []
    for (_, want), got in zip(flat_t, flat_r):
        if _is_key(want):
            got = jax.random.wrap_key_data(got, impl=_key_impl_name(want))
        out.append(got)
    tree = treedef.unflatten(out)
    return unpack_masks(tree, target)


def _mesh_of(tree):
    for x in jax.tree.leaves(tree):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding):
            return {"shape": [int(v) for v in s.mesh.shape.values()],
                    "axes": [str(a) for a in s.mesh.axis_names]}
    return None


class Checkpointer:
    """Saves / restores pytrees under ``directory/<step>/`` (Orbax ``CheckpointManager``).

    Args:
      directory: where the step folders go (created if needed).
      max_to_keep: how many recent steps to keep (``None``: all).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 2):
        # epath: local folders and cloud buckets (gs://...) alike.
        directory = os.fspath(directory)
        self.directory = epath.Path(directory if "://" in directory
                                    else os.path.abspath(directory))
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps(read=True))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def manifest_path(self, step: int) -> epath.Path:
        return self.directory / str(step) / MANIFEST

    def save(self, step: int, tree: PyTree, shardings: PyTree | None = None) -> None:
        """Writes ``tree`` at ``step`` (every process must call it with its global arrays).

        ``shardings``, if given, is unused beyond a structure check (the arrays carry
        theirs) and kept for symmetry with :meth:`restore`.

        Raises:
          CheckpointError: if ``step`` already exists (nothing is overwritten).
        """
        if shardings is not None:
            jax.tree.structure(tree)  # noqa: B018 - a structure mismatch raises below
        step = int(step)
        if step in self._mgr.all_steps(read=True):
            raise CheckpointError(
                f"checkpoint step {step} already exists in {str(self.directory)!r}; "
                f"refusing to overwrite it (restore it, or save under another step)")
        on_disk, leaves = _to_disk(tree)
        # Every queued device program (train steps, the packing above) finishes before
        # Orbax's threads copy the arrays out. Independent programs with collectives may run
        # at once, and on simulated CPU devices with few cores they can block each other
        # (an LM benchmark aborted with "Gloo AllGather failed: Application timeout").
        on_disk = jax.block_until_ready(on_disk)
        manifest = {"format": FORMAT, "leaves": leaves, "process_count": jax.process_count(),
                    "mesh": _mesh_of(tree)}
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(on_disk), manifest=ocp.args.JsonSave(manifest)))
        self._mgr.wait_until_finished()

    def read_manifest(self, step: int) -> dict:
        if step not in self._mgr.all_steps(read=True):
            raise CheckpointError(f"no checkpoint step {step} in {str(self.directory)!r} "
                                  f"(steps: {self.steps()})")
        return self._mgr.restore(step, args=ocp.args.Composite(
            manifest=ocp.args.JsonRestore()))["manifest"]

    def check(self, target: PyTree, step: int, allow_reshard: bool = True) -> dict:
        """The manifest of ``step`` after checking that it fits ``target``.

        Raises:
          CheckpointError: naming the manifest file and the first leaf whose path, shape or
            dtype differs; or, with ``allow_reshard=False``, a different process count or
            mesh.
        """
        manifest = self.read_manifest(step)
        where = str(self.manifest_path(step))
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a {FORMAT} checkpoint "
                                  f"(format {manifest.get('format')!r})")
        _, want = _to_disk_manifest(target)
        saved = manifest["leaves"]
        for i, (w, s) in enumerate(zip(want, saved)):
            if (w["path"], w["shape"], w["dtype"]) != (s["path"], s["shape"], s["dtype"]):
                raise CheckpointError(
                    f"{where}: leaf {i} is {s['path']} {s['dtype']}{s['shape']} in the "
                    f"checkpoint but {w['path']} {w['dtype']}{w['shape']} in the target; "
                    f"this checkpoint was written for a different model or optimizer")
        if len(want) != len(saved):
            extra = (saved if len(saved) > len(want) else want)[min(len(want), len(saved))]
            raise CheckpointError(
                f"{where}: the checkpoint has {len(saved)} leaves, the target {len(want)} "
                f"(first unmatched: {extra['path']}); a different model or optimizer")
        if not allow_reshard:
            here = {"process_count": jax.process_count(), "mesh": _mesh_of(target)}
            for k in ("process_count", "mesh"):
                if manifest.get(k) != here[k]:
                    raise CheckpointError(
                        f"{where}: saved with {k}={manifest.get(k)} but restoring with "
                        f"{k}={here[k]}; pass allow_reshard=True to reshard onto this "
                        f"topology")
        return manifest

    def restore(self, target: PyTree, step: int | None = None,
                allow_reshard: bool = True) -> PyTree:
        """``step`` (default: latest) restored into ``target``'s structure and shardings.

        ``target`` holds arrays or ``jax.ShapeDtypeStruct`` with the shardings wanted now
        (any mesh, any process count): each process reads only its shards.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no checkpoint in {str(self.directory)!r}")
        self.check(target, step, allow_reshard)
        abstract = _abstract_on_disk(target)
        restored = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return _from_disk(restored, target)

    def close(self) -> None:
        self._mgr.close()


def _to_disk_manifest(tree):
    """The manifest entries :func:`_to_disk` would write for ``tree`` (no device work)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, x in flat:
        entry = {"path": jax.tree_util.keystr(path), "shape": list(np.shape(x))}
        entry["dtype"] = (f"key<{_key_impl_name(x)}>" if _is_key(x)
                          else str(np.dtype(x.dtype)))
        out.append(entry)
    return None, out


def disk_bytes(directory: str | os.PathLike) -> int:
    """Total size of the files under a local ``directory`` (bits-per-weight accounting)."""
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(os.fspath(directory)) for f in files)


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)
