"""CPU path for condensed inference: a fused C++ kernel behind an XLA FFI custom call.

No pure-XLA formulation beats the dense matmul at 90% sparsity on CPU (every one of them
materialises the ``[batch, n_active, k]`` gather), so the CPU path is a small C++ kernel
(``condensed_cpu.cc``) compiled lazily, on first use, with the machine's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) and the XLA FFI headers shipped with jaxlib
(``jax.ffi.include_dir()``), cached in ``$JAXSPARSE_CACHE_DIR`` (default
``~/.cache/jaxsparse``) under a hash of the source, compiler, flags and CPU. Without a
compiler (or when the build fails) :func:`condensed_matmul_cpu` warns once and runs the XLA
formulation :func:`condensed_matmul_xla` instead.

Example:
    >>> y = condensed_matmul_cpu(x, layer.values, layer.indices, layer.bias)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.condensed.reference import condensed_matmul_reference

SOURCE = Path(__file__).with_name("condensed_cpu.cc")
TARGET_NAME = "jaxsparse_condensed_matmul"
SYMBOL = "JaxsparseCondensedMatmul"
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None, "warned": False}


class BuildError(RuntimeError):
    """The C++ kernel could not be built (no compiler, or the compiler failed)."""


def cache_dir() -> Path:
    return Path(os.environ.get("JAXSPARSE_CACHE_DIR", Path.home() / ".cache" / "jaxsparse"))


def find_compiler() -> str | None:
    """``$CXX`` if set (an empty value disables the build), else the first C++ compiler found."""
    if "CXX" in os.environ:
        cxx = os.environ["CXX"]
        return shutil.which(cxx) if cxx else None
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def build(force: bool = False) -> Path:
    """Compiles the kernel (if not cached) and returns the shared library's path."""
    cxx = find_compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), cxx, version, " ".join(CXXFLAGS), include, jax.__version__,
             _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"condensed_cpu_{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"building the condensed CPU kernel failed:\n{' '.join(cmd)}\n"
                         f"{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders never see a partial file
    return out


def load() -> bool:
    """Builds and registers the FFI target once per process; ``False`` if unavailable."""
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            jax.ffi.register_ffi_target(
                TARGET_NAME, jax.ffi.pycapsule(getattr(lib, SYMBOL)), platform="cpu"
            )
            _state["loaded"] = True
        except (BuildError, OSError, AttributeError) as e:
            _state["loaded"], _state["error"] = False, e
        return _state["loaded"]


def available() -> bool:
    """Whether the fused C++ kernel can be used in this process."""
    return load()


def _reset_for_tests() -> None:
    with _lock:
        _state.update(loaded=None, error=None, warned=False)


def condensed_matmul_xla(x, values, indices, bias):
    """Pure-XLA fallback (the reference formulation; materialises the gather)."""
    return condensed_matmul_reference(x, values, indices, bias)


@jax.custom_batching.custom_vmap
def _ffi_call(x, values, indices, bias):
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)
    out = jax.ShapeDtypeStruct((x2.shape[0], values.shape[0]), x.dtype)
    y = jax.ffi.ffi_call(TARGET_NAME, out)(x2, values, indices, bias)
    return y.reshape(*lead, values.shape[0])


@_ffi_call.def_vmap
def _ffi_call_vmap(axis_size, in_batched, x, values, indices, bias):
    x_b, *w_b = in_batched
    if not any(w_b):  # batched inputs only: the kernel takes any leading axes
        x = x if x_b else jnp.broadcast_to(x, (axis_size, *x.shape))
        return _ffi_call(x, values, indices, bias), True
    # Per-example weights: no fused kernel for that; use the XLA formulation.
    axes = tuple(0 if b else None for b in in_batched)
    return jax.vmap(condensed_matmul_xla, in_axes=axes)(x, values, indices, bias), True


def check_operands(x, values, indices, bias) -> None:
    """Shape/dtype checks shared by every kernel wrapper (static, so cheap under jit)."""
    if values.ndim != 2 or indices.shape != values.shape:
        raise ValueError(
            f"values {values.shape} and indices {indices.shape} must both be [n_active, k]"
        )
    if bias is not None and bias.shape != (values.shape[0],):
        raise ValueError(f"bias shape {bias.shape} must be ({values.shape[0]},)")
    if x.ndim < 1:
        raise ValueError("x must have a trailing n_in axis")
    if x.dtype != values.dtype or (bias is not None and bias.dtype != values.dtype):
        raise TypeError(
            f"x ({x.dtype}), values ({values.dtype}) and bias "
            f"({None if bias is None else bias.dtype}) must share one dtype"
        )
    if indices.dtype not in (jnp.int8, jnp.int16, jnp.int32):
        raise TypeError(f"indices must be int8, int16 or int32, got {indices.dtype}")


def condensed_matmul_cpu(x, values, indices, bias=None, *, fallback: bool = True):
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i, j]] + bias[i]`` on CPU.

    Uses the fused C++ kernel (float32 / bfloat16). Out-of-range indices raise an error at
    run time (the kernel checks them before reading). When the kernel is unavailable, warns
    once and uses :func:`condensed_matmul_xla` (``fallback=False`` raises instead).
    """
    check_operands(x, values, indices, bias)
    if bias is None:
        bias = jnp.zeros((values.shape[0],), values.dtype)
    if x.dtype in (jnp.float32, jnp.bfloat16) and load():
        return _ffi_call(x, values, indices, bias)
    if not fallback:
        raise BuildError(f"condensed CPU kernel unavailable: {_state['error']}")
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            "jaxsparse: the fused condensed CPU kernel is unavailable "
            f"({_state['error'] or f'dtype {x.dtype}'}); using the slower XLA formulation.",
            RuntimeWarning,
            stacklevel=2,
        )
    return condensed_matmul_xla(x, values, indices, bias)
