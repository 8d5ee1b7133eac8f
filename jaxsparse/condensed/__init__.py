"""Condensed inference for constant fan-in sparse layers (SRigL, Lasby et al. 2024).

Export (host): :func:`condense` (a whole params tree), :func:`condense_layer`,
:func:`structure_layer`, :func:`sparse_linear`, :func:`condense_mlp` (model level: ablated
neurons folded into the next layer). Forward: :func:`condensed_dense` (C++ FFI kernel on
CPU, Pallas on Mosaic GPU / Triton / TPU, XLA elsewhere; :func:`choose_impl`),
:func:`sparse_dense` (per-batch dispatch), :func:`mlp_apply`. Reference:
:func:`condensed_matmul_reference`. Flax: :mod:`jaxsparse.condensed.layers`. Files:
:func:`save_condensed` / :func:`load_condensed` (npz + JSON, no pickle, validated).
Training on the condensed form (:mod:`jaxsparse.condensed.training`): :func:`condense_params`
/ :func:`expand_params`, :func:`condensed_linear` (custom VJP; C++ CPU kernels),
:class:`CondensedTrainDense`, :func:`srigl_condensed` (SRigL on values and indices; neuron
ablation on the padded layout of :func:`pad_condensed`; growth from each layer's
:class:`GrowthInputs`, :func:`growth_inputs`, in blocks of neurons).
"""

from jaxsparse.condensed.dispatch import (
    CostModel,
    Platform,
    SparseLinear,
    choose_form,
    choose_impl,
    condensed_dense,
    detect_platform,
    sparse_dense,
    sparse_dense_full,
    sparse_linear,
    structured_dense,
)
from jaxsparse.condensed.export import (
    CondensedLinear,
    StructuredLinear,
    condense,
    condense_layer,
    expand,
    index_dtype,
    structure_layer,
    to_dense,
    validate_condensed,
)
from jaxsparse.condensed.io import CondensedFileError, load_condensed, save_condensed
from jaxsparse.condensed.model import CondensedMLP, condense_mlp, dense_mlp_apply, mlp_apply
from jaxsparse.condensed.reference import (
    condensed_matmul_reference,
    structured_matmul_reference,
)
from jaxsparse.condensed.training import (
    CondensedTrainDense,
    GrowthInputs,
    condense_params,
    condensed_linear,
    constant_fan,
    expand_params,
    growth_inputs,
    pad_condensed,
    srigl_condensed,
)

__all__ = [
    "CondensedTrainDense",
    "GrowthInputs",
    "condense_params",
    "condensed_linear",
    "constant_fan",
    "expand_params",
    "growth_inputs",
    "pad_condensed",
    "srigl_condensed",
    "CondensedFileError",
    "CondensedLinear",
    "CondensedMLP",
    "CostModel",
    "Platform",
    "SparseLinear",
    "StructuredLinear",
    "choose_form",
    "choose_impl",
    "condense",
    "condense_layer",
    "condense_mlp",
    "condensed_dense",
    "condensed_matmul_reference",
    "dense_mlp_apply",
    "detect_platform",
    "expand",
    "index_dtype",
    "load_condensed",
    "mlp_apply",
    "save_condensed",
    "sparse_dense",
    "sparse_dense_full",
    "sparse_linear",
    "structure_layer",
    "structured_dense",
    "structured_matmul_reference",
    "to_dense",
    "validate_condensed",
]
