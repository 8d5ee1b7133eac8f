"""Class-incremental split-digits (8x8, no download), MLP 64-64-64-10: for tests."""

from experiments.configs import cl_split_mnist


def get_config():
    c = cl_split_mnist.get_config()
    c.dataset = "digits"
    c.data_dir = ""
    c.hidden = (64, 64)
    c.steps_per_task = 150
    c.batch_size = 32
    c.learning_rate = 3e-3
    c.sparsity = 0.7
    c.update_every = 30
    c.neurons_per_task = 12
    c.seeds = (0,)
    return c
