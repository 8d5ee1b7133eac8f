"""ViT-tiny with MLP blocks (patch 4) on MNIST-sized inputs, AdamW, RigL/ERK at 90%.

Use --config.dataset=cifar10 for 32x32 inputs (patch 4 gives 8x8 tokens)."""

from experiments.configs import base
from experiments.models import model_config


def get_config():
    c = base.get_config()
    c.dataset = "mnist"
    c.validation_size = 6000  # 54k/6k
    c.model = model_config("vit")
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.weight_decay = 1e-4
    c.warmup_steps = 200
    c.epochs = 10
    c.log_every = 100
    c.checkpoint_every = 2000
    return c
