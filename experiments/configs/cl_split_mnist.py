"""Class-incremental split-MNIST (5 tasks x 2 classes): SpaceNet-style sparse subnetworks
(RigL at 90% per task, 80 reserved neurons per hidden layer per task) vs dense fine-tuning and
dense joint training, MLP 784-400-400-10, 600 Adam steps of 64 images per task, 3 seeds.

Run:  python -m experiments.continual --config=experiments/configs/cl_split_mnist.py \
          --out=results/cl_split_mnist
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Fields of experiments.continual.CLConfig.
    c.dataset = "mnist"
    c.data_dir = "../shared/data/mnist"
    c.tasks = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    c.hidden = (400, 400)
    c.steps_per_task = 600
    c.batch_size = 64
    c.learning_rate = 1e-3
    c.sparsity = 0.9
    c.algorithm = "rigl"
    c.update_every = 100
    c.drop_fraction = 0.3
    c.neurons_per_task = 80
    c.methods = ("finetune", "spacenet", "joint")
    c.seeds = (0, 1, 2)
    return c
