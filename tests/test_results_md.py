"""RESULTS.md is generated from the records: regenerating it must reproduce the committed
file exactly, and the statistics it quotes are the textbook ones."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from experiments import results_report
from experiments.results_stats import (
    compare,
    fmt_cell,
    fmt_compare,
    fmt_published,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def test_results_md_is_generated_from_the_records():
    text = results_report.render(ROOT)
    assert (ROOT / "RESULTS.md").read_text() == text, (
        "RESULTS.md differs from the records: run python -m experiments.results_report")


def test_check_flag_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "RESULTS.md"
    stale.write_text("# Results\n\nedited by hand\n")
    assert results_report.main(["--check", "--out", str(stale)]) == 1
    assert f"{stale} differs from the records" in capsys.readouterr().err
    assert stale.read_text() == "# Results\n\nedited by hand\n"  # --check writes nothing


def test_summary_uses_the_sample_std_and_a_t_interval():
    s = summarize([0.97, 0.98, 0.96])
    assert s.std == pytest.approx(np.std([0.97, 0.98, 0.96], ddof=1))
    half = stats.t.ppf(0.975, 2) * s.std / math.sqrt(3)
    assert (s.lo, s.hi) == pytest.approx((0.97 - half, 0.97 + half))
    one = summarize([0.5])
    assert one.n == 1 and math.isnan(one.std)
    with pytest.raises(ValueError, match="at least one value"):
        summarize([])


def test_welch_comparison_matches_scipy():
    a, b = [0.91, 0.92, 0.90, 0.93], [0.88, 0.90, 0.87]
    c = compare(a, b)
    assert c.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert c.diff == pytest.approx(np.mean(a) - np.mean(b)) and c.lo < c.diff < c.hi
    text = fmt_compare(a, b)
    assert text.startswith(f"+{100 * c.diff:.2f} points (95% CI +")
    assert "n = 4 vs 3" in text
    assert "no test" in fmt_compare([0.9], [0.8, 0.85])


def test_cells_and_published_comparisons():
    assert fmt_cell([0.9, 0.92, 0.94], n_expected=3) == "92.00 ± 2.00"
    assert fmt_cell([0.9, 0.92], n_expected=3) == "91.00 ± 1.41 (n=2)"
    assert fmt_cell([0.9]) == "90.00 (n=1)"
    assert "inside" in fmt_published([0.975, 0.976, 0.974], 97.5)
    assert "above" in fmt_published([0.95, 0.951, 0.949], 97.5)
    assert "below" in fmt_published([0.99, 0.991, 0.989], 97.5)


def test_a_bad_record_line_names_the_file_and_line(tmp_path):
    folder = tmp_path / "results" / "x"
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text(json.dumps({"event": "final"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"results/x/results.jsonl:2: not a JSON record"):
        results_report.load(tmp_path, "x")


def test_duplicate_cells_count_once():
    recs = [{"method": "vd", "seed": 0, "v": 1}, {"method": "vd", "seed": 0, "v": 2},
            {"method": "vd", "seed": 1, "v": 3}]
    assert [r["v"] for r in results_report.dedupe(recs, ("method", "seed"))] == [2, 3]
