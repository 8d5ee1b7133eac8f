"""jaxsparse: sparse neural network training for JAX.

(``jaxsparse.checkpoint``, Orbax sharded checkpoints, is imported on its own: it needs the
``checkpoint`` extra.)

Any optax optimizer becomes a sparse one with one wrapper::

    tx = jaxsparse.rigl(optax.adamw(1e-3), sparsity=0.9, end_step=7500, key=jax.random.key(0))
    params, state = jaxsparse.init_masked(tx, params)  # masked params, optimizer state
    updates, state = tx.update(grads, state, params)   # inside your jitted step
    params = optax.apply_updates(params, updates)      # exactly sparse after every step
"""

from jaxsparse import (
    bitmask,
    condensed,
    distributions,
    features,
    freeze,
    lottery,
    masks,
    metrics,
    nn,
    oneshot,
    pruning_at_init,
    schedules,
    sharding,
    topology,
)
from jaxsparse.algorithms.common import LayerInputs, layerwise, map_layers, random_init
from jaxsparse.algorithms.dst import drop_and_grow, rigl, snfs, static
from jaxsparse.algorithms.dst import set_ as set  # noqa: A001  (the paper's name)
from jaxsparse.algorithms.granet import granet, granet_targets
from jaxsparse.algorithms.pruning import magnitude_pruning, pruning_targets, random_pruning
from jaxsparse.algorithms.structured import nm_pruning, nm_rigl, srigl, srigl_layer
from jaxsparse.condensed import (
    CondensedFileError,
    CondensedLinear,
    SparseLinear,
    condense,
    condense_layer,
    condense_mlp,
    condensed_dense,
    load_condensed,
    mlp_apply,
    save_condensed,
    sparse_dense,
    sparse_linear,
)
from jaxsparse.distributions import LayerSpec, layer_budgets, layer_specs
from jaxsparse.lottery import ImpResult, imp, rewind, scratch_b, scratch_e
from jaxsparse.masks import (
    apply_masks,
    count_active,
    count_nonzero,
    default_prunable,
    map_masked,
    ones_masks,
    sparse_init,
    validate_masks,
    validate_prunable_masks,
)
from jaxsparse.metrics import (
    format_structure_table,
    format_table,
    itop_rate,
    sparsity_table,
    structure_table,
)
from jaxsparse.nn import l0_masks, penalty_schedule, vd_masks
from jaxsparse.pruning_at_init import (
    fixed_masks,
    grasp_scores,
    one_shot_masks,
    snip_scores,
    synflow_masks,
    synflow_scores,
)
from jaxsparse.schedules import inject_hyperparams
from jaxsparse.transform import (
    SparseState,
    SparsityRule,
    UpdateInputs,
    check_sparse,
    get_ever_active,
    get_masks,
    get_sparse_state,
    init_masked,
    reset_moments,
    sparse_transform,
    topology_due,
)

__version__ = "0.1.0"

__all__ = [
    "CondensedFileError",
    "bitmask",
    "features",
    "freeze",
    "init_masked",
    "inject_hyperparams",
    "load_condensed",
    "map_layers",
    "oneshot",
    "save_condensed",
    "sharding",
    "validate_prunable_masks",
    "CondensedLinear",
    "ImpResult",
    "SparseLinear",
    "condense",
    "condense_layer",
    "condense_mlp",
    "condensed",
    "condensed_dense",
    "fixed_masks",
    "grasp_scores",
    "imp",
    "l0_masks",
    "lottery",
    "mlp_apply",
    "nn",
    "one_shot_masks",
    "penalty_schedule",
    "pruning_at_init",
    "rewind",
    "scratch_b",
    "scratch_e",
    "snip_scores",
    "sparse_dense",
    "sparse_linear",
    "synflow_masks",
    "synflow_scores",
    "vd_masks",
    "granet",
    "granet_targets",
    "nm_pruning",
    "nm_rigl",
    "srigl",
    "srigl_layer",
    "format_structure_table",
    "structure_table",
    "LayerInputs",
    "LayerSpec",
    "SparseState",
    "SparsityRule",
    "UpdateInputs",
    "apply_masks",
    "count_active",
    "count_nonzero",
    "check_sparse",
    "default_prunable",
    "distributions",
    "drop_and_grow",
    "format_table",
    "get_ever_active",
    "get_masks",
    "get_sparse_state",
    "itop_rate",
    "layer_budgets",
    "layer_specs",
    "layerwise",
    "magnitude_pruning",
    "map_masked",
    "masks",
    "metrics",
    "ones_masks",
    "sparse_init",
    "pruning_targets",
    "random_init",
    "random_pruning",
    "reset_moments",
    "rigl",
    "schedules",
    "set",
    "snfs",
    "sparse_transform",
    "sparsity_table",
    "static",
    "topology",
    "topology_due",
    "validate_masks",
    "__version__",
]
