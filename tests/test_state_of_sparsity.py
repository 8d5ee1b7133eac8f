"""experiments/state_of_sparsity.py: each study runs in --quick mode on digits (in-process)
and writes one sane JSONL record per run."""

import json

import pytest

from experiments import state_of_sparsity as sos


def run_study(tmp_path, study, sparsity, extra=()):
    out = tmp_path / study
    returned = sos.main(["--study", study, "--quick", "--sparsities", str(sparsity),
                         "--out", str(out), *extra])
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(returned)
    return records


def check_common(records, study, sparsity, methods):
    found = {r["method"] for r in records}
    assert set(methods) <= found
    for r in records:
        assert r["study"] == study
        assert r["dataset"] == "digits"
        assert r["epochs"] == 2 and r["seed"] == 0 and r["steps"] > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["wall_time"] > 0.0
        assert isinstance(r["machine"], str) and r["machine"]
        if r["method"] in methods:
            assert r["target_sparsity"] == pytest.approx(sparsity)
            assert abs(r["sparsity"] - sparsity) <= 0.02, r


@pytest.mark.slow
def test_pruning_study(tmp_path):
    records = run_study(tmp_path, "pruning", 0.8)
    check_common(records, "pruning", 0.8, sos.STUDIES["pruning"])
    assert len(records) == 4
    for r in records:
        if r["method"] in ("vd", "l0"):
            assert r["threshold"] is not None
            assert 0.0 <= r["natural_sparsity"] <= 1.0
            assert 0.0 <= r["natural_accuracy"] <= 1.0


@pytest.mark.slow
def test_retrain_study(tmp_path):
    records = run_study(tmp_path, "retrain", 0.8, ["--rounds", "1"])
    check_common(records, "retrain", 0.8, sos.STUDIES["retrain"])
    dense = [r for r in records if r["method"] == "dense"]
    assert len(dense) == 1 and dense[0]["sparsity"] < 0.02
    rewinds = {r["method"]: r["rewind_step"] for r in records if "rewind_step" in r}
    assert rewinds["lottery_rewind0"] == 0 and rewinds["lottery_rewind"] > 0


@pytest.mark.slow
def test_init_study(tmp_path):
    records = run_study(tmp_path, "init", 0.9)
    check_common(records, "init", 0.9, sos.STUDIES["init"])
    assert len(records) == 4


def test_cli_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit):
        sos.parse_args(["--study", "init", "--methods", "magnitude", "--out", str(tmp_path)])


def test_quick_defaults():
    args = sos.parse_args(["--study", "pruning", "--quick", "--out", "x"])
    assert args.dataset == "digits" and args.epochs == 2 and args.seeds == [0]
    args = sos.parse_args(["--study", "pruning", "--out", "x"])
    assert args.dataset == "fashion_mnist" and args.seeds == [0, 1, 2]


def test_summary_table():
    recs = [{"target_sparsity": 0.9, "method": m, "test_accuracy": a, "sparsity": 0.9,
             "wall_time": 1.0} for m, a in [("snip", 0.5), ("snip", 0.7), ("random", 0.4)]]
    table = sos.summary_table(recs)
    assert "| 0.9 | snip | 2 | 0.6000 ± 0.1414 |" in table  # sample std, ddof=1
    assert "| 0.9 | random | 1 | 0.4000 ± n/a |" in table
    with pytest.raises(SystemExit):
        sos.parse_args(["--study", "init"])  # no --out


@pytest.mark.slow
def test_penalty_weight_lists_and_finetuning(tmp_path):
    records = run_study(tmp_path, "pruning", 0.8, [
        "--methods", "l0", "--l0_weight", "0.05,0.5", "--finetune_fraction", "0.5"])
    assert [(r["method"], r["penalty_weight"]) for r in records] == [
        ("l0", 0.05), ("l0_ft", 0.05), ("l0", 0.5), ("l0_ft", 0.5)]
    for cut, tuned in zip(records[::2], records[1::2], strict=True):
        assert tuned["finetune_steps"] == round(0.5 * cut["steps"]) > 0
        # Fine-tuning keeps the cut's mask: never fewer zeros than the target.
        assert tuned["sparsity"] >= 0.8 - 1e-3
        assert tuned["wall_time"] > cut["wall_time"]
    table = sos.summary_table(records)
    assert "| 0.8 | l0 (w=0.05) | 1 |" in table and "| 0.8 | l0_ft (w=0.5) | 1 |" in table


def test_best_per_target_and_frontier_plot(tmp_path):
    def rec(method, w, acc, seed):
        return {"method": method, "penalty_weight": w, "target_sparsity": 0.9,
                "test_accuracy": acc, "seed": seed, "sparsity": 0.9, "wall_time": 1.0}

    recs = [rec("vd", 1.0, 0.5, 0), rec("vd", 1.0, 0.7, 1), rec("vd", 3.0, 0.65, 0),
            rec("vd", 3.0, 0.66, 1), rec("magnitude", None, 0.8, 0)]
    best = sos.best_per_target(recs)
    assert sorted((r["method"], r["penalty_weight"]) for r in best) == [
        ("magnitude", None), ("vd", 3.0), ("vd", 3.0)]
    path = tmp_path / "frontier.png"
    results = tmp_path / "r.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in recs))
    sos.main(["--summarize", str(results), "--plot", str(path)])
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("flag, value", [("--vd_weight", "1,-2"), ("--l0_weight", "0"),
                                         ("--finetune_fraction", "1.5")])
def test_bad_penalty_and_finetune_arguments(flag, value):
    with pytest.raises(SystemExit):
        sos.parse_args(["--study", "pruning", "--out", "x", flag, value])


@pytest.mark.slow
def test_penalized_methods_train_once_per_seed_and_weight(tmp_path):
    out = tmp_path / "p"
    records = sos.main(["--study", "pruning", "--quick", "--methods", "vd",
                        "--sparsities", "0.5,0.8", "--out", str(out)])
    assert [(r["method"], r["target_sparsity"]) for r in records] == [("vd", 0.5), ("vd", 0.8)]
    assert records[0]["train_time"] == records[1]["train_time"]  # one shared training
    assert [round(r["sparsity"], 2) for r in records] == [0.5, 0.8]


def test_global_suffix_only_where_layerwise_is_the_default():
    recs = [{"study": "init", "method": "random", "ranking": "global"},
            {"study": "pruning", "method": "random", "ranking": "global"},
            {"study": "pruning", "method": "magnitude", "ranking": "layerwise"}]
    assert [sos._method(r) for r in recs] == ["random", "random_global", "magnitude"]


def test_best_table_pivots_the_best_weight_per_cell():
    def rec(method, w, target, acc, sparsity):
        return {"study": "pruning", "method": method, "penalty_weight": w,
                "target_sparsity": target, "test_accuracy": acc, "sparsity": sparsity,
                "seed": 0, "wall_time": 1.0}

    recs = [rec("l0", 1.0, 0.9, 0.5, 0.9), rec("l0", 10.0, 0.9, 0.8, 0.95),
            rec("magnitude", None, 0.9, 0.85, 0.9)]
    table = sos.best_table(recs)
    assert "| magnitude | 85.00 +- n/a |" in table
    assert "| l0 | 80.00 +- n/a (w=10, at 0.950) |" in table
