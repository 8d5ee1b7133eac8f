"""One-shot (post-training) pruning: magnitude, Wanda and SparseGPT on trained Flax models."""

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

__all__ = [
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
