"""DQN with a sparse Q-network on gymnax CartPole: a tiny run learns, records and errors."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("gymnax")

from experiments.configs import rl_cartpole_tiny  # noqa: E402
from experiments.rl import dqn, run, tune  # noqa: E402
from experiments.sweep import load_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_records():
    c = rl_cartpole_tiny.get_config()
    cfg = run.dqn_config(c, "rigl", 0.8)
    return cfg, run.run_setting(cfg, seeds=(0, 1))


@pytest.fixture(scope="module")
def random_return():
    return float(dqn.random_policy_return("CartPole-v1", jax.random.key(0), 256))


@pytest.mark.slow
def test_random_policy_is_weak(random_return):
    # CartPole's uniform random policy lasts ~22 steps.
    assert 10.0 < random_return < 40.0


@pytest.mark.slow
def test_sparse_dqn_beats_random_policy(tiny_records, random_return):
    cfg, records = tiny_records
    finals = [r for r in records if r["event"] == "final"]
    assert [r["seed"] for r in finals] == [0, 1]
    returns = np.array([r["final_return"] for r in finals])
    # Both seeds' greedy policies beat the random policy by a wide margin.
    assert np.all(returns > random_return + 50.0), (returns, random_return)
    for r in finals:
        assert r["sparsity"] == pytest.approx(0.8, abs=0.01)
        assert r["gradient_steps"] == dqn.train_iterations(cfg)
        assert r["env_steps"] == (dqn.warmup_iterations(cfg) + r["gradient_steps"]) * cfg.num_envs
        assert json.loads(r["config"])["algorithm"] == "rigl"


@pytest.mark.slow
def test_training_return_rises(tiny_records):
    _, records = tiny_records
    for r in (r for r in records if r["event"] == "curve"):
        curve = np.array([np.nan if v is None else v for v in r["train_return"]])
        assert len(curve) == rl_cartpole_tiny.get_config().num_logs
        assert np.nanmean(curve[-2:]) > 2 * np.nanmean(curve[:2]), curve
        assert all(np.isfinite(r["td_loss"]))


@pytest.mark.slow
def test_seeds_differ(tiny_records):
    _, records = tiny_records
    curves = [r["train_return"] for r in records if r["event"] == "curve"]
    assert curves[0] != curves[1]


@pytest.mark.slow
def test_table_and_plot(tiny_records, tmp_path):
    _, records = tiny_records
    table = run.summary_table(records)
    assert "| rigl |" in table and "(n=2)" in table and "80%" in table
    out = run.plot_returns(records, tmp_path / "returns.png", "CartPole-v1")
    assert out.stat().st_size > 1000


def test_settings_run_dense_once():
    assert run.settings(("dense", "set"), (0.8, 0.9)) == [
        ("dense", 0.0), ("set", 0.8), ("set", 0.9)]


def test_unknown_env_name():
    with pytest.raises(ValueError, match="'CartPoleX-v1'.*not a gymnax environment"):
        dqn.make_env("CartPoleX-v1")


@pytest.mark.parametrize("field, value, message", [
    ("algorithm", "snip", "unknown algorithm 'snip'"),
    ("buffer_size", 1001, "buffer_size=1001 must be a multiple of num_envs=4"),
    ("learning_starts", 10, "learning_starts=10 must be >= batch_size=64"),
    ("total_steps", 1100, "total_steps=1100 leaves 0 learning iterations, fewer than num_logs=50"),
])
def test_bad_config(field, value, message):
    cfg = dqn.DQNConfig(num_envs=4)._replace(**{field: value})
    with pytest.raises(ValueError, match=message):
        dqn.check_config(cfg)


def test_unknown_algorithm_on_command_line(tmp_path):
    with pytest.raises(ValueError, match="--algorithms: unknown algorithm 'ppo'"):
        run.main(["--config=experiments/configs/rl_cartpole_tiny.py", f"--out={tmp_path}",
                  "--algorithms=ppo"])


def test_tune_refuses_reported_seeds(tmp_path):
    # Hyperparameters are chosen on seeds the sweep does not report.
    with pytest.raises(ValueError, match=r"overlap the reported seeds \[0, 1\]"):
        tune.main(["--config=experiments/configs/rl_cartpole_tiny.py", f"--out={tmp_path}",
                   "--seeds=1,100"])


def test_tune_overrides():
    c = load_config("experiments/configs/rl_cartpole_tiny.py")
    assert tune.dqn_overrides(c, ["learning_rate=5e-4", "hidden=[64, 64]"]) == {
        "learning_rate": 5e-4, "hidden": (64, 64)}
    assert run.dqn_config(c, "dense", 0.0).hidden == (64, 64)
    with pytest.raises(ValueError, match="not a DQNConfig field"):
        tune.dqn_overrides(c, ["lr=1e-3"])


def test_td_loss_huber_and_mse():
    def q_fn(params, obs):
        return obs * params

    obs = np.array([[1.0, 2.0], [3.0, 0.0]], np.float32)
    batch = (obs, np.array([1, 0]), np.array([1.0, 1.0], np.float32), obs,
             np.array([1.0, 0.0], np.float32))
    # q = [2, 3]; targets: terminal 1 -> 1, else 1 + 0.5 * max(3, 0) = 2.5; errors 1, 0.5.
    mse = dqn.td_loss(q_fn, 1.0, 1.0, batch, 0.5, "mse")
    huber = dqn.td_loss(q_fn, 1.0, 1.0, batch, 0.5, "huber")
    assert float(mse) == pytest.approx((0.5 * 1.0 + 0.5 * 0.25) / 2)
    assert float(huber) == pytest.approx((0.5 * 1.0 + 0.5 * 0.25) / 2)  # |error| <= 1
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        dqn.check_config(dqn.DQNConfig(loss="l1"))
