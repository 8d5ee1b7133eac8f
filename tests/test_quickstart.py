"""The quickstart trains RigL 90% and dense on digits, prints both, plots, and exports."""

import re
from pathlib import Path

import pytest

import jaxsparse
from experiments import quickstart
from experiments.data import DataError

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT.parent / "shared" / "data" / "fashion_mnist"


@pytest.mark.slow
def test_quickstart_on_digits(tmp_path, capsys):
    out = quickstart.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert out["dense"] > 0.95 and out["rigl"] > 0.9
    assert out["mask_sparsity"] > 0.5 and 0.85 < out["sparsity"] < 0.9
    assert "dense      test accuracy" in printed and "rigl 90%   test accuracy" in printed
    assert "Dense_1/kernel" in printed and "total" in printed
    png = Path(out["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The condensed export always runs (jaxsparse.condense exists): every layer is exact
    # and the file is written where the quickstart says.
    assert printed.count("max |dense - condensed| = 0\n") == 3, printed
    written = re.search(r"condensed model .*written to (\S+?)(?::| \()", printed)
    assert written is not None, printed
    assert Path(written.group(1)).parent == tmp_path
    assert Path(written.group(1)).stat().st_size > 0


def test_condensed_export_is_skipped_with_a_note_when_absent(tmp_path, monkeypatch):
    monkeypatch.delattr(jaxsparse, "condense", raising=False)
    note = quickstart.export_condensed({}, {}, tmp_path)
    assert note == ("jaxsparse.condense is not available in this version: condensed export "
                    "skipped")


@pytest.mark.skipif(not FASHION.is_dir(), reason="../shared/data/fashion_mnist absent")
@pytest.mark.slow
def test_quickstart_on_fashion_mnist(tmp_path):
    out = quickstart.main(["--dataset", "fashion_mnist", "--data_dir", str(FASHION),
                           "--epochs", "1", "--out", str(tmp_path)])
    assert out["dense"] > 0.75 and out["rigl"] > 0.7


def test_quickstart_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="lacks train-images-idx3-ubyte.gz"):
        quickstart.main(["--dataset", "fashion_mnist", "--data_dir", str(tmp_path),
                         "--out", str(tmp_path / "o")])


def test_condensed_export_failure_is_reported(tmp_path, monkeypatch):
    def broken(params, masks, pad=False):
        raise ValueError("conv kernels cannot be condensed")

    monkeypatch.setattr(jaxsparse, "condense", broken, raising=False)
    note = quickstart.export_condensed({}, {}, tmp_path)
    assert note == ("condensed export failed (ValueError: conv kernels cannot be condensed); "
                    "skipped")
