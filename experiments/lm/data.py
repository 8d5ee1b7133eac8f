"""Byte-level text corpora for the LM: a plain-text directory loader and a default corpus
that exists wherever Python does (the standard library's own source files).

Tokens are raw bytes (vocabulary 256, no tokenizer to install). A corpus is three ``uint8``
arrays, train, validation and test, split *by file* (no file contributes to two of them);
files are joined in a fixed order with a newline between them. Choose settings on the
validation split; evaluate the test split once, for the setting chosen.

Default corpus (``name="stdlib"``): the modules in :data:`STDLIB_TRAIN`,
:data:`STDLIB_VALID` and :data:`STDLIB_TEST`, read from ``sysconfig.get_paths()["stdlib"]``.
The lists are fixed; the bytes are those of the running Python's version (~2.2 MB train,
~0.15 MB validation, ~0.13 MB test on CPython 3.11), so record the Python version with
results.

Batches are drawn on the device: step ``t`` takes ``batch`` windows of ``seq_len + 1`` bytes
at offsets from ``fold_in(key, t)``, so a run's data depends only on ``(corpus, key, t)``:
identical on any mesh, process count or restart.

Example:
  >>> corpus = load_corpus("stdlib")
  >>> tokens = get_batch(jnp.asarray(corpus.train), key, step, batch=16, seq_len=128)
  >>> inputs, targets = tokens[:, :-1], tokens[:, 1:]
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

STDLIB_TRAIN = (
    "argparse", "ast", "base64", "bisect", "calendar", "codecs", "configparser", "contextlib",
    "csv", "dataclasses", "doctest", "enum", "fractions", "ftplib", "functools", "gettext",
    "gzip", "imaplib", "inspect", "ipaddress", "locale", "mailbox", "operator", "optparse",
    "os", "pdb", "pickle", "pprint", "random", "shutil", "smtplib", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "threading", "tokenize", "traceback", "typing",
    "uuid", "weakref",
)
STDLIB_VALID = ("difflib", "heapq", "textwrap", "shlex", "queue")
# Single-file modules in every CPython from 3.9 to 3.13 (none became a package or left).
STDLIB_TEST = ("bdb", "cmd", "dis", "glob", "pstats", "sched", "timeit")


class Corpus(NamedTuple):
    """A byte corpus. ``train``/``valid``/``test``: ``uint8[n]`` (``test`` may be empty: a
    folder loaded without a test split); ``*_files``: the files, in order."""

    train: np.ndarray
    valid: np.ndarray
    train_files: tuple[str, ...]
    valid_files: tuple[str, ...]
    test: np.ndarray = np.zeros(0, np.uint8)
    test_files: tuple[str, ...] = ()


class CorpusError(ValueError):
    """A corpus folder or file that cannot be used."""


def _read(files: list) -> np.ndarray:
    parts = []
    for f in files:
        try:
            parts.append(f.read_bytes())
        except OSError as e:
            raise CorpusError(f"cannot read corpus file {str(f)!r}: {e}") from e
    return np.frombuffer(b"\n".join(parts), dtype=np.uint8).copy()


def stdlib_files() -> tuple[list[Path], list[Path], list[Path]]:
    """Paths of the default corpus's train, validation and test files.

    Raises:
      CorpusError: naming the first module missing from this Python's standard library.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for names in (STDLIB_TRAIN, STDLIB_VALID, STDLIB_TEST):
        files = [root / f"{n}.py" for n in names]
        for f in files:
            if not f.is_file():
                raise CorpusError(f"standard-library corpus file {str(f)!r} not found; pass "
                                  f"a plain-text folder with data_dir instead")
        out.append(files)
    return out[0], out[1], out[2]


