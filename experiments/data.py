"""Datasets and a resumable batch iterator for the experiments.

Every loader returns a :class:`Dataset` of numpy arrays: images ``uint8[N, H, W, C]`` (scale
to [0, 1] in the model's input step) and labels ``int32[N]``. Loaders check what they read
(shapes, dtype, label range, split sizes) and raise a clear error when the data is missing.

Sources, tried in order for ``mnist`` / ``fashion_mnist``:

1. a local folder of the standard gzip'd IDX files (``data_dir=...`` or the environment variable
   ``JAXSPARSE_DATA_DIR``, which may point at the folder itself or at a parent holding
   ``mnist/`` and ``fashion_mnist/``);
2. tensorflow-datasets, when installed (``pip install tensorflow-datasets``).

``digits`` is scikit-learn's embedded 8x8 digits set (1797 images, no download): the default,
so everything runs on a fresh machine. ``cifar10`` reads the standard CIFAR-10 *binary*
batches (``data_batch_1.bin`` ... ``test_batch.bin``, each record 1 label byte + 3072 pixel
bytes), or uses tfds. The python-pickle batches are refused: unpickling a received file can
run arbitrary code.

Every loader can hold out a validation split from its training set
(:func:`with_validation`, ``validation_size`` in the configs): hyperparameters are chosen on
it, and the test split is evaluated once, for the chosen setting.

This module does not import jaxsparse (or jax at import time): it is plain data handling.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
DATA_DIR_ENV = "JAXSPARSE_DATA_DIR"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# (train size, test size, image shape)
_EXPECTED = {
    "mnist": (60000, 10000, (28, 28, 1)),
    "fashion_mnist": (60000, 10000, (28, 28, 1)),
    "cifar10": (50000, 10000, (32, 32, 3)),
}
CIFAR10_BINARY_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_BINARY_TEST = ("test_batch.bin",)
CIFAR10_PICKLE_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


class Dataset(NamedTuple):
    """A labelled image dataset held in host memory.

    Attributes:
      x_train: ``uint8[N, H, W, C]`` training images.
      y_train: ``int32[N]`` training labels in ``[0, num_classes)``.
      x_test: ``uint8[M, H, W, C]`` test images.
      y_test: ``int32[M]`` test labels.
      name: dataset name.
      num_classes: number of classes.
      x_val: ``uint8[V, H, W, C]`` validation images held out of the training set, or
        ``None`` (see :func:`with_validation`).
      y_val: ``int32[V]`` validation labels, or ``None``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    num_classes: int = 10
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


class DataError(RuntimeError):
    """The requested data is missing or malformed."""


# --------------------------------------------------------------------------------- readers


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (gzip'd or plain): magic 0x0801 labels, 0x0803 images (uint8)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); the file is "
                        "truncated, corrupted or not gzip'd: download it again") from e
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(
            f"{path}: not a uint8 IDX file (magic bytes {data[:4].hex()}, expected 0000080N)"
        )
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header truncated ({len(data)} bytes for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes), "
                        f"file holds {body.size}")
    return body.reshape(dims)


def _check(ds: Dataset, expected_sizes=None) -> Dataset:
    """Validates shapes, dtypes and label range; raises DataError naming what is wrong."""
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{ds.name} {split} images: expected uint8[N, H, W, C], "
                            f"got {x.dtype}{list(x.shape)}")
        if y.shape != (x.shape[0],):
            raise DataError(f"{ds.name} {split}: {x.shape[0]} images but labels of shape "
                            f"{y.shape}")
        if y.size and (y.min() < 0 or y.max() >= ds.num_classes):
            raise DataError(f"{ds.name} {split} labels outside [0, {ds.num_classes}): "
                            f"min {y.min()}, max {y.max()}")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"{ds.name}: train images {ds.x_train.shape[1:]} vs test "
                        f"{ds.x_test.shape[1:]}")
    if expected_sizes is not None:
        n_train, n_test, shape = expected_sizes
        got = (ds.x_train.shape[0], ds.x_test.shape[0], ds.image_shape)
        if got != (n_train, n_test, shape):
            raise DataError(f"{ds.name}: expected {n_train}/{n_test} images of {shape}, "
                            f"got {got[0]}/{got[1]} of {got[2]}")
    return ds


# --------------------------------------------------------------------------------- digits


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's embedded 8x8 handwritten digits (1797 images, no download).

    Pixels (0..16) are rescaled to uint8 0..255; a fixed shuffled split (``seed``) keeps
    ``test_fraction`` of the images for testing.
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    raw = sk_digits()
    x = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = raw.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return _check(Dataset(x[train], y[train], x[test], y[test], "digits"))


# --------------------------------------------------------------------------------- IDX / tfds


