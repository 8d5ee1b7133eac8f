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
    position,
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


def test_compare_in_other_units_and_single_runs_against_an_interval():
    text = fmt_compare([11.6, 11.7], [12.0, 12.1], scale=1, unit="perplexity", digits=3)
    assert text.startswith("-0.400 perplexity (95% CI -")
    assert "n = 2 vs 2" in text
    assert position([1.0, 2.0, 3.0], 2.5) == "inside"
    assert position([1.0, 1.1, 0.9], 5.0) == "above"
    assert position([1.0, 1.1, 0.9], -5.0) == "below"
    assert position([1.0], 1.0) is None  # n = 1: no interval
    assert results_report.where_groups([("50%", "below"), ("2:4", "above"), ("60%", "below"),
                                        ("4:8", "")]) == "below at 50%, 60%; above at 2:4"


def test_record_selection_and_orderings():
    recs = [{"algorithm": "wanda", "pattern": "50%", "v": 2.0},
            {"algorithm": "wanda", "pattern": "2:4", "v": 9.0},
            {"algorithm": "sparsegpt", "pattern": "50%", "v": 1.0},
            {"algorithm": "sparsegpt", "pattern": "50%", "v": None}]
    assert results_report.field(recs, "v", algorithm="wanda", pattern="50%") == [2.0]
    assert results_report.field(recs, "v", algorithm="sparsegpt") == [1.0]  # None dropped
    groups = {"a": [1.0, 3.0], "b": [5.0], "c": []}
    assert results_report.mean_order(groups) == "b > a"
    assert results_report.mean_order(groups, lower=True, sep=" < ") == "a < b"
    assert results_report.best_mean(groups, lower=True) == "a"


@pytest.mark.parametrize("section", ["section_erk_uniform", "section_oneshot", "section_lm",
                                     "section_rl", "section_fs", "section_cl"])
def test_newer_sections_say_when_records_are_missing(tmp_path, section):
    text = getattr(results_report, section)(tmp_path)
    assert text.startswith("## ") and "No records yet" in text


def test_erk_uniform_records_have_equal_overall_sparsity():
    """The ERK vs uniform comparison is at equal parameter count: both distributions reach
    the same overall sparsity (within a rounding of one weight per layer) in every record."""
    recs = results_report.load(ROOT, "erk_uniform")
    if not recs:
        pytest.skip("no ERK vs uniform records")
    by_target = {}
    for r in recs:
        by_target.setdefault(results_report.target(r), {}).setdefault(
            r["distribution"], set()).add(round(r["sparsity"], 6))
    for t, per in by_target.items():
        assert set(per) == {"erk", "uniform"}, t
        assert max(abs(a - b) for a in per["erk"] for b in per["uniform"]) < 1e-4, (t, per)
        assert all(abs(x - t) < 5e-3 for v in per.values() for x in v), (t, per)


def test_cl_capacity_section(tmp_path):
    assert "No records yet" in results_report.section_cl_capacity(tmp_path)
    d = tmp_path / "results" / "cl_split_mnist_capacity"
    d.mkdir(parents=True)
    recs = []
    for npt, acc in ((4, 0.3), (2, 0.5)):
        for seed, eps in ((0, 0.0), (1, 0.02)):
            recs.append({"event": "final", "method": "spacenet", "seed": seed,
                         "config": json.dumps({"neurons_per_task": npt, "hidden": [8, 8],
                                               "tasks": [[0, 1], [2, 3]]}),
                         "avg_accuracy": acc + eps, "avg_forgetting": 0.5,
                         "accuracy_matrix": [[1.0, None], [0.4, 0.6 + eps]],
                         "pre_reserve_accuracy": [1.0, 1.0 - eps], "reserved_neurons": [npt * 2] * 2
                         + [4], "frozen_fraction": npt / 4, "wall_time": 1.0})
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = results_report.section_cl_capacity(tmp_path)
    # Rows by neurons per task, largest first; "after" is the mean of R[t, t] (0.8, 0.81).
    assert "| 4 | [8, 8] | 1.000 ± 0.000 (n=2) | 31.00 ± 1.41 (n=2) |" in text
    assert "| 2 | [4, 4] |" in text and "80.50 ± 0.71 (n=2) |" in text
    assert "2 vs 4 reserved per task, accuracy +20.00 points" in text


