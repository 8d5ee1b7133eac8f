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


def test_ranking_list_validation_size_and_joint_factor_arguments():
    args = sos.parse_args(["--study", "pruning", "--out", "x", "--ranking", "layerwise,global",
                           "--validation_size", "6000"])
    assert args.rankings == ["layerwise", "global"] and args.validation_size == 6000
    assert isinstance(args.validation_size, int)
    assert sos.parse_args(["--study", "pruning", "--out", "x"]).validation_size == 0
    for argv in (["--study", "pruning", "--ranking", "per_layer"],
                 ["--study", "pruning", "--ranking", "global,global"],
                 ["--study", "retrain", "--ranking", "layerwise,global"],
                 ["--study", "pruning", "--validation_size", "-1"],
                 ["--study", "pruning", "--validation_size", "10.5"],
                 ["--study", "retrain", "--joint_steps_factor", "4"],  # needs --methods
                 ["--study", "pruning", "--methods", "magnitude", "--joint_steps_factor", "4"]):
        with pytest.raises(SystemExit):
            sos.parse_args([*argv, "--out", "x"])
    args = sos.parse_args(["--study", "retrain", "--methods", "magnitude",
                           "--joint_steps_factor", "4", "--out", "x"])
    assert args.joint_steps_factor == 4.0


def test_scope_suffixes_of_finetuned_and_penalised_methods():
    recs = [{"study": "pruning", "method": "magnitude_ft", "ranking": "global"},
            {"study": "pruning", "method": "vd", "ranking": "global"},
            {"study": "pruning", "method": "vd_ft", "ranking": "layerwise"},
            {"study": "pruning", "method": "l0", "ranking": "layerwise"}]
    assert [sos._method(r) for r in recs] == ["magnitude_ft_global", "vd", "vd_ft_layerwise",
                                             "l0_layerwise"]


def test_best_per_target_selects_on_the_validation_split():
    def rec(w, val, test, seed):
        return {"study": "pruning", "method": "vd", "penalty_weight": w, "ranking": "global",
                "target_sparsity": 0.9, "val_accuracy": val, "test_accuracy": test,
                "seed": seed, "sparsity": 0.9}

    recs = [rec(1.0, 0.80, 0.70, 0), rec(1.0, 0.82, 0.71, 1),
            rec(3.0, 0.70, 0.90, 0), rec(3.0, 0.72, 0.91, 1)]
    assert {r["penalty_weight"] for r in sos.best_per_target(recs, "val_accuracy")} == {1.0}
    assert {r["penalty_weight"] for r in sos.best_per_target(recs)} == {3.0}
    with pytest.raises(KeyError, match="select_on='val_loss'"):
        sos.best_per_target(recs, "val_loss")


def test_vd_cut_layerwise_keeps_every_layer_at_the_target():
    import types

    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    params = {f"Dense_{i}": {"kernel": rng.normal(size=shape).astype(np.float32),
                             # layer 0's log alpha far below the others': a global cut
                             # would keep it whole
                             "log_sigma2": rng.normal(size=shape).astype(np.float32)
                             + (-6.0 if i == 0 else 2.0),
                             "bias": np.zeros(shape[1], np.float32)}
              for i, shape in enumerate([(20, 8), (8, 6), (6, 3)])}

    def evaluate(p):
        return {"test_accuracy": 0.5}

    ctx = types.SimpleNamespace(args=types.SimpleNamespace(aux_lr=1e-2), evaluate=evaluate)
    with jax.numpy_dtype_promotion("standard"):
        for ranking in ("layerwise", "global"):
            _, masks, _, extra = sos.cut_to_target(ctx, "vd", params, 0.5, 1.0, ranking)
            assert extra["ranking"] == ranking
            kept = {n: float(np.mean(np.asarray(m["kernel"]))) for n, m in masks.items()}
            total = sum(int(np.sum(np.asarray(m["kernel"]))) for m in masks.values())
            assert total == round(0.5 * (160 + 48 + 18))
            if ranking == "layerwise":
                assert all(v == pytest.approx(0.5, abs=0.02) for v in kept.values()), kept
            else:
                assert kept["Dense_0"] > 0.6, kept


@pytest.mark.slow
def test_fair_pruning_protocol_scopes_validation_and_finetuning(tmp_path):
    records = run_study(tmp_path, "pruning", 0.8, [
        "--methods", "magnitude,vd", "--ranking", "layerwise,global", "--validation_size",
        "200", "--finetune_fraction", "0.5"])
    # per method: 2 scopes x (cut or trained model + its fine-tuning)
    assert sorted((r["method"], r["ranking"]) for r in records) == sorted(
        (m + ft, rk) for m in ("magnitude", "vd") for ft in ("", "_ft")
        for rk in ("layerwise", "global"))
    for r in records:
        assert r["validation_size"] == 200 and 0.0 <= r["val_accuracy"] <= 1.0
        assert r["train_size"] + 200 == 1438  # digits' training set, less the split
        assert abs(r["sparsity"] - 0.8) <= 0.02
        assert r.get("finetune_steps", 0) == (round(0.5 * r["steps"])
                                              if r["method"].endswith("_ft") else 0)
    vd = [r for r in records if r["method"] == "vd"]
    assert vd[0]["train_time"] == vd[1]["train_time"]  # one training, cut at both scopes


def test_fair_section_reports_the_test_accuracy_of_the_validation_chosen_weight(tmp_path):
    from experiments import results_report

    recs = []
    for seed in range(3):
        for scope in ("layerwise", "global"):
            recs.append({"study": "pruning", "method": "magnitude", "ranking": scope,
                         "target_sparsity": 0.9, "sparsity": 0.9, "seed": seed,
                         "test_accuracy": 0.85 + 0.001 * seed, "val_accuracy": 0.86,
                         "steps": 100, "validation_size": 50, "train_size": 500,
                         "wall_time": 1.0})
            # w=1: better on test, worse on validation; w=3 must be the one reported
            for w, val, test in ((1.0, 0.70, 0.84), (3.0, 0.80, 0.60)):
                recs.append({"study": "pruning", "method": "vd", "ranking": scope,
                             "penalty_weight": w, "target_sparsity": 0.9, "sparsity": 0.9,
                             "seed": seed, "test_accuracy": test + 0.001 * seed,
                             "val_accuracy": val, "steps": 100, "validation_size": 50,
                             "train_size": 500, "wall_time": 1.0})
    folder = tmp_path / "results" / "sos_fair"
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    text = results_report.section_sos_fair(tmp_path)
    assert "| T | global | VD | 60.10 ± 0.10 (w=3) |" in text
    assert "| T | layerwise | VD | 60.10 ± 0.10 (w=3) |" in text
    assert "| VD w=1, global | 70.00 ± 0.00 |" in text
    assert "90% magnitude - VD +25.00 points" in text
    assert results_report.section_sos_fair(tmp_path / "none") == ""
