"""The LM sweep's grid and its learning-rate choice (experiments/lm/sweep.py): the
selection seed spans the rates, the other seeds run the rate chosen on validation."""

import pytest

from experiments.lm import sweep


def test_grid_without_selection_spans_every_rate_for_every_seed():
    runs = sweep.grid(["dense", "rigl"], [0.9, 0.5], [0, 1], [0.1, 0.2])
    assert runs[:4] == [(0.0, 0, "dense", 0.1), (0.0, 0, "dense", 0.2),
                        (0.0, 1, "dense", 0.1), (0.0, 1, "dense", 0.2)]
    assert runs[4:8] == [(0.9, 0, "rigl", 0.1), (0.9, 0, "rigl", 0.2),
                         (0.9, 1, "rigl", 0.1), (0.9, 1, "rigl", 0.2)]
    assert len(runs) == 12 and sweep.grid(["rigl"], [0.9], [3], [None]) == [
        (0.9, 3, "rigl", None)]


def test_grid_with_selection_seed_puts_its_runs_of_each_cell_first():
    runs = sweep.grid(["dense", "static"], [0.9], [1, 0, 2], [0.1, 0.2], select_seed=0)
    assert runs == [(0.0, 0, "dense", 0.1), (0.0, 0, "dense", 0.2), (0.0, 1, "dense", None),
                    (0.0, 2, "dense", None), (0.9, 0, "static", 0.1), (0.9, 0, "static", 0.2),
                    (0.9, 1, "static", None), (0.9, 2, "static", None)]
    with pytest.raises(ValueError, match="needs --learning_rates"):
        sweep.grid(["rigl"], [0.9], [0, 1], [None], select_seed=0)
    with pytest.raises(ValueError, match="--select_seed 5 is not among --seeds 0,1"):
        sweep.grid(["rigl"], [0.9], [0, 1], [0.1], select_seed=5)


def test_chosen_lr_is_the_lowest_validation_perplexity_of_the_selection_seed():
    def rec(m, s, seed, lr, ppl):
        return {"algorithm": m, "sparsity_target": s, "seed": seed, "learning_rate": lr,
                "valid_perplexity": ppl, "test_perplexity": 1.0}

    recs = [rec("rigl", 0.9, 0, 0.1, 9.0), rec("rigl", 0.9, 0, 0.2, 8.0),
            rec("rigl", 0.9, 0, 0.3, 8.5),
            rec("rigl", 0.9, 1, 0.1, 1.0),  # another seed: not looked at
            rec("rigl", 0.5, 0, 0.1, 1.0),  # another sparsity
            rec("static", 0.9, 0, 0.3, 1.0),  # another method
            rec("dense", 0.0, 0, 0.3, 7.0), rec("dense", 0.0, 0, 0.1, 7.0)]
    assert sweep.chosen_lr(recs, "rigl", 0.9, 0) == 0.2
    assert sweep.chosen_lr(recs, "rigl", 0.9, 1) == 0.1
    assert sweep.chosen_lr(recs, "dense", 0.0, 0) == 0.1  # a tie: the smaller rate
    with pytest.raises(ValueError, match="no selection run of srigl at sparsity 0.9 with "
                                         "seed 0"):
        sweep.chosen_lr(recs, "srigl", 0.9, 0)


def test_validation_protocol_configs_differ_only_where_they_say():
    from experiments.configs import lm_1m_val, lm_small_long, lm_small_val

    small, one_m = lm_small_val.get_config(), lm_1m_val.get_config()
    long = lm_small_long.get_config()
    assert small.test_windows == 2048 and small.num_steps == 2400
    diff = {k for k in small.keys() if small[k] != long[k]}
    assert diff == {"test_windows"}  # table LM-long's setting plus the test pass
    assert {k for k in small.keys() if small[k] != one_m[k]} == {"model"}
    assert (one_m.model.num_layers, one_m.model.d_model, one_m.model.seq_len) == (4, 128, 64)


def test_curves_at_chosen_rates_average_only_the_chosen_runs(tmp_path):
    """``experiments.lm.plot.curves(..., chosen=True)`` draws each cell from its runs at the
    rate chosen on seed 0's validation (other seeds' runs at that rate included), never
    from the rates it lost to."""
    import json

    from experiments.lm import plot

    recs = []
    for seed, lr, valid, loss in [(0, 0.1, 9.0, 5.0), (0, 0.2, 8.0, 3.0), (1, 0.2, 8.5, 1.0)]:
        path = tmp_path / f"s{seed}_lr{lr}.jsonl"
        path.write_text("\n".join(json.dumps({"event": "train", "step": t, "train_loss": loss + t})
                                  for t in (10, 20)) + "\n")
        recs.append({"algorithm": "rigl", "sparsity_target": 0.9, "seed": seed,
                     "learning_rate": lr, "valid_perplexity": valid,
                     "metrics_path": str(path)})
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    steps, mean = plot.curves(results, chosen=True)[("rigl", 0.9)]
    assert steps.tolist() == [10, 20] and mean.tolist() == [12.0, 22.0]  # (3 + 1) / 2 + t
    _, every = plot.curves(results)[("rigl", 0.9)]
    assert every.tolist() == [13.0, 23.0]  # all three runs
    out = tmp_path / "curves.png"
    plot.main(["--results", str(results), "--out", str(out), "--chosen"])
    assert out.stat().st_size > 1000