def test_condensed_large_table_and_not_run_line(tmp_path):
    """Table CT-3000 pairs the masked and condensed record of each seed (n, mean ± sample
    std, the per-seed time ratio) and the "Not run" line lists the cells without 3 seeds."""
    assert "No records yet" in results_report.section_condensed_large(tmp_path)
    d = tmp_path / "results" / results_report.CONDENSED_LARGE
    d.mkdir(parents=True)
    cfg = json.dumps({"epochs": 2, "batch_size": 100, "learning_rate": 0.1,
                      "update_every": 100, "drop_fraction": 0.3, "validation_size": 6000})
    recs = [{"event": "final", "algorithm": f"srigl_no_ablation_{side}",
             "sparsity_target": sp, "dataset": "fashion_mnist",
             "model": "mlp-784-3000-3000-10", "seed": seed, "steps": 1080,
             "test_accuracy": acc + (0.01 if side == "condensed" else 0.0),
             "step_ms": ms, "mask_agreement": agree, "machine": "cpu", "config": cfg}
            for sp, seeds in ((0.9, (0, 1, 2)), (0.95, (0,)))
            for seed, acc, agree in zip(seeds, (0.80, 0.82, 0.84), (1.0, 0.99, 1.0))
            for side, ms in (("masked", 200.0), ("condensed", 50.0 * (seed + 1)))]
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = results_report.section_condensed_large(tmp_path)
    assert ("| Fashion-MNIST | no ablation | 90% | 3 | 82.00 ± 2.00 | 83.00 ± 2.00 | "
            "+1.00 points") in text
    assert "| 0.996667 / 0.990000 | 200.0 | 100.0 | 0.50 |" in text
    assert "| 95% | 1 | 80.00 (n=1) | 81.00 (n=1) |" in text
    assert "identical at the end in 3 of 4 paired runs" in text
    assert "0.25 to 0.75 times the masked loop's" in text
    groups = results_report._condensed_groups(recs)
    missing = results_report._condensed_missing(groups, whole=True)
    assert missing == ["Fashion-MNIST no ablation 95% (only 1 of 3 seeds)",
                       "Fashion-MNIST no ablation 99%", "Fashion-MNIST with ablation",
                       "MNIST no ablation", "MNIST with ablation"]


def test_replica_not_run_list_and_footer_follow_the_records(tmp_path):
    """The replica's "Not run" line and the footer's replica item come from the records:
    a cell with fewer than 3 seeds is listed, and a full grid lists nothing."""
    d = tmp_path / "results" / "sl_replica"
    d.mkdir(parents=True)
    full = [{"algorithm": m, "sparsity_target": s, "seed": seed, "test_accuracy": 0.9}
            for m in ("static", "set", "snfs") for s in results_report.REPLICA_SPARSITIES
            for seed in range(3)] + [{"algorithm": "dense", "sparsity_target": 0.0,
                                      "seed": 0, "test_accuracy": 0.98}]
    assert results_report.replica_missing(full) == []
    short = [r for r in full if not (r["algorithm"] == "set" and r["sparsity_target"] == 0.9
                                     and r["seed"] == 2)]
    short = [r for r in short if r["algorithm"] != "dense"]
    assert results_report.replica_missing(short) == ["dense", "SET 90% (only 2 of 3 seeds)"]
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in full) + "\n")
    assert "replica grid" not in results_report.footer(tmp_path)
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in short) + "\n")
    assert "* The rest of the sparse_learning replica grid" in results_report.footer(tmp_path)
    assert results_report.footer(tmp_path).startswith("## Not measured\n\n* The rest")


