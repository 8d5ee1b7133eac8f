"""Flax layers that learn their own sparsity: sparse variational dropout and L0 gates.

Both come in linen (``VDDense``, ``VDConv``, ``L0Dense``, ``L0Conv``) and NNX
(``VDDenseNNX``, ``VDConvNNX``, ``L0DenseNNX``, ``L0ConvNNX``) forms, with their losses
(:func:`kl_divergence`, :func:`l0_penalty`), a penalty-weight ramp
(:func:`penalty_schedule`) and mask extraction (:func:`vd_masks`, :func:`l0_masks`) into
jaxsparse mask trees.
"""

from jaxsparse.nn import l0, variational_dropout
from jaxsparse.nn._common import penalty_schedule
from jaxsparse.nn.l0 import (
    L0Conv,
    L0ConvNNX,
    L0Dense,
    L0DenseNNX,
    deterministic_gate,
    expected_l0,
    l0_penalty,
    sample_gate,
)
from jaxsparse.nn.l0 import to_masks as l0_masks
from jaxsparse.nn.variational_dropout import (
    VDConv,
    VDConvNNX,
    VDDense,
    VDDenseNNX,
    kl_approx,
    kl_divergence,
    log_alpha,
)
from jaxsparse.nn.variational_dropout import to_masks as vd_masks

__all__ = [
    "L0Conv",
    "L0ConvNNX",
    "L0Dense",
    "L0DenseNNX",
    "VDConv",
    "VDConvNNX",
    "VDDense",
    "VDDenseNNX",
    "deterministic_gate",
    "expected_l0",
    "kl_approx",
    "kl_divergence",
    "l0",
    "l0_masks",
    "l0_penalty",
    "log_alpha",
    "penalty_schedule",
    "sample_gate",
    "variational_dropout",
    "vd_masks",
]
