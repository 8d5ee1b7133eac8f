"""QuickSelection on Fashion-MNIST (same setup as fs_mnist.py).

Run:  python -m experiments.feature_selection --config=experiments/configs/fs_fashion_mnist.py \
          --out=results/fs_fashion_mnist
"""

from experiments.configs import fs_mnist


def get_config():
    c = fs_mnist.get_config()
    c.dataset = "fashion_mnist"
    c.data_dir = "../shared/data/fashion_mnist"
    return c