def test_srigl_gamma_is_chosen_on_validation_over_the_sweep_seeds_only():
    """The chosen gamma_sal is the best mean *validation* accuracy over the sweep seeds;
    test accuracy and the extra seed run for the chosen gamma play no part."""
    def rec(g, seed, val, test):
        return {"algorithm": "srigl", "sparsity_target": 0.99, "seed": seed,
                "config": json.dumps({"algorithm_kwargs": {"gamma_sal": g}}),
                "val_accuracy": val, "test_accuracy": test}

    recs = [rec(0.3, 0, 0.90, 0.99), rec(0.3, 1, 0.92, 0.99),   # best test, worse val
            rec(0.9, 0, 0.93, 0.80), rec(0.9, 1, 0.93, 0.80),
            rec(0.5, 0, 0.93, 0.80), rec(0.5, 1, 0.93, 0.80),   # tie: smaller gamma kept
            rec(0.3, 2, 0.99, 0.99)]                             # not a sweep seed
    chosen, by_g = results_report.srigl_val_choice(recs)
    assert chosen == 0.5
    assert by_g[0.3] == [0.90, 0.92]
    assert results_report.srigl_val_choice([]) == (None, {})


def test_srigl_val_section_has_a_fashion_mnist_part_chosen_on_its_own_validation(tmp_path):
    """The Fashion-MNIST study gets its own tables (S-val-fmnist, S-val-test-fmnist) and
    its own gamma_sal, chosen on its validation accuracy, not on test or on MNIST."""
    def rec(algorithm, seed, val, test, g=None):
        kw = {} if g is None else {"gamma_sal": g}
        return {"algorithm": algorithm, "sparsity_target": 0.99, "seed": seed,
                "config": json.dumps({"algorithm_kwargs": kw}),
                "val_accuracy": val, "test_accuracy": test}

    recs = [rec("srigl", s, 0.80 + 0.01 * s, 0.90, g=0.3) for s in (0, 1)]      # best test
    recs += [rec("srigl", s, 0.85 + 0.01 * s, 0.70 + 0.01 * s, g=0.7) for s in (0, 1, 2)]
    recs += [rec("srigl", s, 0.84, 0.95, g=0.9) for s in (0, 1)]
    recs += [rec(m, s, 0.8, 0.75 + 0.01 * s) for m in ("rigl", "srigl_no_ablation")
             for s in (0, 1, 2)]
    d = tmp_path / "results" / "fmnist_mlp_srigl_val"
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = results_report.section_srigl_val(tmp_path)
    assert "`results/mnist_mlp_srigl_val/results.jsonl` absent" in text
    assert "(table S-val-fmnist;" in text and "(table S-val-test-fmnist;" in text
    assert "Chosen gamma_sal on Fashion-MNIST: **0.7**" in text
    assert "Not run: gamma_sal 0.5, 0.95 (thresholds 5, 6, the same as 0.9's)." in text
    assert "* Table S-val-test-fmnist: SRigL (gamma_sal 0.7) - RigL" in text
    assert "ViT-tiny" in text.splitlines()[0]
    assert "`results/vit_mnist_srigl/results.jsonl` absent" in text


