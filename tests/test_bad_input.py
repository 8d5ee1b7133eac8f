"""Bad input to the public API: one table, each row a call that must be refused with the
given error type and a message naming the offending argument or leaf.

Every row fails before any training step or compilation of a train step, so the whole
matrix runs in a few seconds. A row is ``(id, call, error type, regex)``; ``call`` receives
the shared tiny params (``dense0``/``dense1`` kernels and biases, a norm scale).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse
from jaxsparse import lottery
from jaxsparse import nn as jnn
from jaxsparse import pruning_at_init as pai
from jaxsparse.distributions import LayerSpec, layer_budgets
from tests.helpers import tiny_params

KEY = jax.random.key(0)
SGD = optax.sgd(0.1)


def _with(params, **leaves):
    """``params`` with extra top-level layers ``{name: {"kernel": array}}``."""
    return {**params, **{name: {"kernel": x} for name, x in leaves.items()}}


def _masks_with(params, path, value):
    masks = jaxsparse.ones_masks(params)
    layer, leaf = path.split("/")
    masks[layer][leaf] = value
    return masks


def _mlp(p, x):
    return x @ p["dense0"]["kernel"]


# fmt: off
CASES = [
    # --- factory arguments (checked when the factory is called) ---
    ("static-sparsity-1", lambda p: jaxsparse.static(SGD, 1.0, key=KEY),
     ValueError, r"sparsity.*\[0, 1\).*1\.0"),
    ("static-sparsity-str", lambda p: jaxsparse.static(SGD, "high", key=KEY),
     TypeError, r"sparsity.*'high'"),
    ("rigl-sparsity-numeric-string", lambda p: jaxsparse.rigl(SGD, "0.9", key=KEY, end_step=10),
     TypeError, r"sparsity.*'0.9'"),
    ("static-override-bool", lambda p: jaxsparse.static(
        SGD, 0.5, key=KEY, overrides={"dense0": False}).init(p),
     TypeError, r"overrides\['dense0'\] must be a number.*False"),
    ("static-no-key", lambda p: jaxsparse.static(SGD, 0.5, key=None),
     ValueError, r"static needs key"),
    ("set-negative-sparsity", lambda p: jaxsparse.set(SGD, -0.1, key=KEY, end_step=10),
     ValueError, r"sparsity.*\[0, 1\).*-0\.1"),
    ("set-drop-fraction", lambda p: jaxsparse.set(SGD, 0.5, key=KEY, end_step=10,
                                                   drop_fraction=-0.1),
     ValueError, r"drop_fraction.*-0\.1"),
    ("set-end-equals-begin", lambda p: jaxsparse.set(SGD, 0.5, key=KEY, end_step=5,
                                                      begin_step=5),
     ValueError, r"end_step.*5.*begin_step.*5"),
    ("set-update-every-float", lambda p: jaxsparse.set(SGD, 0.5, key=KEY, end_step=10,
                                                        update_every=2.5),
     ValueError, r"update_every.*2\.5"),
    ("rigl-sparsity-nan", lambda p: jaxsparse.rigl(SGD, float("nan"), key=KEY, end_step=10),
     ValueError, r"sparsity.*nan"),
    ("rigl-drop-fraction", lambda p: jaxsparse.rigl(SGD, 0.5, key=KEY, end_step=10,
                                                     drop_fraction=1.5),
     ValueError, r"drop_fraction.*1\.5"),
    ("rigl-decay", lambda p: jaxsparse.rigl(SGD, 0.5, key=KEY, end_step=10,
                                             drop_fraction_decay="linear"),
     ValueError, r"(drop fraction decay|drop_fraction_decay).*'linear'"),
    ("rigl-update-every-0", lambda p: jaxsparse.rigl(SGD, 0.5, key=KEY, end_step=10,
                                                      update_every=0),
     ValueError, r"update_every.*\b0\b"),
    ("rigl-end-before-begin", lambda p: jaxsparse.rigl(SGD, 0.5, key=KEY, end_step=10,
                                                        begin_step=20),
     ValueError, r"end_step.*10.*begin_step.*20"),
    ("rigl-end-step-negative", lambda p: jaxsparse.rigl(SGD, 0.5, key=KEY, end_step=-3),
     ValueError, r"end_step.*-3"),
    ("rigl-no-key", lambda p: jaxsparse.rigl(SGD, 0.5, key=None, end_step=10),
     ValueError, r"rigl needs key"),
    ("snfs-momentum", lambda p: jaxsparse.snfs(SGD, 0.5, key=KEY, end_step=10, momentum=1.0),
     ValueError, r"momentum.*1\.0"),
    ("snfs-no-key", lambda p: jaxsparse.snfs(SGD, 0.5, key=None, end_step=10),
     ValueError, r"snfs needs key"),
    ("srigl-gamma-sal", lambda p: jaxsparse.srigl(SGD, 0.5, key=KEY, end_step=10,
                                                   gamma_sal=1.5),
     ValueError, r"gamma_sal.*1\.5"),
    ("srigl-no-key", lambda p: jaxsparse.srigl(SGD, 0.5, key=None, end_step=10),
     ValueError, r"srigl needs key"),
    ("srigl-end-before-begin", lambda p: jaxsparse.srigl(SGD, 0.5, key=KEY, end_step=3,
                                                          begin_step=4),
     ValueError, r"end_step.*3.*begin_step.*4"),
    ("granet-initial-above-final", lambda p: jaxsparse.granet(SGD, 0.5, key=KEY, end_step=10,
                                                               initial_sparsity=0.8),
     ValueError, r"initial_sparsity.*0\.8.*sparsity.*0\.5"),
    ("granet-prune-end", lambda p: jaxsparse.granet(SGD, 0.5, key=KEY, end_step=10,
                                                     prune_end_step=0),
     ValueError, r"prune_end_step.*0.*begin_step"),
    ("granet-drop-fraction", lambda p: jaxsparse.granet(SGD, 0.5, key=KEY, end_step=10,
                                                         drop_fraction=2.0),
     ValueError, r"drop_fraction.*2\.0"),
    ("granet-no-key", lambda p: jaxsparse.granet(SGD, 0.5, key=None, end_step=10),
     ValueError, r"granet needs key"),
    ("magnitude-ranking", lambda p: jaxsparse.magnitude_pruning(SGD, 0.5, end_step=10,
                                                                 ranking="best"),
     ValueError, r"ranking 'best'"),
    ("magnitude-initial-above-final", lambda p: jaxsparse.magnitude_pruning(
        SGD, 0.5, end_step=10, initial_sparsity=0.7),
     ValueError, r"initial_sparsity.*0\.7.*sparsity.*0\.5"),
    ("magnitude-end-equals-begin", lambda p: jaxsparse.magnitude_pruning(
        SGD, 0.5, end_step=10, begin_step=10),
     ValueError, r"end_step.*10.*begin_step.*10"),
    ("magnitude-sparsity", lambda p: jaxsparse.magnitude_pruning(SGD, 1.5, end_step=10),
     ValueError, r"sparsity.*1\.5"),
    ("random-pruning-no-key", lambda p: jaxsparse.random_pruning(SGD, 0.5, key=None,
                                                                  end_step=10),
     ValueError, r"random_pruning needs key"),
    ("nm-pruning-n-above-m", lambda p: jaxsparse.nm_pruning(SGD, n=4, m=2, end_step=10),
     ValueError, r"N=4, M=2"),
    ("nm-pruning-n-zero", lambda p: jaxsparse.nm_pruning(SGD, n=0, m=4, end_step=10),
     ValueError, r"N=0, M=4"),
    ("nm-rigl-n-above-m", lambda p: jaxsparse.nm_rigl(SGD, n=5, m=4, key=KEY, end_step=10),
     ValueError, r"N=5, M=4"),
    ("nm-rigl-n-float", lambda p: jaxsparse.nm_rigl(SGD, n=2.5, m=4, key=KEY, end_step=10),
     ValueError, r"got N=2.5, M=4"),
    ("nm-rigl-no-key", lambda p: jaxsparse.nm_rigl(SGD, n=2, m=4, key=None, end_step=10),
     ValueError, r"nm_rigl needs key"),
    # --- factory arguments checked against the params (at init) ---
    ("static-unknown-distribution", lambda p: jaxsparse.static(
        SGD, 0.5, key=KEY, distribution="erkk").init(p),
     ValueError, r"distribution 'erkk'"),
    ("random-pruning-unknown-distribution", lambda p: jaxsparse.random_pruning(
        SGD, 0.5, key=KEY, end_step=10, distribution="x").init(p),
     ValueError, r"distribution 'x'"),
    ("set-override-matches-nothing", lambda p: jaxsparse.set(
        SGD, 0.5, key=KEY, end_step=10, overrides={"conv": 0.0}).init(p),
     ValueError, r"override 'conv' matches no prunable leaf"),
    ("static-override-not-a-mapping", lambda p: jaxsparse.static(
        SGD, 0.5, key=KEY, overrides=[("dense0", 0.0)]).init(p),
     TypeError, r"overrides must be a mapping"),
    ("static-override-value", lambda p: jaxsparse.static(
        SGD, 0.5, key=KEY, overrides={"dense0": 1.2}).init(p),
     ValueError, r"overrides\['dense0'\] must be in \[0, 1\), got 1.2"),
    ("rigl-override-bad-regex", lambda p: jaxsparse.rigl(
        SGD, 0.5, key=KEY, end_step=10, overrides={"dense0[": 0.2}).init(p),
     ValueError, r"overrides pattern 'dense0\[' is not a valid regex"),
    ("rigl-override-key-not-str", lambda p: jaxsparse.rigl(
        SGD, 0.5, key=KEY, end_step=10, overrides={0: 0.2}).init(p),
     TypeError, r"overrides keys must be path regex strings, got 0"),
    ("erk-overrides-exceed-budget", lambda p: jaxsparse.static(
        SGD, 0.9, key=KEY, overrides={"dense0": 0.0}).init(p),
     ValueError, r"overrides \{'dense0/kernel': 0.0\} need 320 active weights"),
    ("static-layer-keeps-nothing", lambda p: jaxsparse.static(
        SGD, 0.999, key=KEY, distribution="uniform").init(p),
     ValueError, r"layer 'dense0/kernel'.*would keep no weights"),
    ("static-prunable-bad-regex", lambda p: jaxsparse.static(
        SGD, 0.5, key=KEY, prunable="dense0[").init(p),
     ValueError, r"prunable pattern 'dense0\[' is not a valid regex"),
    ("static-prunable-int", lambda p: jaxsparse.static(SGD, 0.5, key=KEY, prunable=3).init(p),
     TypeError, r"prunable must be a predicate.*got 3"),
    ("rigl-prunable-selects-int8", lambda p: jaxsparse.rigl(
        SGD, 0.5, key=KEY, end_step=10, prunable="kernel").init(
            _with(p, quant=jnp.ones((4, 4), jnp.int8))),
     TypeError, r"leaf 'quant/kernel' of dtype int8"),
    ("nm-pruning-m-does-not-divide", lambda p: jaxsparse.nm_pruning(
        SGD, n=2, m=3, end_step=10).init(p),
     ValueError, r"'dense0/kernel'.*20.*M=3"),
    ("nm-rigl-m-does-not-divide", lambda p: jaxsparse.nm_rigl(
        SGD, n=2, m=3, key=KEY, end_step=10).init(p),
     ValueError, r"'dense0/kernel'.*M=3"),
    # --- zero-size and scalar prunable leaves, through every budget path ---
    ("static-erk-zero-input-features", lambda p: jaxsparse.static(
        SGD, 0.5, key=KEY).init(_with(p, empty=jnp.ones((0, 8)))),
     ValueError, r"'empty/kernel' has shape \(0, 8\) \(0 input features\).*prunable="),
    ("set-uniform-zero-output-features", lambda p: jaxsparse.set(
        SGD, 0.5, key=KEY, end_step=10, distribution="uniform").init(
            _with(p, empty=jnp.ones((8, 0)))),
     ValueError, r"'empty/kernel' has shape \(8, 0\) \(0 output features\)"),
    ("magnitude-zero-size-conv", lambda p: jaxsparse.magnitude_pruning(
        SGD, 0.5, end_step=10).init(_with(p, conv=jnp.ones((3, 3, 0, 4)))),
     ValueError, r"'conv/kernel' has shape \(3, 3, 0, 4\) \(0 input features\)"),
    ("srigl-zero-size", lambda p: jaxsparse.srigl(SGD, 0.5, key=KEY, end_step=10).init(
        _with(p, empty=jnp.ones((0, 8)))),
     ValueError, r"'empty/kernel' has shape \(0, 8\)"),
    ("granet-zero-size", lambda p: jaxsparse.granet(SGD, 0.5, key=KEY, end_step=10).init(
        _with(p, empty=jnp.ones((0, 8)))),
     ValueError, r"'empty/kernel' has shape \(0, 8\)"),
    ("er-scalar-selected", lambda p: jaxsparse.static(
        SGD, 0.5, key=KEY, distribution="er",
        prunable=lambda path, leaf: path.endswith(("kernel", "temperature"))).init(
            {**p, "temperature": jnp.ones(())}),
     ValueError, r"prunable leaf 'temperature' is a scalar.*prunable="),
    ("layer-budgets-zero-size-spec", lambda p: layer_budgets(
        [LayerSpec("fc/kernel", (0, 10))], 0.5, "erk"),
     ValueError, r"'fc/kernel' has shape \(0, 10\) \(0 input features\)"),
    ("layer-budgets-scalar-spec", lambda p: layer_budgets([LayerSpec("t", ())], 0.5, "er"),
     ValueError, r"prunable leaf 't' is a scalar"),
    # --- masks ---
    ("apply-masks-structure", lambda p: jaxsparse.apply_masks(
        p, {"dense0": {"kernel": None, "bias": None}}),
     ValueError, r"params leaves without a mask entry: \['dense1/bias', 'dense1/kernel'"),
    ("apply-masks-none", lambda p: jaxsparse.apply_masks(p, None),
     ValueError, r"masks must be a mask tree.*got NoneType.*jaxsparse.get_masks\(opt_state\)"),
    ("apply-masks-given-the-state", lambda p: jaxsparse.apply_masks(
        p, jaxsparse.static(SGD, 0.5, key=KEY, distribution="uniform").init(p)),
     ValueError, r"got SparseState; take it from the optimizer state with jaxsparse.get_masks"),
    ("apply-masks-nested-list", lambda p: jaxsparse.apply_masks(
        {"k": jnp.ones((2, 2))}, {"k": [[True, False], [True, True]]}),
     ValueError, r"mask entries without a params leaf: \['k/0/0'"),
    ("apply-masks-shape", lambda p: jaxsparse.apply_masks(
        p, _masks_with(p, "dense1/kernel", jnp.ones((3, 3), bool))),
     ValueError, r"mask for 'dense1/kernel' has shape \(3, 3\) but the parameter has shape"),
    ("validate-masks-dtype", lambda p: jaxsparse.validate_masks(
        _masks_with(p, "dense0/kernel", jnp.ones((20, 16), jnp.float32)), p),
     ValueError, r"mask for 'dense0/kernel' must be a bool array, got dtype float32"),
    ("sparse-init-mask-over-int", lambda p: jaxsparse.sparse_init(
        {"q": jnp.ones((2, 2), jnp.int8)}, {"q": jnp.ones((2, 2), bool)}),
     TypeError, r"mask for 'q' covers a leaf of dtype int8"),
    ("ones-masks-selects-bool", lambda p: jaxsparse.ones_masks(
        _with(p, flags=jnp.ones((2, 2), bool)), lambda path, leaf: leaf.ndim == 2),
     TypeError, r"leaf 'flags/kernel' of dtype bool"),
    # --- pruning at init and lottery tickets ---
    ("one-shot-no-prunable-leaf", lambda p: pai.one_shot_masks({"bias": jnp.ones(3)}, 0.5),
     ValueError, r"no prunable leaves in the score tree \(leaves: \['bias'\]\)"),
    ("one-shot-ranking", lambda p: pai.one_shot_masks(p, 0.5, ranking="best"),
     ValueError, r"unknown ranking 'best'"),
    ("one-shot-where-structure", lambda p: pai.one_shot_masks(
        p, 0.5, where={"dense0": jnp.ones((20, 16), bool)}),
     ValueError, r"where \(the candidate masks\) must have the structure of the scores"),
    ("one-shot-where-shape", lambda p: pai.one_shot_masks(
        p, 0.5, where=_masks_with(p, "dense1/kernel", jnp.ones((3, 3), bool))),
     ValueError, r"where\['dense1/kernel'\] must be a bool array of shape \(16, 8\)"),
    ("one-shot-zero-size", lambda p: pai.one_shot_masks(_with(p, e=jnp.ones((0, 3))), 0.5),
     ValueError, r"'e/kernel' has shape \(0, 3\)"),
    ("grasp-temperature", lambda p: pai.grasp_scores(
        _mlp, p, (jnp.ones((2, 20)), jnp.zeros(2, jnp.int32)), temperature=0.0),
     ValueError, r"temperature must be a finite number > 0, got 0.0"),
    ("synflow-rounds", lambda p: pai.synflow_masks(_mlp, p, (1, 20), 0.5, rounds=0),
     ValueError, r"rounds must be an int >= 1, got 0"),
    ("synflow-masks-shape", lambda p: pai.synflow_scores(
        _mlp, p, (1, 20), masks=_masks_with(p, "dense0/kernel", jnp.ones((4, 3), bool))),
     ValueError, r"mask for 'dense0/kernel' has shape \(4, 3\)"),
    ("fixed-masks-shape", lambda p: pai.fixed_masks(
        SGD, _masks_with(p, "dense1/kernel", jnp.ones((8, 16), bool))).init(p),
     ValueError, r"mask for 'dense1/kernel' has shape \(8, 16\)"),
    ("fixed-masks-over-int8", lambda p: pai.fixed_masks(SGD, {"q": jnp.ones((2, 2), bool)}).init(
        {"q": jnp.ones((2, 2), jnp.int8)}),
     TypeError, r"mask for 'q' covers a leaf of dtype int8"),
    ("imp-rounds", lambda p: lottery.imp(lambda *a: None, p, num_steps=10, rounds=0,
                                         prune_fraction=0.2),
     ValueError, r"rounds must be an int >= 1, got 0"),
    ("imp-prune-fraction", lambda p: lottery.imp(lambda *a: None, p, num_steps=10, rounds=2,
                                                 prune_fraction=1.0),
     ValueError, r"prune_fraction must be in \[0, 1\), got 1.0"),
    ("rewind-missing-step", lambda p: lottery.rewind({0: p}, 7),
     ValueError, r"cannot rewind to step 7.*saved steps are \[0\]"),
    # --- nn layers ---
    ("vd-dense-features-0", lambda p: jnn.VDDense(0).init(
        KEY, jnp.ones((1, 3)), deterministic=True),
     ValueError, r"features must be an int >= 1, got 0"),
    ("l0-dense-input-features-0", lambda p: jnn.L0Dense(4).init(
        KEY, jnp.ones((1, 0)), deterministic=True),
     ValueError, r"input features \(x.shape\[-1\]\) must be an int >= 1, got 0"),
    ("vd-dense-nnx-in-features-0", lambda p: jnn.VDDenseNNX(0, 3, rngs=nnx.Rngs(0)),
     ValueError, r"in_features must be an int >= 1, got 0"),
    ("l0-dense-nnx-out-features-0", lambda p: jnn.L0DenseNNX(3, 0, rngs=nnx.Rngs(0)),
     ValueError, r"out_features must be an int >= 1, got 0"),
    ("vd-conv-kernel-size-0", lambda p: jnn.VDConv(4, (3, 0)).init(
        KEY, jnp.ones((1, 5, 5, 3)), deterministic=True),
     ValueError, r"kernel_size\[1\] must be an int >= 1, got 0"),
    ("l0-conv-nnx-kernel-size-int", lambda p: jnn.L0ConvNNX(3, 4, 3, rngs=nnx.Rngs(0)),
     ValueError, r"kernel_size must be a sequence of ints >= 1, got 3"),
    ("vd-conv-nnx-groups", lambda p: jnn.VDConvNNX(3, 4, (3, 3), feature_group_count=2,
                                                   rngs=nnx.Rngs(0)),
     ValueError, r"in_features \(3\) must be divisible by feature_group_count \(2\)"),
    ("vd-conv-padding", lambda p: jnn.VDConv(4, (3, 3), padding="FULL").init(
        KEY, jnp.ones((1, 5, 5, 3)), deterministic=True),
     ValueError, r"padding must be 'SAME', 'VALID'.*'FULL'"),
    ("l0-conv-nnx-padding", lambda p: jnn.L0ConvNNX(3, 4, (3, 3), padding=[(1, 1)],
                                                    rngs=nnx.Rngs(0)),
     ValueError, r"padding needs 2 entries \(one per spatial axis\), got \[\(1, 1\)\]"),
    ("vd-dense-no-rng-in-training", lambda p: jnn.VDDense(4).init(
        {"params": KEY}, jnp.ones((1, 3)), deterministic=False),
     ValueError, r"VDDense"),
    ("vd-masks-threshold", lambda p: jnn.vd_masks({}, threshold=float("nan")),
     ValueError, r"threshold \(on log alpha\) must be a finite number"),
    ("vd-masks-no-vd-params", lambda p: jnn.vd_masks(p),
     ValueError, r"no variational dropout parameters.*'dense0/kernel'"),
    ("l0-masks-threshold", lambda p: jnn.l0_masks({}, threshold=1.5),
     ValueError, r"threshold \(on the evaluation gate\) must be in \[0, 1\), got 1.5"),
    ("l0-gamma", lambda p: jnn.L0DenseNNX(3, 4, gamma=0.1, rngs=nnx.Rngs(0)),
     ValueError, r"gamma must be < 0.*got 0.1"),
    ("penalty-schedule-warmup", lambda p: jnn.penalty_schedule(1.0, warmup_steps=-1),
     ValueError, r"warmup_steps must be an int >= 0, got -1"),
]
# fmt: on


@pytest.fixture(scope="module")
def params():
    return tiny_params()


def test_the_matrix_is_broad():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("call, error, message", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_culprit(params, call, error, message):
    before = jax.tree.map(np.asarray, params)
    with pytest.raises(error, match=message):
        call(params)
    # Refusing an input never changes the caller's params.
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
