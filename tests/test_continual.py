"""Class-incremental split-digits: SpaceNet-style sparse subnetworks vs fine-tuning vs joint."""

import json

import numpy as np
import pytest

from experiments import continual as cl
from experiments import data as data_lib
from experiments.configs import cl_digits_tiny


@pytest.fixture(scope="module")
def records():
    return {r["method"]: r for r in cl.run(cl.cl_config(cl_digits_tiny.get_config()))}


@pytest.mark.slow
def test_joint_upper_bound_learns(records):
    assert records["joint"]["avg_accuracy"] > 0.9


@pytest.mark.slow
def test_finetune_forgets_catastrophically(records):
    r = np.array(records["finetune"]["accuracy_matrix"], float)
    assert np.all(np.diag(r) > 0.9)  # each task is learned ...
    assert records["finetune"]["avg_forgetting"] > 0.8  # ... and forgotten
    assert records["finetune"]["avg_accuracy"] < 0.3


@pytest.mark.slow
def test_spacenet_learns_each_task_and_forgets_less(records):
    sn, ft = records["spacenet"], records["finetune"]
    r = np.array(sn["accuracy_matrix"], float)
    assert r[0, 0] > 0.9 and r[1, 1] > 0.8
    assert sn["avg_accuracy"] > ft["avg_accuracy"] + 0.1
    assert sn["avg_forgetting"] < ft["avg_forgetting"] - 0.1
    # Every task reserved its neurons; the frozen weights are a fraction of the network.
    assert sn["reserved_neurons"] == [60, 60, 10]
    assert 0.0 < sn["frozen_fraction"] < 1.0


def test_forgetting_definition():
    r = np.array([[0.9, np.nan, np.nan], [0.5, 0.8, np.nan], [0.6, 0.2, 0.7]])
    np.testing.assert_allclose(cl.forgetting(r), [0.3, 0.6])


@pytest.mark.slow
def test_table_and_plot(records, tmp_path):
    table = cl.summary_table(list(records.values()))
    for m in ("finetune", "spacenet", "joint"):
        assert f"| {m} | 1 |" in table
    assert "forget T4" in table
    assert cl.plot_accuracy(list(records.values()), tmp_path / "a.png").stat().st_size > 1000


@pytest.mark.parametrize("tasks, message", [
    (((0, 1), ()), "task 1 has no classes"),
    (((0, 1), (11, 12)), r"task 1 \(classes \(11, 12\)\) has 0 training"),
    (((0, 1), (1, 2)), "class 1 is in task 0 and task 1"),
])
def test_bad_task_split(tasks, message):
    ds = data_lib.load_dataset("digits")
    with pytest.raises(ValueError, match=message):
        cl.split_tasks(ds, tasks)


def test_unknown_method():
    cfg = cl.cl_config(cl_digits_tiny.get_config())._replace(methods=("ewc",))
    with pytest.raises(ValueError, match="methods: unknown method 'ewc'"):
        cl.check_config(cfg)


def test_reserve_takes_neurons_per_task_free_neurons_per_task():
    # 3 tasks x 4 neurons on 10 hidden units: 4, 8, then the 2 left; never a reserved one twice.
    rng = np.random.default_rng(0)
    sizes = (6, 10, 10, 6)
    shapes = [(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
    fixed = {f"dense{i}": {"kernel": np.zeros(s, np.float32)} for i, s in enumerate(shapes)}
    frozen = {f"dense{i}": {"kernel": np.zeros(s, bool)} for i, s in enumerate(shapes)}
    reserved = [np.zeros(b, bool) for b in sizes[1:]]
    counts = []
    for t in range(3):
        delta = {f"dense{i}": {"kernel": rng.normal(size=s).astype(np.float32)}
                 for i, s in enumerate(shapes)}
        before = [m.copy() for m in reserved]
        fixed, frozen, reserved = cl.reserve(fixed, frozen, delta, reserved, (2 * t, 2 * t + 1),
                                             neurons_per_task=4)
        counts.append([int(m.sum()) for m in reserved])
        for old, new in zip(before, reserved):
            assert np.all(new[old])  # reserved neurons stay reserved
        for i, m in enumerate(reserved):
            # Exactly the reserved neurons' incoming weights are frozen.
            np.testing.assert_array_equal(frozen[f"dense{i}"]["kernel"],
                                          np.broadcast_to(m, shapes[i]))
    assert counts == [[4, 4, 2], [8, 8, 4], [10, 10, 6]]


def test_resume_key_is_the_setting_without_the_sweep_fields():
    cfg = cl.cl_config(cl_digits_tiny.get_config())
    rec_config = json.loads(json.dumps(cfg._asdict(), default=list))  # as records store it
    assert cl.setting(rec_config) == cl.setting(cfg._replace(seeds=(7,), methods=("joint",)))
    assert cl.setting(rec_config) != cl.setting(cfg._replace(neurons_per_task=3))