def test_condensed_lm_table(tmp_path):
    """Table CT-lm pairs the masked and condensed LM record of each seed (perplexity mean ±
    sample std, Welch difference in perplexity) and relates times and MLP state to the dense
    loop of the same seed; dense records never enter the masked/condensed pairs."""
    assert "No records yet" in results_report.section_condensed_lm(tmp_path)
    d = tmp_path / "results" / results_report.CONDENSED_LM
    d.mkdir(parents=True)
    cfg = json.dumps({"preset": "tiny", "seq_len": 64, "num_steps": 300, "batch_size": 16,
                      "learning_rate": 0.003, "warmup_steps": 15, "weight_decay": 0.0,
                      "update_every": 25, "drop_fraction": 0.3, "eval_windows": 256,
                      "model": {"num_layers": 2, "d_model": 64, "d_ff": 256}})
    recs = []
    for seed, ppl, agree in ((0, 14.0, 1.0), (1, 15.0, 0.999), (2, 16.0, 1.0)):
        for algorithm, dp, ms, mlp in (("dense", -1.0, 10.0, 4096),
                                       ("srigl_no_ablation_masked", 0.0, 20.0, 4200),
                                       ("srigl_no_ablation_condensed", 0.001, 40.0, 1024)):
            recs.append({"event": "final", "algorithm": algorithm, "sparsity_target": 0.9,
                         "dataset": "stdlib", "model": "lm-tiny", "seed": seed, "steps": 300,
                         "valid_loss": math.log(ppl + dp), "valid_perplexity": ppl + dp,
                         "step_ms": ms * (1 + seed), "state_bytes": 8 * mlp,
                         "mlp_state_bytes": mlp, "step_temp_bytes": 2**20,
                         "mask_agreement": agree, "machine": "cpu", "config": cfg})
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = results_report.section_condensed_lm(tmp_path)
    assert ("| tiny | 90% | 3 | 15.000 ± 1.000 | 15.001 ± 1.000 | +0.0010 perplexity (95% CI") in text
    assert "| 0.999667 / 0.999000 | 20.0 | 40.0 | 80.0 | 2.00 | 4.00 | 4 / 4 / 1 |" in text
    assert "Dense LM, same AdamW and batches: perplexity tiny 14.000 ± 1.000 (n=3 seeds)" in text
    assert "tiny 90% 6/26" in text  # k of fc / proj at d=64, d_ff=256
    assert "identical at the end in 2 of 3 paired runs" in text
    assert "Welch's test separates the two at no sparsity" in text
    assert ("tiny: state 32 / 33 / 8 KiB, step temporaries dense 1.00 MiB; masked 1.00 MiB; "
            "condensed 1.00 MiB.") in text
    assert "`python -m experiments.condensed_training_lm --preset tiny --sparsities 0.9 --seeds 0 1 2`" in text


def test_condensed_vit_table(tmp_path):
    """Table CT-vit pairs the masked and condensed ViT record of each seed (test accuracy
    mean ± sample std, Welch difference) with mask agreement and step-time ratios."""
    assert "No records yet" in results_report.section_condensed_vit(tmp_path)
    d = tmp_path / "results" / results_report.CONDENSED_VIT
    d.mkdir(parents=True)
    cfg = json.dumps({"epochs": 1, "batch_size": 128, "learning_rate": 0.001,
                      "update_every": 50, "drop_fraction": 0.3, "validation_size": 6000,
                      "growth_block": 256})
    recs = []
    for seed, acc, agree in ((0, 0.95, 1.0), (1, 0.96, 0.999), (2, 0.97, 0.998)):
        for side, da, ms in (("masked", 0.0, 100.0), ("condensed", 0.001, 150.0)):
            recs.append({"event": "final", "algorithm": f"srigl_no_ablation_{side}",
                         "sparsity_target": 0.9, "dataset": "mnist", "model": "vit",
                         "seed": seed, "steps": 421, "test_accuracy": acc + da,
                         "test_loss": 0.1, "step_ms": ms * (1 + seed), "timed_steps": 410,
                         "mask_agreement": agree, "machine": "cpu", "config": cfg})
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = results_report.section_condensed_vit(tmp_path)
    assert "| MNIST | no ablation | 90% | 3 | 96.00 ± 1.00 | 96.10 ± 1.00 |" in text
    assert "| 0.999000 / 0.998000 | 200.0 | 300.0 | 1.50 |" in text
    assert "identical at the end in 1 of 3 paired runs" in text
    assert ("`python -m experiments.condensed_training_vit --dataset mnist --data_dir "
            "../shared/data/mnist --sparsities 0.9 --seeds 0 1 2`") in text
    assert "in blocks of 256 neurons. 1 epoch(s) of 421 steps, batch 128" in text

