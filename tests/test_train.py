"""Tests for experiments/train.py: every algorithm trains and ends at its sparsity, the
gradient given to the optimizer is the dense one, metrics land in the JSONL, and every
error path says what is wrong."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from experiments import data as data_lib
from experiments import train as train_lib
from experiments.configs import digits_tiny


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits")


@pytest.fixture(scope="module")
def digits_val():
    return data_lib.load_dataset("digits", validation_size=0.1)


def tiny(**overrides):
    c = digits_tiny.get_config()
    c.num_steps = 20
    c.checkpoint_every = 0
    c.print_table = False
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def kernel_sparsity(params):
    leaves = [p for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
              if jax.tree_util.keystr(path).endswith("['kernel']")]
    nnz = sum(int(np.count_nonzero(np.asarray(x))) for x in leaves)
    return 1.0 - nnz / sum(x.size for x in leaves)


@pytest.mark.parametrize("algorithm", [
    "rigl",
    *(pytest.param(a, marks=pytest.mark.slow)
      for a in ("dense", "static", "set", "snfs", "magnitude", "random"))])
def test_every_algorithm_trains_to_its_sparsity(algorithm, digits):
    c = tiny(algorithm=algorithm, sparsity=0.8, end_fraction=0.5, update_every=5)
    out = train_lib.train(c, None, dataset=digits)
    params = out["state"].params
    assert out["steps"] == 20 and int(out["state"].step) == 20
    if algorithm == "dense":
        assert out["sparsity"] == 0.0
        assert kernel_sparsity(params) == 0.0
        return
    masks = jaxsparse.get_masks(out["state"].opt_state)
    # Params are exactly sparse: nothing outside the mask.
    for m, p in zip(jaxsparse.masks.mask_leaves(masks), jax.tree.leaves(params), strict=True):
        if m is not None:
            assert not np.any(np.asarray(p)[~np.asarray(m)])
    mask_sparsity = float(jaxsparse.metrics.global_sparsity(masks))
    assert mask_sparsity == pytest.approx(0.8, abs=2e-3)
    assert kernel_sparsity(params) >= mask_sparsity - 1e-6
    assert 0.0 < out["sparsity"] < mask_sparsity  # biases count as dense
    assert np.isfinite(out["test_loss"])


@pytest.mark.slow
def test_host_scheduled_topology_trains_the_same_run(digits):
    """``host_topology``: a plain and an update step, picked per step on the host, train
    the run of the one-step loop: the same masks, params to float32 rounding."""
    c = tiny(sparsity=0.8, end_fraction=0.5, update_every=5)
    one = train_lib.train(c, None, dataset=digits)
    c.host_topology = True
    setup = train_lib.create_setup(c, digits)
    choose = train_lib.step_chooser(c, setup.model, setup.tx, c.batch_size)
    due = [jaxsparse.topology_due(setup.tx, t) for t in range(20)]
    assert due[5] and not due[0] and not due[1]
    assert [choose(t) is choose(5) for t in range(20)] == due
    two = train_lib.train(c, None, dataset=digits)
    masks = [jaxsparse.get_masks(r["state"].opt_state) for r in (one, two)]
    initial = jaxsparse.get_masks(setup.state.opt_state)
    for a, b in zip(jax.tree.leaves(masks[0]), jax.tree.leaves(masks[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(masks[1]), jax.tree.leaves(initial)))
    for a, b in zip(jax.tree.leaves(one["state"].params), jax.tree.leaves(two["state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # The first call of each step kind (its compilation) is timed apart from the loop.
    assert (one["loop_steps"], two["loop_steps"]) == (19, 18)
    assert two["first_step_time"] > 0 and two["loop_time"] > 0
    with pytest.raises(ValueError, match="host_topology: algorithm 'rigl' builds an "
                       "optimizer without a host schedule"):
        train_lib.step_chooser(c, setup.model, optax.chain(setup.tx), c.batch_size)
    c.algorithm = "dense"
    dense = train_lib.step_chooser(c, setup.model, setup.tx, c.batch_size)
    assert dense(0) is dense(5)


@pytest.mark.slow
def test_rigl_learns_digits(digits):
    c = tiny(num_steps=0, epochs=4, batch_size=32)
    c.model.hidden = (300, 100)
    out = train_lib.train(c, None, dataset=digits)
    assert out["test_accuracy"] > 0.8  # 10 classes: chance is 0.1
    assert out["itop_rate"] > 1 - 0.9 + 1e-3  # regrowth explored new weights


def test_gradient_passed_to_optimizer_is_dense(digits):
    """The step must differentiate w.r.t. the stored masked params: a forward computing
    kernel * mask would give exactly zero gradient at the inactive positions."""
    c = tiny(algorithm="static", sparsity=0.9)
    setup = train_lib.create_setup(c, digits)
    masks = jaxsparse.get_masks(setup.state.opt_state)

    def record_grads():
        return optax.GradientTransformation(
            lambda params: jax.tree.map(jnp.zeros_like, params),
            lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))

    tx = record_grads()
    state = train_lib.TrainState(setup.state.params, tx.init(setup.state.params),
                                 setup.state.step, setup.state.rng)
    it = data_lib.BatchIterator(digits.x_train, digits.y_train, c.batch_size, seed=0)
    step = train_lib.make_train_step(setup.model, tx, c.batch_size)
    new, _ = step(state, train_lib.zero_sums(), it.x, it.y, *it.next_indices())
    g = np.asarray(new.opt_state["Dense_1"]["kernel"])
    m = np.asarray(masks["Dense_1"]["kernel"])
    assert np.count_nonzero(g[~m]) > 0.5 * (~m).sum()


def test_metrics_jsonl_and_table(tmp_path, digits_val, capsys):
    c = tiny(num_steps=0, epochs=2, log_every=10, print_table=True, tensorboard=True)
    out = train_lib.train(c, tmp_path, dataset=digits_val)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    steps_per_epoch = len(digits_val.x_train) // c.batch_size
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, steps_per_epoch, 2 * steps_per_epoch]
    # Validation at every evaluation, the test split only once, at the end.
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in evals)
    assert ["test_accuracy" in r for r in evals] == [False, False, True]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(10, 2 * steps_per_epoch, 10)) + [
        2 * steps_per_epoch]
    assert all(0.0 <= r["train_accuracy"] <= 1.0 and r["sparsity"] > 0.5 for r in train)
    assert events[-1] == "final"
    final = records[-1]
    assert final["test_accuracy"] == evals[-1]["test_accuracy"] == out["test_accuracy"]
    assert final["val_accuracy"] == evals[-1]["val_accuracy"]
    assert final["validation_size"] == len(digits_val.x_val) == 144
    assert final["wall_time"] > 0 and "cores" in final["machine"]
    printed = capsys.readouterr().out
    assert "Dense_0/kernel" in printed and "total" in printed
    assert json.loads((tmp_path / "config.json").read_text())["algorithm"] == "rigl"
    # The same scalars as TensorBoard events (tensorboardX is a test dependency).
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["eval/val_accuracy"] == [(r["step"], pytest.approx(r["val_accuracy"]))
                                            for r in evals]
    assert scalars["eval/test_accuracy"] == [(evals[-1]["step"],
                                              pytest.approx(evals[-1]["test_accuracy"]))]
    assert [st for st, _ in scalars["train/train_loss"]] == [r["step"] for r in train]


def tensorboard_scalars(folder):
    """``{tag: [(step, value), ...]}`` from the event files in ``folder`` (TFRecord framing:
    length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.mark.slow
def test_existing_checkpoints_need_resume(tmp_path, digits):
    train_lib.train(tiny(num_steps=5), tmp_path, dataset=digits)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train_lib.train(tiny(num_steps=5), tmp_path, dataset=digits)
    out = train_lib.train(tiny(num_steps=5), tmp_path, resume=True, dataset=digits)
    assert out["steps_run"] == 0 and int(out["state"].step) == 5


def test_structured_methods_are_registered_with_their_arguments(monkeypatch):
    calls = {}

    def fake_srigl(inner, sparsity, **kwargs):
        calls.update(kwargs, sparsity=sparsity)
        return inner

    monkeypatch.setattr(jaxsparse, "srigl", fake_srigl)
    registry = train_lib.algorithm_registry()
    assert {"srigl", "srigl_no_ablation", "granet", "nm_pruning", "nm_rigl"} <= set(registry)
    train_lib.make_optimizer(tiny(algorithm="srigl"), 100, jax.random.key(0))
    assert calls["sparsity"] == 0.9 and calls["end_step"] == 75 and "ablation" not in calls
    train_lib.make_optimizer(tiny(algorithm="srigl_no_ablation"), 100, jax.random.key(0))
    assert calls["ablation"] is False


@pytest.mark.parametrize("field, value, message", [
    ("algorithm", "lottery", "unknown algorithm 'lottery'; choose one of"),
    ("optimizer", "lamb", "unknown optimizer 'lamb'"),
    ("lr_schedule", "linear", "unknown lr_schedule 'linear'"),
    ("lr_decay_factor", 1.5, "lr_decay_factor must be in"),
])
def test_config_errors(field, value, message):
    if field == "lr_decay_factor":
        overrides = {field: value, "lr_schedule": "step"}
    else:
        overrides = {field: value}
    with pytest.raises(ValueError, match=message):
        train_lib.make_optimizer(tiny(**overrides), 100, jax.random.key(0))


@pytest.mark.slow
def test_sparse_init_option_rescales_the_masked_init(digits):
    plain = train_lib.create_setup(tiny(), digits)
    scaled = train_lib.create_setup(tiny(sparse_init=True), digits)
    masks = jaxsparse.get_masks(plain.state.opt_state)
    k, m = plain.state.params["Dense_0"]["kernel"], masks["Dense_0"]["kernel"]
    expected = jaxsparse.sparse_init({"k": k}, {"k": m})["k"]
    np.testing.assert_allclose(scaled.state.params["Dense_0"]["kernel"], expected, rtol=1e-6)
    assert float(jnp.abs(expected).sum()) > 2 * float(jnp.abs(k).sum())


def test_step_schedule_divides_at_epoch_boundaries():
    # 10 epochs of 20 steps: /3 from epoch 5 (step 100), /9 from epoch 8 (step 160).
    c = tiny(lr_schedule="step", learning_rate=0.3, epochs=10, num_steps=0,
             lr_decay_epochs=(5, 8), lr_decay_factor=1 / 3)
    schedule = train_lib.learning_rate_schedule(c, 200)
    got = [float(schedule(t)) for t in (0, 99, 100, 159, 160, 199)]
    np.testing.assert_allclose(got, [0.3, 0.3, 0.1, 0.1, 0.1 / 3, 0.1 / 3], rtol=1e-6)
    c.num_steps = 200
    with pytest.raises(ValueError, match="counts epochs"):
        train_lib.learning_rate_schedule(c, 200)


def test_published_mnist_recipe_config_uses_nesterov_and_step_decay():
    from experiments.configs import mnist_lenet300_published
    c = mnist_lenet300_published.get_config()
    assert (c.batch_size, c.learning_rate, c.nesterov, c.weight_decay) == (100, 0.2, True, 1e-4)
    schedule = train_lib.learning_rate_schedule(c, 600 * c.epochs)
    np.testing.assert_allclose(
        [float(schedule(600 * 75 - 1)), float(schedule(600 * 75)), float(schedule(600 * 95))],
        [0.2, 0.2 / 3, 0.2 / 9], rtol=1e-6)


def test_step_count_errors(digits):
    with pytest.raises(ValueError, match="batch_size 5000 exceeds the 1438 training examples"):
        train_lib.train(tiny(batch_size=5000), None, dataset=digits)
    with pytest.raises(ValueError, match="nothing to train"):
        train_lib.train(tiny(num_steps=0, epochs=0), None, dataset=digits)


# ----------------------------------------------------------------------------- sweep, plots


@pytest.mark.slow
def test_sweep_and_plots(tmp_path, capsys):
    from experiments import plots, sweep

    c = sweep.apply_overrides(tiny(), ["num_steps=10", "model.hidden=[16, 16]"])
    assert c.model.hidden == (16, 16)
    records = sweep.sweep(c, tmp_path, ["dense", "rigl"], [0.8], [0, 1])
    assert [r["run"] for r in records] == ["dense_s0_seed0", "dense_s0_seed1",
                                           "rigl_s0.8_seed0", "rigl_s0.8_seed1"]
    assert all(r["machine"] and r["wall_time"] > 0 for r in records)
    assert sweep.sweep(c, tmp_path, ["dense", "rigl"], [0.8], [0, 1]) == []  # all done
    assert "already in" in capsys.readouterr().out
    saved = plots.load_jsonl(tmp_path / "results.jsonl")
    table = plots.frontier_table(saved)
    accs = [r["test_accuracy"] for r in records if r["algorithm"] == "rigl"]
    assert table["rigl"][0][:2] == (0.8, pytest.approx(sum(accs) / 2))
    assert table["rigl"][0][3] == 2 and table["dense"][0][0] == 0.0
    paths = plots.plot_sweep(tmp_path / "results.jsonl", tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["active_neurons.png", "curves.png",
                                             "frontier.png", "itop.png", "layer_sparsity.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    erk = plots.layer_sparsities(c.model, (8, 8, 1), 0.9, "erk")
    uniform = plots.layer_sparsities(c.model, (8, 8, 1), 0.9, "uniform")
    assert all(v == pytest.approx(0.9, abs=1e-2) for v in uniform.values())
    assert erk["Dense_2/kernel"] < 0.9 < erk["Dense_0/kernel"]


def test_sweep_errors(tmp_path):
    from experiments import plots, sweep

    with pytest.raises(ValueError, match=r"unknown methods \['lottery'\]"):
        sweep.sweep(tiny(), tmp_path, ["lottery"], [0.9], [0])
    with pytest.raises(ValueError, match="is not of the form key=value"):
        sweep.apply_overrides(tiny(), ["epochs"])
    with pytest.raises(ValueError, match="the config has no field 'epoch'"):
        sweep.apply_overrides(tiny(), ["epoch=3"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no final records"):
        plots.plot_sweep(tmp_path / "empty.jsonl", tmp_path)


@pytest.mark.slow
def test_loop_overhead_benchmark_prints_a_table(capsys):
    from experiments.benchmarks import loop_overhead

    overheads = loop_overhead.main(["--steps", "3", "--repeats", "1", "--only", "dense"])
    assert len(overheads) == 1
    printed = capsys.readouterr().out
    assert "bare ms/step" in printed and "digits lenet300 b128 dense" in printed
    row = next(line for line in printed.splitlines() if line.startswith("digits lenet300"))
    assert "host / loop" in printed and row.split()[-2:] == ["-", "-"]  # dense: one kind


@pytest.mark.slow
def test_topology_benchmark_selections_agree_with_argsort():
    from experiments.benchmarks import topology as bench

    scores = jax.random.normal(jax.random.key(0), (40, 12))
    k = jnp.int32(100)
    np.testing.assert_array_equal(jaxsparse.topology.top_k_mask(scores, k),
                                  bench.argsort_top_k(scores, k))
    np.testing.assert_array_equal(jaxsparse.topology.top_k_per_neuron(scores, jnp.int32(7)),
                                  bench.argsort_per_column(scores, jnp.int32(7)))
    times = bench.bench_shape((40, 12), repeats=1)
    assert set(times) >= {"top_k_mask", "argsort", "srigl_layer"}
    assert all(t > 0 for t in times.values())
    pieces = bench.breakdown((64, 48), repeats=1)
    assert set(pieces) >= {"drop selection", "grow selection, tie", "dense SGD-momentum step"}
    assert all(t > 0 for t in pieces.values())


def test_cli_rejects_extra_arguments():
    with pytest.raises(ValueError, match=r"unexpected arguments: \['extra'\]"):
        train_lib.main(["experiments.train", "extra"])


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("algorithm", ["nm_pruning",
                                       pytest.param("nm_rigl", marks=pytest.mark.slow)])
def test_nm_methods_train_to_n_of_m(algorithm, digits):
    c = tiny(algorithm=algorithm, update_every=5, end_fraction=0.5,
             algorithm_kwargs={"n": 1, "m": 4})
    out = train_lib.train(c, None, dataset=digits)
    for m in jaxsparse.masks.mask_leaves(jaxsparse.get_masks(out["state"].opt_state)):
        if m is not None:
            groups = np.asarray(m).T.reshape(-1, 4) if m.shape[0] % 4 == 0 else None
            assert groups is not None and (groups.sum(-1) == 1).all()


def test_snfs_keeps_its_own_drop_fraction_unless_the_config_sets_one(monkeypatch):
    calls = []

    def fake(inner, sparsity, **kwargs):
        calls.append(kwargs)
        return inner

    monkeypatch.setattr(jaxsparse, "snfs", fake)
    monkeypatch.setattr(jaxsparse, "rigl", fake)
    registry = train_lib.algorithm_registry()
    registry["snfs"](optax.sgd(0.1), tiny(algorithm="snfs"), jax.random.key(0), 100)
    assert "drop_fraction" not in calls[-1]  # jaxsparse.snfs's default 0.5 applies
    import inspect
    assert inspect.signature(jaxsparse.algorithms.dst.snfs).parameters[
        "drop_fraction"].default == 0.5
    registry["snfs"](optax.sgd(0.1), tiny(algorithm="snfs", drop_fraction=0.3),
                     jax.random.key(0), 100)
    assert calls[-1]["drop_fraction"] == 0.3
    registry["rigl"](optax.sgd(0.1), tiny(), jax.random.key(0), 100)
    assert "drop_fraction" not in calls[-1]


def test_sparse_learning_replica_config():
    from experiments.configs import mnist_lenet300_sparse_learning as sl
    c = sl.get_config()
    assert (c.validation_size, c.distribution, c.update_every, c.drop_fraction,
            c.end_fraction, c.weight_decay, c.nesterov, c.batch_size, c.epochs) == (
        6000, "uniform", 540, 0.5, 1.0, 5e-4, True, 100, 100)
    schedule = train_lib.learning_rate_schedule(c, 540 * 100)
    np.testing.assert_allclose(
        [float(schedule(t)) for t in (0, 24999, 25000, 49999, 50000, 53999)],
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)


def test_tensorboard_defaults_to_whether_tensorboardx_is_installed(monkeypatch):
    import importlib.util

    from experiments.configs import base
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    assert base.get_config().tensorboard is False
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert base.get_config().tensorboard is True  # tensorboardX is a test dependency


# ----------------------------------------------------------------------------- resume


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits):
    """A finished 5-step run (trained once for the module)."""
    workdir = tmp_path_factory.mktemp("finished")
    train_lib.train(tiny(num_steps=5), workdir, dataset=digits)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("field, value", [("algorithm", "set"), ("sparsity", 0.8),
                                          ("batch_size", 16), ("seed", 3),
                                          ("model.hidden", (8, 8))])
def test_resume_refuses_a_changed_config_listing_the_keys(tmp_path, finished_run, digits,
                                                        field, value):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    before = _files(tmp_path)
    c = tiny(num_steps=5)
    if field == "model.hidden":
        c.model.hidden = value
    else:
        setattr(c, field, value)
    with pytest.raises(train_lib.ConfigChangedError,
                       match=rf"config.json was started with another config; differing keys: "
                             rf"{field}: "):
        train_lib.train(c, tmp_path, resume=True, dataset=digits)
    assert _files(tmp_path) == before  # nothing on disk changed


@pytest.mark.slow
def test_resume_may_extend_a_run_when_allowed(tmp_path, digits):
    train_lib.train(tiny(num_steps=5), tmp_path, dataset=digits)
    with pytest.raises(train_lib.ConfigChangedError,
                       match=r"num_steps: 5 -> 8.*--allow_changes=num_steps"):
        train_lib.train(tiny(num_steps=8), tmp_path, resume=True, dataset=digits)
    # Bookkeeping fields may always change.
    out = train_lib.train(tiny(num_steps=8, log_every=3), tmp_path, resume=True,
                          dataset=digits, allow_changes=["num_steps"])
    assert out["steps_run"] == 3 and int(out["state"].step) == 8
    with pytest.raises(ValueError, match=r"allow_changes=\['seed'\] cannot change on resume"):
        train_lib.train(tiny(num_steps=8), tmp_path, resume=True, dataset=digits,
                        allow_changes=["seed"])


@pytest.mark.slow
def test_sweep_resumes_an_unfinished_run(tmp_path):
    from experiments import sweep

    c = tiny(num_steps=10, checkpoint_every=4)
    # An interrupted sweep: the run checkpointed at steps 4 and 8, then was killed (its last
    # checkpoint is removed to stand for that), and no record was written.
    workdir = tmp_path / "runs" / sweep.run_name("rigl", 0.8, 0)
    c_run = c.copy_and_resolve_references()
    c_run.algorithm, c_run.sparsity, c_run.seed = "rigl", 0.8, 0
    # The sweep loads its data from the config (with its validation split): so does the
    # reference, or the two runs would see different training sets.
    reference = train_lib.train(c_run, workdir, dataset=train_lib.load_data(c_run))
    shutil.rmtree(workdir / "checkpoints" / "10")
    logs = []
    records = sweep.sweep(c, tmp_path, ["rigl"], [0.8], [0], log=logs.append)
    assert "resuming it" in logs[0]
    assert records[0]["steps_run"] == 2 and records[0]["steps"] == 10
    assert records[0]["test_accuracy"] == reference["test_accuracy"]
