"""One-shot (post-training) pruning: magnitude, Wanda and SparseGPT on trained Flax models.

  >>> result = jaxsparse.oneshot.prune(model, variables, calibration_batches,
  ...                                  method="sparsegpt", sparsity=0.5)   # or nm=(2, 4)
  >>> result.params, result.masks     # pruned params and a Masks tree (None = dense leaf)

Per-layer functions (``magnitude_layer``, ``wanda_layer``, ``sparsegpt_layer``) work on one
(d_in, d_out) kernel; ``calibrate`` holds the linen / NNX input recording.
"""

from jaxsparse.oneshot import calibrate, methods
from jaxsparse.oneshot.methods import (
    InputStats,
    LayerResult,
    add_stats,
    input_stats,
    kept_per_neuron,
    magnitude_layer,
    sparsegpt_factor,
    sparsegpt_layer,
    wanda_layer,
    wanda_scores,
)
from jaxsparse.oneshot.pipeline import METHODS, OneShotResult, prune

__all__ = [
    "METHODS",
    "OneShotResult",
    "calibrate",
    "methods",
    "prune",
    "InputStats",
    "LayerResult",
    "add_stats",
    "input_stats",
    "kept_per_neuron",
    "magnitude_layer",
    "sparsegpt_factor",
    "sparsegpt_layer",
    "wanda_layer",
    "wanda_scores",
]