def test_srigl_vit_section_chooses_gamma_on_the_vits_own_validation(tmp_path):
    """The ViT-tiny part (tables S-vit-val-fmnist, S-vit-fmnist, N-vit-fmnist) chooses
    gamma_sal on the ViT's validation accuracy at 90% (not on test, not on the MLP), and
    states whether 'SRigL with ablation ~= RigL' holds."""
    def rec(algorithm, seed, val, test, g=None):
        kw = {} if g is None else {"gamma_sal": g}
        return {"algorithm": algorithm, "sparsity_target": 0.9, "seed": seed, "steps": 421,
                "config": json.dumps({"algorithm_kwargs": kw, "epochs": 1}),
                "image_shape": [28, 28, 1], "val_accuracy": val, "test_accuracy": test,
                "sparsity": 0.84, "active_neurons/EncoderBlock_0/SelfAttention_0/query/kernel":
                60.0 if g else 64.0}

    recs = [rec("srigl", s, 0.80, 0.99, g=0.3) for s in (0, 1)]                  # best test
    recs += [rec("srigl", s, 0.86 + 0.01 * s, 0.70 + 0.01 * s, g=0.6) for s in (0, 1, 2)]
    recs += [rec("srigl", s, 0.84, 0.95, g=0.9) for s in (0, 1)]
    recs += [rec(m, s, 0.8, 0.80 + 0.01 * s) for m in ("rigl", "srigl_no_ablation")
             for s in (0, 1, 2)]
    d = tmp_path / "results" / "vit_fmnist_srigl"
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = results_report.section_srigl_val(tmp_path)
    assert "`results/vit_mnist_srigl/results.jsonl` absent" in text
    assert "(table S-vit-val-fmnist;" in text and "(table S-vit-fmnist;" in text
    assert "Validation accuracy (%) of SRigL at 90% by gamma_sal on Fashion-MNIST" in text
    assert "Chosen gamma_sal on Fashion-MNIST: **0.6**" in text and "Not run" not in text
    assert "| SRigL, gamma_sal 0.6 (chosen) | 71.00 ± 1.00 |" in text
    assert "* Table S-vit-fmnist: SRigL (gamma_sal 0.6) - RigL" in text
    assert ("'SRigL with ablation ~= RigL' at 90% on ViT-tiny on Fashion-MNIST (table "
            "S-vit-fmnist, test split, gamma_sal chosen on validation): SRigL is below RigL"
            in text) and "**does not hold**" in text
    assert "table N-vit-fmnist;" in text and "| B0 q |" in text


def test_srigl_vit_section_chooses_nothing_from_an_incomplete_sweep(tmp_path):
    """A ViT sweep with a gamma_sal short of its sweep seeds, or not run, chooses nothing."""
    recs = [{"algorithm": "srigl", "sparsity_target": 0.9, "seed": s, "steps": 421,
             "config": json.dumps({"algorithm_kwargs": {"gamma_sal": g}, "epochs": 1}),
             "image_shape": [28, 28, 1], "val_accuracy": 0.8, "test_accuracy": 0.8}
            for g, seeds in ((0.3, (0, 1)), (0.6, (0,))) for s in seeds]
    d = tmp_path / "results" / "vit_mnist_srigl"
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = results_report.section_srigl_val(tmp_path)
    assert ("The sweep in table S-vit-val is incomplete (gamma_sal 0.6 (1 of 2 seeds), 0.9 "
            "(not run))" in text)
    assert "Chosen gamma_sal on MNIST" not in text and "(table S-vit;" not in text


