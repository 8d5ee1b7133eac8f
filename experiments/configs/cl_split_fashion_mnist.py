"""Class-incremental split-Fashion-MNIST (same setup as cl_split_mnist.py).

Run:  python -m experiments.continual --config=experiments/configs/cl_split_fashion_mnist.py \
          --out=results/cl_split_fashion_mnist
"""

from experiments.configs import cl_split_mnist


def get_config():
    c = cl_split_mnist.get_config()
    c.dataset = "fashion_mnist"
    c.data_dir = "../shared/data/fashion_mnist"
    return c
