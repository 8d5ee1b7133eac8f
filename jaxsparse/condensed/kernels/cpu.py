"""CPU path for condensed inference: a fused C++ kernel behind an XLA FFI custom call.

No pure-XLA formulation beats the dense matmul at 90% sparsity on CPU (every one of them
materialises the ``[batch, n_active, k]`` gather), so the CPU path is a small C++ kernel
(``condensed_cpu.cc``) compiled lazily, on first use, with the machine's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) and the XLA FFI headers shipped with jaxlib
(``jax.ffi.include_dir()``), cached in ``$JAXSPARSE_CACHE_DIR`` (default the per-user
``~/.cache/jaxsparse``) under a hash of the source, compiler, flags and CPU. Without a
compiler (or when the build fails) :func:`condensed_matmul_cpu` warns once and runs the XLA
formulation :func:`condensed_matmul_xla` instead.

Loading a shared library runs its code, so the cache is guarded (issue 13): the directory is
created with mode 0700 and refused when another user owns it or can write to it; the
build records the library's SHA-256 beside it, and a cached library is loaded only if its
bytes (read once, then loaded from an anonymous in-memory file on Linux) match that record.
A refused cache means the XLA fallback, with a warning that names the path and the reason.

Example:
    >>> y = condensed_matmul_cpu(x, layer.values, layer.indices, layer.bias)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsparse.condensed.checks import check_index_range, check_operands
from jaxsparse.condensed.reference import condensed_matmul_reference

SOURCE = Path(__file__).with_name("condensed_cpu.cc")
TARGET_NAME = "jaxsparse_condensed_matmul"
SYMBOL = "JaxsparseCondensedMatmul"
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
CACHE_FORMAT = "v2: sha256 record beside the library"

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None, "warned": False}


class BuildError(RuntimeError):
    """The C++ kernel could not be built (no compiler, or the compiler failed)."""


class CacheError(BuildError):
    """The kernel cache directory or a cached library failed a safety check."""


def cache_dir() -> Path:
    """``$JAXSPARSE_CACHE_DIR``, else the per-user ``~/.cache/jaxsparse``."""
    return Path(os.environ.get("JAXSPARSE_CACHE_DIR", Path.home() / ".cache" / "jaxsparse"))


def _owned_private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else (no group/other write bit)."""
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    return st.st_uid == uid and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def secure_cache_dir(path: Path | None = None) -> Path:
    """Creates the cache directory (mode 0700) or checks an existing one.

    A library loaded from a directory another user can write to runs their code (a planted
    ``.so`` runs its constructor when loaded), so a directory (or a symlink to one) that is
    not owned by this user or is group/world-writable is refused with :class:`CacheError`.
    """
    path = Path(path or cache_dir())
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(f"kernel cache {path} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"kernel cache {path} is not a directory")
    if not _owned_private(st):
        raise CacheError(
            f"kernel cache {path} is writable by other users or not owned by this user "
            f"(mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}); refusing to load "
            "compiled code from it. Use a private directory: unset JAXSPARSE_CACHE_DIR or "
            "point it at a directory with mode 0700."
        )
    return path


def checksum_path(lib: Path) -> Path:
    """Where the SHA-256 of a built library is recorded (next to it, written at build)."""
    return lib.with_suffix(".sha256")


def read_verified(lib: Path) -> bytes:
    """The bytes of a cached library, after checking owner, mode and recorded checksum.

    Raises:
        CacheError: the library or its checksum record is missing, is a symlink, is
            writable by others, or the library's SHA-256 differs from the one recorded when
            it was built (tampered with or corrupted).
    """
    record = checksum_path(lib)
    for f in (lib, record):
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            raise CacheError(
                f"{f} is missing: {lib} has no checksum recorded at build time (not built by "
                "jaxsparse); refusing to load it. Delete it to rebuild."
            ) from None
        if not stat.S_ISREG(st.st_mode) or not _owned_private(st):
            raise CacheError(
                f"{f} is not a regular file owned by this user and writable only by it; "
                "refusing to load it"
            )
    data = lib.read_bytes()
    want = record.read_text().strip()
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise CacheError(
            f"{lib}: SHA-256 {got[:16]}... differs from the {want[:16]}... recorded at build "
            "time (tampered with or corrupted); refusing to load it. Delete it to rebuild."
        )
    return data


_OPEN_LIBRARY_FDS: list[int] = []


def _dlopen_bytes(data: bytes, path: Path) -> ctypes.CDLL:
    """Loads exactly the verified bytes (no window to swap the file between check and load).

    On Linux the bytes go to an anonymous in-memory file that nobody else can write; other
    systems load the verified path.
    """
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create(f"jaxsparse_{path.stem}", 0)
        try:
            os.write(fd, data)
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        except OSError:
            os.close(fd)
            raise
        # The descriptor stays open: the dynamic loader knows a library by its path, and a
        # closed descriptor's number (hence "/proc/self/fd/N") is reused by the next one, so
        # a second library would be taken for the first, already loaded one.
        _OPEN_LIBRARY_FDS.append(fd)
        return lib
    return ctypes.CDLL(str(path))


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


def _compiler() -> str:
    cxx = find_compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    return cxx


def _cached_path(sources, stem: str, cxx: str) -> Path:
    """Cache path of a library built from ``sources`` (all hashed, with the compiler, flags,
    JAX and CPU); creates or checks the cache directory (:func:`secure_cache_dir`)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [*(src.read_text() for src in sources), cxx, version, " ".join(CXXFLAGS),
             jax.ffi.include_dir(), jax.__version__, _cpu_signature(), CACHE_FORMAT]
        ).encode()
    ).hexdigest()[:16]
    return secure_cache_dir() / f"{stem}_{key}.so"


def _build_library(source: Path, out: Path, cxx: str, what: str, force: bool) -> Path:
    """Compiles ``source`` into ``out`` (if not cached) and records its SHA-256 beside it
    (:func:`checksum_path`); loading verifies it."""
    if out.exists() and not force:
        return out
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, f"-I{jax.ffi.include_dir()}", f"-I{source.parent}", str(source),
           "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"building {what} failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    os.chmod(tmp, 0o700)  # whatever the umask: writable by this user only
    digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
    fd, tmp_sum = tempfile.mkstemp(suffix=".sha256", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        f.write(digest + "\n")
    # Atomic renames: concurrent builders never see a partial file. The library goes first;
    # a reader that finds it without its record refuses it rather than trusting it.
    os.replace(tmp, out)
    os.replace(tmp_sum, checksum_path(out))
    return out


def _load_library(state: dict, lock, build_fn, targets: dict[str, str]) -> bool:
    """Builds (``build_fn() -> path``), verifies, loads and registers ``{ffi target: symbol}``
    once per process; the outcome and any error are kept in ``state``."""
    with lock:
        if state["loaded"] is not None:
            return state["loaded"]
        try:
            path = build_fn()
            lib = _dlopen_bytes(read_verified(path), path)
            state["lib"] = lib
            for target, symbol in targets.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            state["loaded"] = True
        except (BuildError, OSError, AttributeError) as e:
            state["loaded"], state["error"] = False, e
        return state["loaded"]


def library_path(cxx: str | None = None) -> Path:
    """Where the library for this source, compiler, flags, JAX and CPU is cached.

    Also creates or checks the cache directory (:func:`secure_cache_dir`).
    """
    return _cached_path((SOURCE,), "condensed_cpu", cxx or _compiler())


def build(force: bool = False) -> Path:
    """Compiles the kernel (if not cached) and returns the shared library's path.

    The library's SHA-256 is recorded beside it (:func:`checksum_path`); loading verifies it.
    """
    cxx = _compiler()
    return _build_library(SOURCE, library_path(cxx), cxx, "the condensed CPU kernel", force)


def load() -> bool:
    """Builds and registers the FFI target once per process; ``False`` if unavailable."""
    return _load_library(_state, _lock, build, {TARGET_NAME: SYMBOL})


def available() -> bool:
    """Whether the fused C++ kernel can be used in this process."""
    return load()


def _reset_for_tests() -> None:
    with _lock:
        _state.update(loaded=None, error=None, warned=False)


def condensed_matmul_xla(x, values, indices, bias, *, group_size: int = 1):
    """Pure-XLA fallback (the reference formulation; materialises the gather)."""
    return condensed_matmul_reference(x, values, indices, bias, group_size=group_size)


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
    g = values.shape[-2] // max(indices.shape[-2], 1)
    f = functools.partial(condensed_matmul_xla, group_size=g)
    return jax.vmap(f, in_axes=axes)(x, values, indices, bias), True


def condensed_matmul_cpu(x, values, indices, bias=None, *, group_size: int = 1,
                         fallback: bool = True):
    """``y[..., i] = sum_j values[i, j] * x[..., indices[i // G, j]] + bias[i]`` on CPU.

    Uses the fused C++ kernel (float32 / bfloat16). Concrete indices are range-checked on
    the host before the call; traced ones are checked by the kernel before it reads through
    them (an out-of-range index fails the call with an error naming it). When the kernel is
    unavailable, warns once and uses :func:`condensed_matmul_xla` (``fallback=False`` raises
    instead). ``group_size`` > 1 is the group-shared layout (``indices [n_active // G, k]``).
    """
    check_operands(x, values, indices, bias, group_size=group_size,
                   name="condensed_matmul_cpu")
    check_index_range(indices, x.shape[-1], name="condensed_matmul_cpu")
    if bias is None:
        bias = jnp.zeros((values.shape[0],), values.dtype)
    if x.dtype in (jnp.float32, jnp.bfloat16) and load():
        return _ffi_call(x, values, indices, bias)  # G = n_active / len(indices)
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
    return condensed_matmul_xla(x, values, indices, bias, group_size=group_size)