def test_lm_section_renders_each_study_with_its_own_label(tmp_path):
    """Every LM grid of LM_STUDIES is one table of the same shape: validation perplexity
    mean ± sample std per method and sparsity, its Welch tests named after its label."""
    for study, seeds in (("lm_small", (0, 1)), ("lm_small_long", (0, 1, 2))):
        d = tmp_path / "results" / study
        d.mkdir(parents=True)
        cfg = json.dumps({"model": {"num_layers": 2, "d_model": 64, "d_ff": 256,
                                    "seq_len": 64}, "num_steps": 300 * len(seeds)})
        recs = [{"event": "final", "algorithm": m, "sparsity_target": 0.0 if m == "dense"
                 else 0.9, "sparsity": 0.0 if m == "dense" else 0.9, "seed": seed,
                 "valid_perplexity": 10.0 + k + seed, "wall_time": 1.0, "config": cfg}
                for k, m in enumerate(("dense", *results_report.LM_METHODS))
                for seed in seeds]
        (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = results_report.section_lm(tmp_path)
    assert text.count("## Byte-level LM") == 1 and "### Longer runs: table LM-long" in text
    assert "| RigL | 12.500 ± 0.707 (n=2) |" in text  # table LM: 2 seeds, marked
    assert "| RigL | 13.000 ± 1.000 |" in text  # table LM-long: 3 seeds, the convention
    assert "dense alone spans 1.000 between its two seeds" in text
    assert "dense alone spans 2.000 across its 3 seeds" in text
    assert "(results/lm_small_long/curves.png)" in text


def test_lm_val_section_chooses_on_validation_and_reports_test(tmp_path):
    """Table LM-lr bolds each cell's lowest seed-0 validation perplexity; table LM-test
    reports only the test perplexity of the chosen rate (a better test number at another
    rate never enters), with the grid-edge choices named."""
    assert "No records yet" in "\n".join(results_report._lm_val_study(tmp_path))
    d = tmp_path / "results" / results_report.LM_VAL
    d.mkdir(parents=True)
    cfg = json.dumps({"model": {"seq_len": 64}, "num_steps": 2400, "batch_size": 16,
                      "eval_windows": 256, "test_windows": 2048, "lr_schedule": "cosine",
                      "update_every": 100})
    lrs = (0.001, 0.003, 0.01)
    recs = []
    for k, m in enumerate(("dense", *results_report.LM_METHODS)):
        s = 0.0 if m == "dense" else 0.9
        best = 0.01 if m == "rigl" else 0.003
        for lr in lrs:  # seed 0: validation best at `best`; test best elsewhere
            recs.append({"algorithm": m, "sparsity_target": s, "seed": 0, "learning_rate": lr,
                         "valid_perplexity": 8.0 + k - (lr == best),
                         "test_perplexity": 5.0 + k if lr == best else 1.0,
                         "wall_time": 1.0, "config": cfg})
        for seed in (1, 2):
            recs.append({"algorithm": m, "sparsity_target": s, "seed": seed,
                         "learning_rate": best, "valid_perplexity": 8.0 + k,
                         "test_perplexity": 5.0 + k + seed, "wall_time": 1.0, "config": cfg})
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = "\n".join(results_report._lm_val_study(tmp_path))
    assert "| method | lr 0.001 | lr 0.003 | lr 0.01 |" in text
    assert "| dense | 8.000 | **7.000** | 8.000 |" in text
    assert "| RigL 90% | 10.000 | 10.000 | **9.000** |" in text
    assert "Chosen at an end of the grid (the best rate may lie beyond it): RigL 90%." in text
    assert "Dense (lr 0.003): 6.000 ± 1.000." in text
    assert "| RigL | 8.000 ± 1.000 |" in text and "| static | 7.000 ± 1.000 |" in text
    assert "90% static 0.003, RigL 0.01, SRigL 0.003, magnitude 0.003" in text
    assert "Mean ordering (best first), table LM-test: 90% static < RigL < SRigL < magnitude" in text
    assert "1.000 ±" not in text


def test_lm_val_section_on_a_partial_grid_chooses_nothing_early(tmp_path):
    """A sweep in progress: a cell whose seed-0 rate grid is not complete gets no chosen
    rate (its best rate so far is not bolded, it has no test entry), and no ordering or test
    is claimed until every cell has all its seeds; tables carry the study's label."""
    study = results_report.LM_VAL_STUDIES[1]
    d = tmp_path / "results" / study.name
    d.mkdir(parents=True)
    cfg = json.dumps({"model": {"seq_len": 64, "num_layers": 4, "d_model": 128,
                                "d_ff": 512}, "num_steps": 2400})
    recs = []
    for k, m in enumerate(("dense", *results_report.LM_METHODS)):
        s = 0.0 if m == "dense" else 0.9
        for lr in (0.001, 0.003) if m != "rigl" else (0.001,):  # RigL: 1 rate of 2 so far
            recs.append({"algorithm": m, "sparsity_target": s, "seed": 0, "learning_rate": lr,
                         "valid_perplexity": 8.0 + k - (lr == 0.003), "test_perplexity": 5.0,
                         "wall_time": 1.0, "config": cfg})
        if m != "rigl":
            recs.append({"algorithm": m, "sparsity_target": s, "seed": 1, "learning_rate": 0.003,
                         "valid_perplexity": 8.0, "test_perplexity": 6.0, "wall_time": 1.0,
                         "config": cfg})
    (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    text = "\n".join(results_report._lm_val_study(tmp_path, study))
    assert "table LM-1m-lr" in text and "Table LM-1m-test" in text
    assert "4 blocks of d=128, d_ff=512" in text
    assert "| RigL 90% | 10.000 | - |" in text  # nothing bolded
    assert "| static 90% | 9.000 | **8.000** |" in text
    assert "rate grid not complete yet (no rate chosen, no entry in table LM-1m-test): RigL 90%." in text
    assert "| static | 5.500 ± 0.707 |" in text
    assert "No orderings or tests on table LM-1m-test until every cell" in text
    assert "Mean ordering" not in text and "Welch" not in text


def test_lm_val_section_compares_with_the_other_model_size(tmp_path):
    """A complete 1m grid is compared with the tiny one: each sparse cell's mean test
    perplexity over dense's at both sizes (each at its own chosen rate; a test number at
    a rate not chosen never enters) and RigL - static's sign; nothing while the other
    grid is incomplete."""
    study = results_report.LM_VAL_STUDIES[1]
    cfg = json.dumps({"model": {"seq_len": 64}, "num_steps": 2400})

    def write(name, dense, rigl, static, short=()):
        recs = []
        for m in ("dense", *results_report.LM_METHODS):
            s = 0.0 if m == "dense" else 0.9
            base = {"dense": dense, "rigl": rigl, "static": static}.get(m, 2 * dense)
            for lr in (0.001, 0.003):  # seed 0 chooses 0.003; 0.001's test number is bait
                recs.append({"algorithm": m, "sparsity_target": s, "seed": 0,
                             "learning_rate": lr, "valid_perplexity": 9.0 - (lr == 0.003),
                             "test_perplexity": base if lr == 0.003 else 0.5,
                             "wall_time": 1.0, "config": cfg})
            for seed in (1,) if m in short else (1, 2):
                recs.append({"algorithm": m, "sparsity_target": s, "seed": seed,
                             "learning_rate": 0.003, "valid_perplexity": 8.0,
                             "test_perplexity": base + 0.01 * seed, "wall_time": 1.0,
                             "config": cfg})
        d = tmp_path / "results" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    write(study.name, dense=4.0, rigl=4.4, static=4.2)
    write(study.other_size, dense=5.0, rigl=5.5, static=6.0, short=("rigl",))
    text = "\n".join(results_report._lm_val_study(tmp_path, study))
    assert "Table LM-test (the other size) is not complete: no comparison yet." in text
    write(study.other_size, dense=5.0, rigl=5.5, static=6.0)
    text = "\n".join(results_report._lm_val_study(tmp_path, study))
    # means: tiny dense 5.01, RigL 5.51, static 6.01; 1m dense 4.01, RigL 4.41, static 4.21
    assert ("table LM-test -> this table: 90% static 1.200 -> 1.050, RigL 1.100 -> 1.100, "
            "SRigL 1.998 -> 1.998, magnitude 1.998 -> 1.998.") in text
    assert "RigL - static: 90% -0.500 -> +0.200; the same sign at no sparsity" in text
