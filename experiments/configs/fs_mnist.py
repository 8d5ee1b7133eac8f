"""QuickSelection on MNIST: SET-trained sparse denoising autoencoder (784-1000-784, 97% ER,
3 epochs of Adam: the paper trains 100 epochs of SGD),
input-neuron strength, top K = 50 / 100, ExtraTrees accuracy vs all / variance / random.

Run:  python -m experiments.feature_selection --config=experiments/configs/fs_mnist.py \
          --out=results/fs_mnist
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Fields of experiments.feature_selection.FSConfig.
    c.dataset = "mnist"
    c.data_dir = "../shared/data/mnist"
    c.hidden = 1000
    c.sparsity = 0.97
    c.distribution = "er"
    c.epochs = 3
    c.batch_size = 100
    c.learning_rate = 1e-3
    c.noise = 0.2
    c.update_every = 100
    c.drop_fraction = 0.2
    c.ks = (50, 100)
    c.seeds = (0, 1, 2)
    c.n_estimators = 50
    c.classifier_train_size = 20_000  # ExtraTrees on the first 20k training images
    return c