def resolve_data_dir(name: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The folder holding ``name``'s files: ``data_dir``, else ``$JAXSPARSE_DATA_DIR``; a
    parent folder with a ``name`` subfolder is accepted too. ``None`` when neither is set."""
    base = data_dir if data_dir else os.environ.get(DATA_DIR_ENV)
    if not base:
        return None
    base = Path(base).expanduser()
    if (base / name).is_dir():
        return base / name
    return base


def load_idx_dir(name: str, folder: str | os.PathLike) -> Dataset:
    """MNIST-format dataset from a folder of the four standard IDX ``.gz`` files."""
    folder = Path(folder)
    missing = [f for f in IDX_FILES.values() if not (folder / f).exists()]
    if missing:
        raise DataError(
            f"{name}: {folder} lacks {', '.join(missing)}. Put the four standard IDX files "
            f"({', '.join(IDX_FILES.values())}) in that folder, or install "
            "tensorflow-datasets (pip install tensorflow-datasets) and pass no data_dir."
        )
    arr = {k: read_idx(folder / f) for k, f in IDX_FILES.items()}
    ds = Dataset(
        arr["train_images"][..., None],
        arr["train_labels"].astype(np.int32),
        arr["test_images"][..., None],
        arr["test_labels"].astype(np.int32),
        name,
    )
    return _check(ds, _EXPECTED.get(name))


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    return tfds


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """``name`` through tensorflow-datasets (downloads on first use when online)."""
    tfds = _import_tfds()
    if tfds is None:
        raise DataError(
            f"{name}: no local data and tensorflow-datasets is not installed. Either pass "
            f"data_dir= (or set ${DATA_DIR_ENV}) to a folder of the dataset's files, or "
            "pip install tensorflow-datasets to download it."
        )
    splits = {}
    for split in ("train", "test"):
        x, y = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, as_supervised=True,
                                       data_dir=data_dir))
        splits[split] = (np.asarray(x, np.uint8), np.asarray(y, np.int32))
    ds = Dataset(*splits["train"], *splits["test"], name)
    return _check(ds, _EXPECTED.get(name))


# --------------------------------------------------------------------------------- CIFAR-10


def _read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, np.uint8)
    record = 1 + 32 * 32 * 3
    if raw.size % record:
        raise DataError(f"{path}: size {raw.size} is not a multiple of the CIFAR-10 record "
                        f"size {record}")
    raw = raw.reshape(-1, record)
    # Stored channel-major (3 planes of 32x32); we use NHWC.
    x = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), raw[:, 0].astype(np.int32)


def load_cifar10_dir(folder: str | os.PathLike, check_sizes: bool = True) -> Dataset:
    """CIFAR-10 from its standard binary batch files (``*.bin``).

    The python-version batches are pickles (a crafted one runs code when loaded), so they
    are refused with a :class:`DataError` naming the file; use the binary version.

    The real files cannot be fetched on our CI machines, so the tests exercise this reader on
    tiny fabricated batches in the same format; results on real CIFAR-10 are unverified here.
    ``check_sizes=False`` skips the 50000/10000 size check (for such test files).
    """
    folder = Path(folder)
    for sub in ("cifar-10-batches-bin", "cifar-10-batches-py"):
        if (folder / sub).is_dir():
            folder = folder / sub
    if not all((folder / f).exists() for f in CIFAR10_BINARY_TRAIN + CIFAR10_BINARY_TEST):
        pickles = [f for f in CIFAR10_PICKLE_FILES if (folder / f).exists()]
        if pickles:
            raise DataError(
                f"cifar10: {folder / pickles[0]} is a python-pickle batch; pickles are not "
                "loaded (unpickling a received file can run code). Extract the binary "
                "version (cifar-10-binary.tar.gz, data_batch_1.bin ...) there instead."
            )
        raise DataError(
            f"cifar10: {folder} lacks the binary batches ({', '.join(CIFAR10_BINARY_TRAIN)}"
            ", test_batch.bin). Extract cifar-10-binary.tar.gz there, or pip install "
            "tensorflow-datasets."
        )
    reader, train, test = _read_cifar_binary, CIFAR10_BINARY_TRAIN, CIFAR10_BINARY_TEST
    tr = [reader(folder / f) for f in train]
    te = [reader(folder / f) for f in test]
    ds = Dataset(
        np.concatenate([x for x, _ in tr]), np.concatenate([y for _, y in tr]),
        np.concatenate([x for x, _ in te]), np.concatenate([y for _, y in te]),
        "cifar10",
    )
    return _check(ds, _EXPECTED["cifar10"] if check_sizes else None)


# --------------------------------------------------------------------------------- validation


def with_validation(ds: Dataset, size: int | float, seed: int = 0) -> Dataset:
    """``ds`` with ``size`` training examples held out as its validation split.

    The held-out examples are a fixed random subset (a pure function of ``seed`` and the
    training-set size); the rest stay, in their original order, as the training split.
    ``size`` is a count (``6000``: sparse_learning's 54k/6k MNIST split) or, below 1, a
    fraction of the training set; 0 returns ``ds`` unchanged (no validation split).

    Raises:
      ValueError: ``size`` is negative or leaves no training example (names ``size``).
    """
    n = len(ds.x_train)
    count = int(round(size * n)) if 0 < size < 1 else int(size)
    if size < 0 or count != size and size >= 1 or count >= n:
        raise ValueError(f"validation_size={size!r} must be 0, a fraction in (0, 1) or an "
                         f"integer count below the {n} training examples of {ds.name}")
    if count == 0:
        return ds
    held = np.zeros(n, bool)
    held[np.random.default_rng([seed, n]).permutation(n)[:count]] = True
    return ds._replace(x_train=ds.x_train[~held], y_train=ds.y_train[~held],
                       x_val=ds.x_train[held], y_val=ds.y_train[held])


# --------------------------------------------------------------------------------- entry


def load_dataset(name: str = "digits", data_dir: str | os.PathLike | None = None,
                 validation_size: int | float = 0, validation_seed: int = 0) -> Dataset:
    """Loads ``name`` (one of :data:`DATASETS`).

    Args:
      name: ``digits`` (default, embedded), ``mnist``, ``fashion_mnist`` or ``cifar10``.
      data_dir: folder with the dataset files; defaults to ``$JAXSPARSE_DATA_DIR``. Without
        either, tensorflow-datasets is used if installed.
      validation_size: training examples held out as the validation split (a count, or a
        fraction below 1; see :func:`with_validation`). 0: none.
      validation_seed: which examples are held out.

    Example:
      >>> ds = load_dataset("mnist", data_dir="../shared/data/mnist")
      >>> ds.x_train.shape, ds.y_train[:3]
      ((60000, 28, 28, 1), array([5, 0, 4], dtype=int32))
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return with_validation(_load_full(name, data_dir), validation_size, validation_seed)


def _load_full(name: str, data_dir) -> Dataset:
    if name == "digits":
        return load_digits()
    folder = resolve_data_dir(name, data_dir)
    if folder is not None:
        if not folder.is_dir():
            raise DataError(f"{name}: data folder {folder} does not exist")
        if name == "cifar10":
            return load_cifar10_dir(folder)
        return load_idx_dir(name, folder)
    return load_tfds(name)


# --------------------------------------------------------------------------------- batching


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of ``epoch``: a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


class Position(NamedTuple):
    """Where a :class:`BatchIterator` is: ``index`` batches of ``epoch`` already served."""

    epoch: int
    index: int


class BatchIterator:
    """Deterministic, seedable, resumable shuffled minibatches; data kept on the device.

    The whole split is put on the device once; each epoch's permutation is a pure function of
    ``(seed, epoch)``, so the stream from any :class:`Position` is reproducible, which is what
    checkpoint/resume needs. Incomplete final batches are dropped (static shapes, one trace).

    Example:
      >>> it = BatchIterator(ds.x_train, ds.y_train, batch_size=128, seed=0)
      >>> x, y = next(it)           # uint8[128, H, W, C], int32[128] on the device
      >>> pos = it.position         # Position(epoch=0, index=1): save it with the checkpoint
      >>> it2 = BatchIterator(ds.x_train, ds.y_train, 128, seed=0, position=pos)
    """

    def __init__(self, x, y, batch_size: int, seed: int = 0, position: Position | None = None,
                 device=None):
        import jax

        n = len(x)
        if len(y) != n:
            raise ValueError(f"x has {n} examples but y has {len(y)}")
        if not 0 < batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}] (the number of examples), "
                             f"got {batch_size}")
        self.n = n
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.steps_per_epoch = n // self.batch_size
        self.x = jax.device_put(np.asarray(x), device)
        self.y = jax.device_put(np.asarray(y), device)
        position = Position(0, 0) if position is None else Position(*position)
        if not 0 <= position.index < self.steps_per_epoch or position.epoch < 0:
            raise ValueError(f"position {tuple(position)} out of range: index must be in "
                             f"[0, {self.steps_per_epoch})")
        self._epoch, self._index = position
        self._perm = None
        self._gather = jax.jit(_gather, static_argnums=3)

    @property
    def position(self) -> Position:
        return Position(self._epoch, self._index)

    @property
    def epoch(self) -> int:
        return self._epoch

    def permutation(self):
        """This epoch's order as a device array ``int32[n]`` (cached per epoch)."""
        import jax

        if self._perm is None or self._perm[0] != self._epoch:
            perm = epoch_permutation(self.n, self.seed, self._epoch)
            self._perm = (self._epoch, jax.device_put(perm, self.x.sharding))
        return self._perm[1]

    def next_indices(self):
        """Advances one batch and returns ``(perm, start)``: the batch is
        ``perm[start:start + batch_size]``. Lets a train step gather inside its own jit."""
        perm, start = self.permutation(), self._index * self.batch_size
        self._index += 1
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return perm, start

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        perm, start = self.next_indices()
        return self._gather(self.x, self.y, perm, self.batch_size, start)


def _gather(x, y, perm, batch_size, start):
    import jax

    idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
    return x[idx], y[idx]


def take_batch(x, y, perm, start, batch_size: int):
    """Traceable gather of one batch (use inside a jitted train step)."""
    return _gather(x, y, perm, batch_size, start)
