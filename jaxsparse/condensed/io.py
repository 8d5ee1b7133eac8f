"""A safe, versioned file format for condensed models: npz arrays + JSON metadata.

Reading a received model must never run code, so there is no pickle anywhere: the file is
a zip of ``.npy`` arrays (read with ``allow_pickle=False``) plus one JSON document stored as
bytes in the ``__metadata__`` entry. Every load is validated before anything is built:
format name and version, the exact set of arrays, each array's shape and dtype against the
metadata, index and neuron ranges, and for MLPs that each layer reads what the previous one
writes. Damaged files (zip CRC errors, truncation) and files of another version are refused
with an error naming the file.

Saved objects: a :class:`CondensedLinear`, a :class:`SparseLinear`, a dict of them (what
:func:`jaxsparse.condense` returns) or a :class:`CondensedMLP` (its activation by name).
bfloat16 arrays are stored as their uint16 bit patterns with the dtype in the metadata.

Example:
    >>> layers = jaxsparse.condense(params, masks)
    >>> save_condensed("model.npz", layers)
    >>> layers2 = load_condensed("model.npz")        # same layers, validated
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.condensed.dispatch import SparseLinear
from jaxsparse.condensed.export import CondensedLinear, StructuredLinear, validate_condensed
from jaxsparse.condensed.model import CondensedMLP

FORMAT = "jaxsparse.condensed"
VERSION = 1
METADATA_KEY = "__metadata__"

#: Activations a CondensedMLP file can name (functions of ``jax.nn`` only: nothing else is
#: ever looked up from a file).
ACTIVATIONS: dict[str, Callable] = {
    name: getattr(jax.nn, name)
    for name in ("relu", "relu6", "gelu", "silu", "swish", "tanh", "sigmoid", "elu", "selu",
                 "softplus", "leaky_relu", "celu", "hard_tanh", "identity")
    if hasattr(jax.nn, name)
}
_VALUE_DTYPES = ("float32", "bfloat16", "float16")
_INDEX_DTYPES = ("int8", "int16", "int32")


class CondensedFileError(ValueError):
    """A condensed model file is damaged, of another version, or inconsistent."""


# ----------------------------------------------------------------------------- save


def _to_numpy(x) -> tuple[np.ndarray, str]:
    a = np.asarray(jax.device_get(x))
    dtype = str(a.dtype)
    if dtype == "bfloat16":
        a = a.view(np.uint16)
    return np.ascontiguousarray(a), dtype


def _layer_record(layer: CondensedLinear | SparseLinear, name: str,
                  arrays: dict[str, np.ndarray], prefix: str) -> dict:
    structured = None
    if isinstance(layer, SparseLinear):
        structured, layer = layer.structured, layer.condensed
    if not isinstance(layer, CondensedLinear):
        raise TypeError(f"{name}: cannot save a {type(layer).__name__}; expected a "
                        "CondensedLinear or SparseLinear")
    validate_condensed(layer, name)
    rec: dict[str, Any] = {
        "name": name, "n_in": int(layer.n_in), "n_out": int(layer.n_out),
        "n_active": int(layer.n_active), "k": int(layer.k), "padded": bool(layer.padded),
        "group_size": int(layer.group_size), "structured": structured is not None,
    }
    for field in ("values", "indices", "bias", "neurons", "ablated_bias"):
        arrays[f"{prefix}.{field}"], dt = _to_numpy(getattr(layer, field))
        rec[f"{field}_dtype"] = dt
    if structured is not None:
        arrays[f"{prefix}.structured_kernel"], rec["structured_kernel_dtype"] = _to_numpy(
            structured.kernel)
    return rec


def _activation_name(fn: Callable) -> str:
    for name, f in ACTIVATIONS.items():
        if f is fn:
            return name
    raise ValueError(
        f"activation {getattr(fn, '__name__', fn)!r} cannot be stored by name; a model file "
        f"names one of {sorted(ACTIVATIONS)} (pass activation= to load_condensed for others)"
    )


def save_condensed(path: str | os.PathLike, model, *, activation_name: str | None = None
                   ) -> Path:
    """Writes a condensed model to ``path`` (atomically: a crash leaves no partial file).

    Args:
        path: the file to write (conventionally ``.npz``).
        model: a :class:`CondensedLinear`, :class:`SparseLinear`, ``dict[str, ...]`` of
            them, or a :class:`CondensedMLP`.
        activation_name: for a :class:`CondensedMLP` whose activation is not one of
            :data:`ACTIVATIONS`, the name to record (the loader then needs ``activation=``).

    Returns:
        The path written.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if isinstance(model, CondensedMLP):
        meta["kind"] = "mlp"
        meta["activation"] = activation_name or _activation_name(model.activation)
        items = [(f"layer {i}", layer) for i, layer in enumerate(model.layers)]
    elif isinstance(model, dict):
        meta["kind"] = "dict"
        for key in model:
            if not isinstance(key, str):
                raise TypeError(f"layer names must be strings, got {key!r}")
        items = list(model.items())
    elif isinstance(model, (CondensedLinear, SparseLinear)):
        meta["kind"] = "sparse_linear" if isinstance(model, SparseLinear) else "layer"
        items = [("layer", model)]
    else:
        raise TypeError(f"cannot save a {type(model).__name__}: expected a CondensedLinear, "
                        "SparseLinear, dict of them, or CondensedMLP")
    meta["layers"] = [_layer_record(layer, name, arrays, f"l{i}")
                      for i, (name, layer) in enumerate(items)]
    arrays[METADATA_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------- load


def _fail(path: Path, msg: str) -> CondensedFileError:
    return CondensedFileError(f"{path}: {msg}")


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot read the file ({e})") from e
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise _fail(path, f"not a readable condensed model file (damaged or not npz: "
                          f"{type(e).__name__}: {e})") from e
    raw = arrays.pop(METADATA_KEY, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise _fail(path, f"no {METADATA_KEY} entry: not a jaxsparse condensed model file")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, f"format {meta.get('format') if isinstance(meta, dict) else meta!r}"
                          f" is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise _fail(path, f"written in format version {meta.get('version')!r}; this jaxsparse "
                          f"reads version {VERSION}")
    return meta, arrays


def _int(rec: dict, key: str, path: Path, name: str) -> int:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _fail(path, f"{name}: metadata {key}={v!r} is not a non-negative int")
    return v


def _array(arrays: dict, key: str, shape: tuple, dtype: str, allowed, path: Path,
           name: str, field: str) -> jax.Array:
    if dtype not in allowed:
        raise _fail(path, f"{name}: {field} dtype {dtype!r} is not one of {list(allowed)}")
    a = arrays.pop(key, None)
    if a is None:
        raise _fail(path, f"{name}: array {field} ({key}) is missing")
    stored = "uint16" if dtype == "bfloat16" else dtype
    if a.dtype != np.dtype(stored) or a.shape != shape:
        raise _fail(path, f"{name}: {field} is {a.dtype}{list(a.shape)}, the metadata says "
                          f"{dtype}{list(shape)}")
    if dtype == "bfloat16":
        a = a.view(jnp.bfloat16)
    return jnp.asarray(a)


def _load_layer(rec, arrays, prefix, path: Path):
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        raise _fail(path, f"layer record {prefix} is malformed")
    name = rec["name"]
    n_in, n_out, n_active, k, g = (_int(rec, f, path, name) for f in
                                   ("n_in", "n_out", "n_active", "k", "group_size"))
    if g < 1 or n_active % g:
        raise _fail(path, f"{name}: group_size={g} does not divide n_active={n_active}")
    vdt = rec.get("values_dtype")

    def get(field, shape, dtype, allowed):
        return _array(arrays, f"{prefix}.{field}", shape, dtype, allowed, path, name, field)

    values = get("values", (n_active, k), vdt, _VALUE_DTYPES)
    indices = get("indices", (n_active // g, k), rec.get("indices_dtype"), _INDEX_DTYPES)
    bias = get("bias", (n_active,), rec.get("bias_dtype"), (vdt,))
    neurons = get("neurons", (n_active,), rec.get("neurons_dtype"), ("int32",))
    ablated = get("ablated_bias", (n_out,), rec.get("ablated_bias_dtype"), (vdt,))
    layer = CondensedLinear(values, indices, bias, neurons, ablated, n_in, n_out,
                            padded=bool(rec.get("padded", False)), group_size=g)
    try:
        validate_condensed(layer, name)
    except (ValueError, TypeError) as e:
        raise _fail(path, str(e)) from e
    if not rec.get("structured"):
        return layer
    kernel = get("structured_kernel", (n_in, n_active), rec.get("structured_kernel_dtype"),
                 (vdt,))
    return SparseLinear(layer, StructuredLinear(kernel, bias, neurons, ablated, n_in, n_out))


def load_condensed(path: str | os.PathLike, *, activation: Callable | None = None):
    """Reads a file written by :func:`save_condensed`, validating everything first.

    Args:
        path: the model file.
        activation: for an MLP file, overrides the activation named in the file (needed when
            the file names one that is not in :data:`ACTIVATIONS`).

    Returns:
        What was saved: a :class:`CondensedLinear`, :class:`SparseLinear`, dict of them, or
        a :class:`CondensedMLP`.

    Raises:
        CondensedFileError: (a ``ValueError``) naming the file and what is wrong with it.
    """
    path = Path(path)
    meta, arrays = _read(path)
    kind, records = meta.get("kind"), meta.get("layers")
    if kind not in ("layer", "sparse_linear", "dict", "mlp"):
        raise _fail(path, f"unknown kind {kind!r}")
    if not isinstance(records, list) or (kind != "dict" and not records):
        raise _fail(path, "metadata has no layer list")
    layers = [_load_layer(rec, arrays, f"l{i}", path) for i, rec in enumerate(records)]
    if arrays:
        raise _fail(path, f"unexpected arrays {sorted(arrays)[:5]} not in the metadata")
    if kind in ("layer", "sparse_linear"):
        if len(layers) != 1 or (kind == "sparse_linear") != isinstance(layers[0], SparseLinear):
            raise _fail(path, f"a {kind!r} file holds exactly one such layer")
        return layers[0]
    if kind == "dict":
        return {rec["name"]: layer for rec, layer in zip(records, layers, strict=True)}
    fn = activation
    if fn is None:
        name = meta.get("activation")
        if name not in ACTIVATIONS:
            raise _fail(path, f"activation {name!r} is not one of {sorted(ACTIVATIONS)}; pass "
                              "activation= to load_condensed")
        fn = ACTIVATIONS[name]
    layers = [lyr if isinstance(lyr, SparseLinear) else SparseLinear(lyr) for lyr in layers]
    for i in range(1, len(layers)):
        if layers[i].n_in != layers[i - 1].n_active:
            raise _fail(path, f"layer {i} reads n_in={layers[i].n_in} features but layer "
                              f"{i - 1} outputs n_active={layers[i - 1].n_active}")
    return CondensedMLP(tuple(layers), fn)
