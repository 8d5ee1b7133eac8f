"""Tests for experiments/data.py: real MNIST / Fashion-MNIST (skipped without the shared
folder), digits, fabricated CIFAR-10 batches, and the resumable batch iterator."""

import gzip
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import data

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
FASHION_DIR = SHARED / "fashion_mnist"
needs_mnist = pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="../shared/data/mnist absent")
needs_fashion = pytest.mark.skipif(not FASHION_DIR.is_dir(),
                                   reason="../shared/data/fashion_mnist absent")


@pytest.fixture(scope="module")
def mnist():
    return data.load_dataset("mnist", MNIST_DIR)


def test_data_module_does_not_import_jaxsparse_or_jax():
    code = "import sys, experiments.data; print('jaxsparse' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_digits_default_is_embedded_and_valid():
    ds = data.load_dataset()
    assert ds.name == "digits"
    assert ds.x_train.shape == (1438, 8, 8, 1) and ds.x_test.shape == (359, 8, 8, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert set(np.unique(ds.y_test)) == set(range(10))
    again = data.load_digits()
    np.testing.assert_array_equal(ds.y_test, again.y_test)  # fixed split


@needs_mnist
def test_mnist_facts(mnist):
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.x_train.dtype == np.uint8
    np.testing.assert_array_equal(mnist.y_train[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(
        np.bincount(mnist.y_train),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    assert np.bincount(mnist.y_test).sum() == 10000
    assert mnist.x_train.max() == 255


@needs_fashion
def test_fashion_mnist_facts():
    ds = data.load_dataset("fashion_mnist", FASHION_DIR)
    assert ds.x_train.shape == (60000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)


@needs_mnist
def test_env_var_may_point_at_parent_folder(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(SHARED))
    assert data.resolve_data_dir("mnist", None) == SHARED / "mnist"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(MNIST_DIR))
    assert data.resolve_data_dir("mnist", None) == MNIST_DIR
    assert data.resolve_data_dir("mnist", "/elsewhere") == Path("/elsewhere")


def test_missing_files_error_says_where_to_put_them(tmp_path):
    with pytest.raises(data.DataError, match="lacks train-images-idx3-ubyte.gz") as e:
        data.load_dataset("mnist", tmp_path)
    assert "pip install tensorflow-datasets" in str(e.value)


def test_missing_folder_error(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_dataset("fashion_mnist", tmp_path / "nope")


def test_no_data_and_no_tfds_error(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "_import_tfds", lambda: None)
    with pytest.raises(data.DataError, match="pip install tensorflow-datasets"):
        data.load_dataset("mnist")


def test_tfds_branch_is_used_when_available(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    rng = np.random.default_rng(0)

    class FakeTfds:
        @staticmethod
        def load(name, split, batch_size, as_supervised, data_dir):
            n = 60000 if split == "train" else 10000
            assert name == "mnist" and batch_size == -1 and as_supervised
            return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                    rng.integers(0, 10, n))

        @staticmethod
        def as_numpy(x):
            return x

    monkeypatch.setattr(data, "_import_tfds", lambda: FakeTfds)
    ds = data.load_dataset("mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.y_test.dtype == np.int32


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        data.load_dataset("svhn")


def _write_idx(path, arr, magic_dtype=0x08):
    header = struct.pack(">HBB", 0, magic_dtype, arr.ndim) + struct.pack(f">{arr.ndim}I",
                                                                         *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), arr)
    _write_idx(tmp_path / "b.gz", arr, magic_dtype=0x0D)
    with pytest.raises(data.DataError, match="not a uint8 IDX file"):
        data.read_idx(tmp_path / "b.gz")
    with gzip.open(tmp_path / "c.gz", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 10) + b"\x01\x02")
    with pytest.raises(data.DataError, match="header says"):
        data.read_idx(tmp_path / "c.gz")


def test_wrong_sizes_are_reported(tmp_path):
    for key, fname in data.IDX_FILES.items():
        n = 5
        arr = np.zeros((n, 28, 28), np.uint8) if "images" in key else np.arange(n) % 10
        _write_idx(tmp_path / fname, np.asarray(arr))
    with pytest.raises(data.DataError, match="expected 60000/10000 images"):
        data.load_dataset("mnist", tmp_path)


def test_label_range_is_checked(tmp_path):
    for key, fname in data.IDX_FILES.items():
        arr = np.zeros((3, 28, 28), np.uint8) if "images" in key else np.array([0, 1, 12])
        _write_idx(tmp_path / fname, np.asarray(arr))
    with pytest.raises(data.DataError, match=r"labels outside \[0, 10\)"):
        data.load_dataset("mnist", tmp_path)


def _fake_cifar(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return x, rng.integers(0, 10, n).astype(np.uint8)


def test_cifar10_binary_format(tmp_path):
    """A tiny fabricated dataset in the CIFAR-10 binary layout: label byte, then the red,
    green and blue 32x32 planes (the real files are not obtainable on CI machines)."""
    written = []
    for fname in data.CIFAR10_BINARY_TRAIN + data.CIFAR10_BINARY_TEST:
        x, y = _fake_cifar(3)
        planes = x.transpose(0, 3, 1, 2).reshape(3, -1)
        np.concatenate([y[:, None], planes], axis=1).tofile(tmp_path / fname)
        written.append((x, y))
    ds = data.load_cifar10_dir(tmp_path, check_sizes=False)
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.x_train[:3], written[0][0])
    np.testing.assert_array_equal(ds.y_train[3:6], written[1][1])
    np.testing.assert_array_equal(ds.x_test, written[-1][0])
    with pytest.raises(data.DataError, match="expected 50000/10000 images"):
        data.load_dataset("cifar10", tmp_path)


class _Planted:
    """Unpickling this creates a marker file: what a crafted CIFAR batch could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_cifar10_pickle_batches_are_refused_without_unpickling(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    marker = tmp_path / "code_ran"
    for fname in data.CIFAR10_PICKLE_FILES:
        with open(sub / fname, "wb") as f:
            pickle.dump({b"data": _Planted(marker), b"labels": [0]}, f)
    before = {p.name: p.read_bytes() for p in sub.iterdir()}
    with pytest.raises(data.DataError, match=r"cifar-10-batches-py/data_batch_1 is a "
                                             r"python-pickle batch; pickles are not loaded"):
        data.load_cifar10_dir(tmp_path, check_sizes=False)
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in sub.iterdir()} == before


def test_cifar10_bad_record_size_and_missing(tmp_path):
    with pytest.raises(data.DataError, match="lacks the binary batches"):
        data.load_cifar10_dir(tmp_path)
    for fname in data.CIFAR10_BINARY_TRAIN + data.CIFAR10_BINARY_TEST:
        np.zeros(100, np.uint8).tofile(tmp_path / fname)
    with pytest.raises(data.DataError, match="not a multiple of the CIFAR-10 record size"):
        data.load_cifar10_dir(tmp_path)


# ------------------------------------------------------------------------- batch iterator


def _toy(n=50):
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    return x, np.arange(n, dtype=np.int32)


def _take(it, k):
    return [np.asarray(next(it)[1]) for _ in range(k)]


def test_iterator_is_deterministic_and_seeded():
    x, y = _toy()
    a = _take(data.BatchIterator(x, y, 8, seed=1), 12)
    b = _take(data.BatchIterator(x, y, 8, seed=1), 12)
    c = _take(data.BatchIterator(x, y, 8, seed=2), 12)
    assert all((p == q).all() for p, q in zip(a, b, strict=True))
    assert not all((p == q).all() for p, q in zip(a, c, strict=True))


def test_iterator_epochs_cover_examples_without_repeats():
    x, y = _toy(50)
    it = data.BatchIterator(x, y, 8, seed=0)
    assert it.steps_per_epoch == 6
    epoch0 = np.concatenate(_take(it, 6))
    assert len(set(epoch0.tolist())) == 48  # incomplete batch dropped, no repeats
    assert it.position == data.Position(1, 0)
    xb, yb = next(it)
    np.testing.assert_array_equal(np.asarray(xb).reshape(-1), np.asarray(yb))  # x, y aligned
    assert not (np.asarray(yb) == epoch0[:8]).all()  # reshuffled


def test_iterator_resumes_from_position():
    x, y = _toy(50)
    full = data.BatchIterator(x, y, 8, seed=3)
    stream = _take(full, 15)
    it = data.BatchIterator(x, y, 8, seed=3)
    _take(it, 9)
    resumed = data.BatchIterator(x, y, 8, seed=3, position=it.position)
    assert it.position == data.Position(1, 3)
    rest = _take(resumed, 6)
    assert all((p == q).all() for p, q in zip(rest, stream[9:], strict=True))


def test_iterator_errors():
    x, y = _toy(10)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\]"):
        data.BatchIterator(x, y, 11)
    with pytest.raises(ValueError, match="x has 10 examples but y has 9"):
        data.BatchIterator(x, y[:9], 2)
    with pytest.raises(ValueError, match=r"position \(0, 5\) out of range"):
        data.BatchIterator(x, y, 2, position=(0, 5))


def test_short_file_and_bad_arrays_are_reported(tmp_path):
    with gzip.open(tmp_path / "tiny.gz", "wb") as f:
        f.write(b"\x00\x00")
    with pytest.raises(data.DataError, match=r"not an IDX file \(only 2 bytes\)"):
        data.read_idx(tmp_path / "tiny.gz")
    x = np.zeros((4, 8, 8, 1), np.uint8)
    y = np.zeros(4, np.int32)
    with pytest.raises(data.DataError, match=r"expected uint8\[N, H, W, C\], got float32"):
        data._check(data.Dataset(x.astype(np.float32), y, x, y, "toy"))
    with pytest.raises(data.DataError, match=r"4 images but labels of shape \(3,\)"):
        data._check(data.Dataset(x, y[:3], x, y, "toy"))
    with pytest.raises(data.DataError, match=r"train images \(8, 8, 1\) vs test \(8, 4, 1\)"):
        data._check(data.Dataset(x, y, x[:, :, :4], y, "toy"))


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(data.DataError, match="pip install scikit-learn"):
        data.load_digits()


# ------------------------------------------------------------------------- corrupted files


def _good_idx(tmp_path):
    _write_idx(tmp_path / "good.gz", np.arange(600, dtype=np.uint8).reshape(6, 10, 10) % 251)
    return (tmp_path / "good.gz").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "bit_flipped", "not_gzip", "empty"])
def test_damaged_idx_files_name_the_file_and_stay_untouched(tmp_path, damage):
    raw = _good_idx(tmp_path)
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "bit_flipped":
        mid = len(raw) // 2
        raw = raw[:mid] + bytes([raw[mid] ^ 0x10]) + raw[mid + 1:]
    elif damage == "not_gzip":
        raw = b"this is not gzip data at all" * 4
    else:
        raw = b""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(raw)
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz"):
        data.read_idx(path)
    assert path.read_bytes() == raw


def test_truncated_idx_header_names_the_file(tmp_path):
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + b"\x00\x00\x00")
    with pytest.raises(data.DataError, match=r"short\.gz: IDX header truncated"):
        data.read_idx(tmp_path / "short.gz")


# ------------------------------------------------------------------------- validation split


def test_validation_split_is_held_out_of_training_and_fixed():
    full = data.load_dataset("digits")
    ds = data.load_dataset("digits", validation_size=0.1)
    assert full.x_val is None and len(ds.x_val) == 144 and len(ds.x_train) == 1438 - 144
    assert ds.x_val.shape[1:] == ds.x_train.shape[1:] and ds.y_val.dtype == np.int32
    # Together they are exactly the original training set, each example once.
    merged = np.concatenate([ds.x_train, ds.x_val]).reshape(1438, -1)
    np.testing.assert_array_equal(np.sort(merged, axis=0),
                                  np.sort(full.x_train.reshape(1438, -1), axis=0))
    again = data.load_dataset("digits", validation_size=144)
    np.testing.assert_array_equal(again.x_val, ds.x_val)  # a count and a fraction agree
    other = data.load_dataset("digits", validation_size=144, validation_seed=1)
    assert not np.array_equal(other.y_val, ds.y_val)
    np.testing.assert_array_equal(ds.x_test, full.x_test)  # the test split is untouched


@pytest.mark.parametrize("size", [-1, 1438, 5000, 2.5])
def test_validation_size_errors_name_the_argument(size):
    with pytest.raises(ValueError, match=rf"validation_size={size!r} must be"):
        data.load_dataset("digits", validation_size=size)
