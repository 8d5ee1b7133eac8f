"""The lockstep helpers of the condensed-training studies and the LM study's run (issue 18)."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.condensed_lockstep import Lockstep, mask_agreement, summary_table, tree_bytes


def test_lockstep_steps_every_loop_on_the_same_batch_and_times_after_warmup():
    seen = {"a": [], "b": []}

    def make(name):
        def step(total, x):
            seen[name].append(x)
            return (total + x,)
        return step

    ls = Lockstep({"a": make("a"), "b": make("b")}, {"a": (0,), "b": (10,)}, warmup=2)
    ls.run((x,) for x in range(5))
    assert seen["a"] == seen["b"] == [0, 1, 2, 3, 4]
    assert ls.states == {"a": (10,), "b": (20,)}
    assert ls.count == 5 and ls.timed_steps == 3
    assert set(ls.step_ms()) == {"a", "b"} and all(v >= 0 for v in ls.step_ms().values())
    with pytest.raises(ValueError, match="differ"):
        Lockstep({"a": make("a")}, {"b": (0,)})


def test_mask_agreement_and_tree_bytes():
    m = {"x": {"kernel": np.array([[True, False], [True, True]]), "bias": None}}
    o = {"x": {"kernel": np.array([[True, True], [True, True]]), "bias": None}}
    assert mask_agreement(m, o) == 0.75 and mask_agreement(m, m) == 1.0
    with pytest.raises(ValueError, match="masked leaves"):
        mask_agreement(m, {})
    tree = {"fc": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4, jnp.int8)},
            "attn": {"kernel": jnp.zeros((2, 2))}, "key": jax.random.key(0)}
    assert tree_bytes(tree) == 48 + 4 + 16 + 8
    assert tree_bytes(tree, r"(^|/)fc/") == 52


def test_summary_table_reports_each_loops_seeds_per_sparsity():
    rows = [{"sparsity_target": 0.9, "algorithm": f"srigl_{name}", "valid_perplexity": v,
             "mask_agreement": agree, "step_ms": ms}
            for name, vals, agree, ms in (("masked", (1.0, 3.0), 0.99, 2.0),
                                           ("condensed", (2.0, 2.0), 0.5, 4.0))
            for v in vals]
    text = summary_table(rows, [0.9], "valid_perplexity", "ppl")
    assert text.splitlines()[0].startswith("| sparsity | masked ppl (mean ± std) |")
    assert text.splitlines()[2] == "| 90% | 2.000 ± 1.414 | 2.000 ± 0.000 | 0.990000 | 2.00 | 4.00 |"


@pytest.mark.slow
def test_lm_study_run_keeps_the_masked_and_condensed_runs_equal():
    """A few steps of the LM study with two topology updates: the two sparse runs end with
    the same MLP masks and the same validation loss; the condensed MLP state is smaller."""
    from experiments import condensed_training_lm as study
    from experiments.lm import data as data_lib
    from experiments.lm import model as model_lib

    args = argparse.Namespace(preset="tiny", seq_len=16, steps=12, warmup=2, eval_batch=4)
    c = study.config(args)
    c.model = model_lib.lm_config("tiny", seq_len=16, num_layers=1)
    c.update_every, c.eval_windows, c.warmup_steps = 4, 8, 2
    corpus = data_lib.load_corpus("stdlib")
    # optax's AdamW bias correction mixes a Python float and an int32 count, which the test
    # suite's strict promotion refuses; the study runs with JAX's standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        out, agree, steps = study.run(c, 0.9, 0, corpus, args)
    assert steps == 12 and agree == 1.0
    m, cd = out["masked"], out["condensed"]
    assert cd["valid_loss"] == pytest.approx(m["valid_loss"], rel=1e-5)
    assert cd["mlp_state_bytes"] < 0.3 * m["mlp_state_bytes"]
    assert m["timed_steps"] == 10 and all(r["step_ms"] > 0 for r in out.values())
