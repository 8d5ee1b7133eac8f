"""QuickSelection on scikit-learn's 8x8 digits (64 features, no download): for tests."""

from experiments.configs import fs_mnist


def get_config():
    c = fs_mnist.get_config()
    c.dataset = "digits"
    c.data_dir = ""
    c.hidden = 64
    c.sparsity = 0.8
    c.epochs = 30
    c.batch_size = 32
    c.learning_rate = 3e-3
    c.update_every = 20
    c.ks = (10,)
    c.seeds = (0,)
    c.n_estimators = 30
    return c