def load_text_dir(folder: str | os.PathLike, valid_fraction: float = 0.1,
                  suffixes: tuple[str, ...] = (".txt", ".md", ".py", ".rst"),
                  test_fraction: float = 0.0) -> Corpus:
    """Every file under ``folder`` (recursively; a ``gs://`` bucket folder: its top level)
    whose name ends in one of ``suffixes``, sorted by relative path. The last
    ``ceil(test_fraction * n)`` files are the test set (none when ``test_fraction`` is 0),
    the ``ceil(valid_fraction * n)`` files before them (at least one) the validation set.

    Raises:
      CorpusError: naming ``folder`` when it is missing or holds too few such files (one per
        split), or naming the fraction outside its range (valid (0, 1), test [0, 1)).
    """
    # Local folders recursively; cloud buckets (gs://..., through epath) one level deep.
    remote = "://" in os.fspath(folder)
    folder = epath.Path(folder) if remote else Path(folder)
    if not 0.0 < valid_fraction < 1.0:
        raise CorpusError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise CorpusError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if not folder.is_dir():
        raise CorpusError(f"corpus folder {str(folder)!r} does not exist")
    found = folder.glob("*") if remote else folder.rglob("*")
    files = sorted((f for f in found if f.is_file() and f.name.endswith(suffixes)),
                   key=lambda f: f.relative_to(folder).as_posix())
    n_test = int(np.ceil(test_fraction * len(files)))
    n_valid = max(1, int(np.ceil(valid_fraction * len(files))))
    if len(files) <= n_valid + n_test:  # at least one training file
        splits = "train, validation and test" if n_test else "train and validation"
        raise CorpusError(f"corpus folder {str(folder)!r} holds {len(files)} file(s) ending in "
                          f"{suffixes}; need at least {n_valid + n_test + 1} "
                          f"({splits} split by file)")
    train = files[:len(files) - n_valid - n_test]
    valid = files[len(train):len(train) + n_valid]
    test = files[len(train) + n_valid:]
    return Corpus(_read(train), _read(valid), tuple(map(str, train)), tuple(map(str, valid)),
                  _read(test), tuple(map(str, test)))


def load_corpus(name: str = "stdlib", data_dir: str | os.PathLike | None = None,
                valid_fraction: float = 0.1, test_fraction: float = 0.0) -> Corpus:
    """``"stdlib"`` (the default corpus, with its fixed test split) or ``"text_dir"``
    (:func:`load_text_dir` of ``data_dir``; the fractions apply to it only)."""
    if name == "stdlib":
        train, valid, test = stdlib_files()
        return Corpus(_read(train), _read(valid), tuple(map(str, train)),
                      tuple(map(str, valid)), _read(test), tuple(map(str, test)))
    if name == "text_dir":
        if not data_dir:
            raise CorpusError("corpus 'text_dir' needs data_dir (a folder of text files)")
        return load_text_dir(data_dir, valid_fraction, test_fraction=test_fraction)
    raise CorpusError(f"unknown corpus {name!r}; choose 'stdlib' or 'text_dir'")


def get_batch(data: jax.Array, key: jax.Array, step, batch: int, seq_len: int) -> jax.Array:
    """``int32[batch, seq_len + 1]`` windows of ``data`` at random offsets for ``step``.

    Pure and jittable: the offsets come from ``fold_in(key, step)``.
    """
    n = data.shape[0]
    if n < seq_len + 2:
        raise CorpusError(f"corpus of {n} bytes is shorter than seq_len + 2 = {seq_len + 2}")
    offsets = jax.random.randint(jax.random.fold_in(key, step), (batch,), 0, n - seq_len - 1)
    window = jax.vmap(lambda o: jax.lax.dynamic_slice(data, (o,), (seq_len + 1,)))(offsets)
    return window.astype(jnp.int32)


def eval_windows(data: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping ``int32[n, seq_len + 1]`` windows from the start of ``data`` (each
    window's last byte is the next window's first input), at most ``max_windows``."""
    n = (data.shape[0] - 1) // seq_len
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n < 1:
        raise CorpusError(f"evaluation text of {data.shape[0]} bytes is shorter than "
                          f"seq_len + 1 = {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return data[idx].astype(np.int32)
