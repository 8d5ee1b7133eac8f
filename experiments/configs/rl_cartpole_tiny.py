"""A minute-scale DQN CartPole run (64x64 MLP, 16k env steps) for tests and smoke runs."""

from experiments.configs import rl_cartpole


def get_config():
    c = rl_cartpole.get_config()
    c.hidden = (64, 64)
    c.total_steps = 16_000
    c.num_envs = 4
    c.buffer_size = 16_000
    c.batch_size = 64
    c.eps_fraction = 0.25
    c.loss = "huber"
    c.target_update_every = 100
    c.update_every = 200
    c.num_logs = 8
    c.eval_envs = 16
    c.algorithms = ("rigl",)
    c.sparsities = (0.8,)
    c.seeds = (0, 1)
    return c
