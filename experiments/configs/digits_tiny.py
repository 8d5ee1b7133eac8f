"""A few steps on digits with a small MLP: for tests (checkpoint/resume) and smoke runs."""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.validation_size = 0.1  # 10% of the training images
    c.model.hidden = (32, 16)
    c.batch_size = 32
    c.num_steps = 60
    c.update_every = 10
    c.log_every = 10
    c.checkpoint_every = 20
    c.progress = False
    return c
