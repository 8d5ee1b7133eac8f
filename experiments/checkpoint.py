"""Orbax checkpoints of a whole training state (params, optimizer state with masks, step,
PRNG keys) plus JSON metadata (data-iterator position, config).

Any pytree is saved leaf by leaf under its flattening index; the metadata records every
leaf's path, shape and dtype, so restoring into a different model fails with an error that
names the first mismatching leaf instead of an opaque shape error. Typed PRNG keys
(``jax.random.key``) are stored as their raw ``key_data`` and re-wrapped on restore.

Restoring without a step takes the newest *intact* checkpoint: a step whose metadata or
arrays cannot be read (a run killed mid-save on a filesystem without atomic renames, a
truncated or edited file) is skipped with a warning naming it. Errors name the file or step
folder: :class:`CheckpointCorruptError` (unreadable), :class:`CheckpointWriteError` (the
directory cannot be written; the previous checkpoints are kept),
:class:`CheckpointMismatchError` (another model or optimizer).

Example:
  >>> ckpt = Checkpointer(workdir + "/checkpoints")
  >>> ckpt.save(step, state, {"data_position": [epoch, index]})
  >>> state, meta = ckpt.restore(fresh_state)     # newest intact step
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model or optimizer."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files cannot be read (truncated, corrupted or missing)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (read-only or full disk)."""


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _describe(tree):
    """``(paths, shapes, dtypes, leaves)`` of ``tree``; key leaves described as keys."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths, shapes, dtypes, leaves = [], [], [], []
    for path, leaf in flat:
        paths.append(jax.tree_util.keystr(path))
        if _is_key(leaf):
            shapes.append(list(leaf.shape))
            dtypes.append(f"key<{jax.random.key_impl(leaf)}>")
            leaves.append(jax.random.key_data(leaf))
        else:
            shapes.append(list(np.shape(leaf)))
            dtypes.append(str(np.asarray(leaf).dtype) if not hasattr(leaf, "dtype")
                          else str(leaf.dtype))
            leaves.append(leaf)
    return paths, shapes, dtypes, leaves


def _name(i: int) -> str:
    return f"leaf_{i:05d}"


class Checkpointer:
    """Saves / restores training states under ``directory/<step>/`` with Orbax.

    Args:
      directory: where the step folders go (created if needed).
      max_to_keep: how many recent checkpoints to keep.
      async_save: let Orbax write in the background (the arrays are copied first, so training
        can continue); call :meth:`wait` / :meth:`close` before reading them back.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict | None = None, force: bool = True) -> None:
        """Saves ``state`` (any pytree of arrays / typed keys) and JSON-able ``meta``.

        Raises:
          CheckpointWriteError: the directory cannot be written (naming it); the checkpoints
            already there are left as they were.
        """
        paths, shapes, dtypes, leaves = _describe(state)
        record = dict(meta or {})
        record["_leaves"] = {"paths": paths, "shapes": shapes, "dtypes": dtypes}
        arrays = {_name(i): x for i, x in enumerate(leaves)}
        self._check_writable(step)
        try:
            self._manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                        meta=ocp.args.JsonSave(record)),
                force=force,
            )
        except OSError as e:
            raise self._write_error(step, e) from e

    def _check_writable(self, step: int) -> None:
        # A probe file, not os.access: permission bits do not bind root, and an immutable or
        # read-only-mounted directory refuses writes whatever the bits say.
        probe = Path(self.directory) / f".write_probe_{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise self._write_error(step, e) from e

    def _write_error(self, step, e: OSError) -> CheckpointWriteError:
        kept = self.all_steps()
        return CheckpointWriteError(
            f"cannot write checkpoint step {step} to {self.directory} ({e.strerror or e}); "
            f"the checkpoints already there are kept (steps {kept}). Free space or make the "
            "directory writable, then resume.")

    def meta_path(self, step: int) -> Path:
        return Path(self.directory) / str(int(step)) / "meta" / "metadata"

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata saved with ``step`` (default: latest).

        Raises:
          CheckpointCorruptError: the metadata file is missing, truncated or not the
            checkpointer's (the message names the file).
        """
        step = self._resolve(step)
        path = self.meta_path(step)
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointCorruptError(
                f"{path}: checkpoint metadata unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("_leaves"), dict):
            raise CheckpointCorruptError(
                f"{path}: not a jaxsparse checkpoint's metadata (no '_leaves' record)")
        return meta

    def _resolve(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return int(step)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the checkpoint at ``step`` into ``target``'s structure.

        ``target`` is a state of the same model and optimizer (e.g. a fresh init); its arrays
        give the dtypes and shardings. Without ``step``, the newest intact checkpoint: broken
        newer ones are skipped with a warning naming them.

        Raises:
          CheckpointMismatchError: naming the first leaf whose path, shape or dtype differs.
          CheckpointCorruptError: ``step`` (or, without it, every checkpoint) is unreadable.
          FileNotFoundError: there is no checkpoint.
        """
        if step is not None:
            return self._restore_step(target, int(step))
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        broken = []
        for s in steps:
            try:
                return self._restore_step(target, s)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable step: try an older one
                broken.append(f"{Path(self.directory) / str(s)} ({type(e).__name__}: {e})")
                if s != steps[-1]:
                    warnings.warn(f"checkpoint {broken[-1]} is broken; falling back to the "
                                  "next older one", stacklevel=2)
        raise CheckpointCorruptError("no intact checkpoint: " + "; ".join(broken))

    def _restore_step(self, target: Any, step: int) -> tuple[Any, dict]:
        meta = self.read_meta(step)
        saved = meta.pop("_leaves")
        paths, shapes, dtypes, leaves = _describe(target)
        check_compatible(saved, {"paths": paths, "shapes": shapes, "dtypes": dtypes},
                         where=f"{self.directory} step {step}", meta=meta)
        abstract = {_name(i): x for i, x in enumerate(leaves)}
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
            raise CheckpointCorruptError(
                f"{Path(self.directory) / str(step) / 'state'}: arrays unreadable "
                f"({type(e).__name__}: {e})") from e
        restored = out["state"]
        _, treedef = jax.tree_util.tree_flatten(target)
        target_leaves = jax.tree_util.tree_leaves(target)
        new_leaves = []
        for i, t in enumerate(target_leaves):
            x = restored[_name(i)]
            if _is_key(t):
                x = jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
            new_leaves.append(x)
        return jax.tree_util.tree_unflatten(treedef, new_leaves), meta

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except OSError as e:
            raise self._write_error("(in progress)", e) from e

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_compatible(saved: dict, current: dict, where: str = "checkpoint",
                     meta: dict | None = None) -> None:
    """Raises :class:`CheckpointMismatchError` if two leaf descriptions differ."""
    hint = ""
    if meta and "model" in meta:
        hint = f" (the checkpoint was written by model {meta['model']})"
    s_paths, c_paths = saved["paths"], current["paths"]
    if s_paths != c_paths:
        only_saved = [p for p in s_paths if p not in set(c_paths)]
        only_here = [p for p in c_paths if p not in set(s_paths)]
        raise CheckpointMismatchError(
            f"{where} does not match this model/optimizer{hint}: "
            f"{len(s_paths)} leaves saved vs {len(c_paths)} here; only in the checkpoint: "
            f"{only_saved[:5]}; only here: {only_here[:5]}"
        )
    bad = [
        f"{p} is {s_dt}{list(s_shape)} in the checkpoint but {c_dt}{list(c_shape)} here"
        for p, s_shape, c_shape, s_dt, c_dt in zip(
            s_paths, saved["shapes"], current["shapes"], saved["dtypes"], current["dtypes"],
            strict=True,
        )
        if list(s_shape) != list(c_shape) or s_dt != c_dt
    ]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointMismatchError(
            f"{where} does not match this model/optimizer{hint}: leaf " + "; leaf ".join(bad[:3])
            + more
        )
