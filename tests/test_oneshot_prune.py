"""jaxsparse.oneshot.prune on Flax linen and NNX models: sequential calibration, masks that
the rest of jaxsparse takes, sharded calibration, and errors that name the layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxsparse
from jaxsparse import oneshot
from tests.helpers import lenient


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, head=True):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(8)(x) if head else x


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(24, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs),
                                nnx.Linear(16, 8, rngs=rngs)])

    def __call__(self, x):
        x = nnx.relu(self.layers[0](x))
        x = nnx.relu(self.layers[1](x))
        return self.layers[2](x)


def _batches(seed, n=3, rows=32):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(24, 24))
    return [jnp.asarray((rng.normal(size=(rows, 24)) @ mix).astype(np.float32))
            for _ in range(n)]


@pytest.fixture(scope="module")
def linen_setup():
    model = MLP()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 24)))
    return model, variables, _batches(1)


def _manual_sequential(model, variables, batches, layer_fn):
    """The definition, spelled out: prune Dense_0 on the inputs, then Dense_1 on the outputs
    of the pruned Dense_0, then Dense_2."""
    p = jax.tree.map(lambda v: v, variables["params"])
    x = jnp.concatenate(batches)
    h = x
    for i, name in enumerate(["Dense_0", "Dense_1", "Dense_2"]):
        res = layer_fn(p[name]["kernel"], oneshot.input_stats(h), f"params/{name}/kernel")
        p[name] = dict(p[name], kernel=res.kernel)
        h = h @ res.kernel + p[name]["bias"][None, :]
        h = nn.relu(h) if i < 2 else h
    return p


@pytest.mark.parametrize("method", [pytest.param("wanda", marks=pytest.mark.slow), "sparsegpt"])
def test_linen_prune_is_sequential(linen_setup, method):
    model, variables, batches = linen_setup
    result = oneshot.prune(model, variables, batches, method=method, sparsity=0.5,
                           blocksize=8)
    assert result.layers == tuple(f"params/Dense_{i}/kernel" for i in range(3))
    fn = {"wanda": lambda k, s, n: oneshot.wanda_layer(k, s, sparsity=0.5, name=n),
          "sparsegpt": lambda k, s, n: oneshot.sparsegpt_layer(k, s, sparsity=0.5, blocksize=8,
                                                                name=n)}[method]
    expected = _manual_sequential(model, variables, batches, fn)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        np.testing.assert_allclose(np.asarray(result.params["params"][name]["kernel"]),
                                   np.asarray(expected[name]["kernel"]), rtol=1e-4, atol=1e-5)
        mask = result.masks["params"][name]["kernel"]
        assert mask.dtype == jnp.bool_ and np.all(np.asarray(mask).sum(0) == mask.shape[0] // 2)
        assert result.masks["params"][name]["bias"] is None
    # The masks are an ordinary Masks tree: the rest of jaxsparse takes them.
    jaxsparse.validate_masks(result.masks, result.params)
    applied = jaxsparse.apply_masks(result.params, result.masks)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), applied,
                                     result.params))
    rows = jaxsparse.sparsity_table(result.masks)
    assert [round(float(r.sparsity), 3) for r in rows] == [0.5, 0.5, 0.5]


def test_magnitude_needs_no_data_and_nm_patterns(linen_setup):
    model, variables, _ = linen_setup
    result = oneshot.prune(model, variables, None, method="magnitude", nm=(2, 4))
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        mask = np.asarray(result.masks["params"][name]["kernel"])
        assert np.all(mask.reshape(-1, 4, mask.shape[-1]).sum(1) == 2)
    # Constant fan-in per neuron: the condensed export takes the result as it is.
    layers = jaxsparse.condense(result.params, result.masks)
    assert layers["params/Dense_0"].values.shape == (16, 12)


def test_nnx_equals_linen_with_the_same_weights(linen_setup):
    model, variables, batches = linen_setup
    nmodel = NNXMLP(nnx.Rngs(0))
    for i, layer in enumerate(nmodel.layers):
        layer.kernel[...] = variables["params"][f"Dense_{i}"]["kernel"]
        layer.bias[...] = variables["params"][f"Dense_{i}"]["bias"]
    before = nnx.state(nmodel, nnx.Param)
    res_nnx = oneshot.prune(nmodel, None, batches, method="sparsegpt", sparsity=0.5,
                            blocksize=8)
    res_linen = oneshot.prune(model, variables, batches, method="sparsegpt", sparsity=0.5,
                              blocksize=8)
    assert res_nnx.layers == ("layers/0/kernel", "layers/1/kernel", "layers/2/kernel")
    for i in range(3):
        np.testing.assert_allclose(np.asarray(res_nnx.params["layers"][i]["kernel"][...]),
                                   np.asarray(res_linen.params["params"][f"Dense_{i}"]["kernel"]),
                                   rtol=1e-5, atol=1e-6)
    # The user's model object is untouched until they update it, and stays a plain Linear.
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before,
                                     nnx.state(nmodel, nnx.Param)))
    assert type(nmodel.layers[0]) is nnx.Linear
    nnx.update(nmodel, res_nnx.params)
    jaxsparse.validate_masks(res_nnx.masks, nnx.state(nmodel, nnx.Param))


def test_fixed_mask_fine_tuning_keeps_the_pattern(linen_setup):
    model, variables, batches = linen_setup
    result = oneshot.prune(model, variables, batches, method="wanda", nm=(2, 4))
    tx = jaxsparse.fixed_masks(lenient(optax.adam(1e-2)), result.masks)
    params = result.params
    state = tx.init(params)
    target = jnp.ones((32, 8))

    def loss(p):
        return jnp.mean((model.apply(p, batches[0]) - target) ** 2)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    start = loss(params)
    for _ in range(5):
        params, state = step(params, state)
    assert loss(params) < start
    kernel = np.asarray(params["params"]["Dense_1"]["kernel"])
    assert np.all(kernel[~np.asarray(result.masks["params"]["Dense_1"]["kernel"])] == 0)


@pytest.mark.slow
def test_sharded_calibration_equals_single_device(linen_setup):
    model, variables, batches = linen_setup
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    single = oneshot.prune(model, variables, batches, method="sparsegpt", sparsity=0.6,
                           blocksize=8)
    sharded = oneshot.prune(model, variables, batches, method="sparsegpt", sparsity=0.6,
                            blocksize=8,
                            batch_sharding=NamedSharding(mesh, PartitionSpec("data")))
    for a, b in zip(jax.tree.leaves(single.masks), jax.tree.leaves(sharded.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_errors_name_the_layer(linen_setup):
    model, variables, batches = linen_setup
    with pytest.raises(ValueError, match="unknown method 'obs'"):
        oneshot.prune(model, variables, batches, method="obs", sparsity=0.5)
    with pytest.raises(ValueError, match="'wanda' needs calibration_batches"):
        oneshot.prune(model, variables, [], method="wanda", sparsity=0.5)
    with pytest.raises(TypeError, match="sequence of batches"):
        oneshot.prune(model, variables, batches[0], method="wanda", sparsity=0.5)
    headless = lambda p, x: model.apply(p, x, head=False)  # noqa: E731
    with pytest.raises(ValueError, match=r"'params/Dense_2/kernel' is never reached"):
        oneshot.prune(headless, variables, batches, method="sparsegpt", sparsity=0.5)
    with pytest.raises(ValueError, match=r"'params/Dense_1/kernel'.*multiple of M=3"):
        oneshot.prune(model, variables, batches, method="wanda", nm=(1, 3),
                      prunable=r"Dense_1/kernel")
    with pytest.raises(TypeError, match="params is required"):
        oneshot.prune(model, None, batches, method="wanda", sparsity=0.5)
    with pytest.raises(TypeError, match="model must be"):
        oneshot.prune(42, variables, batches, method="wanda", sparsity=0.5)
    # Leaving the unreached layer out works.
    res = oneshot.prune(headless, variables, batches, method="wanda", sparsity=0.5,
                        prunable=r"Dense_[01]/kernel")
    assert res.masks["params"]["Dense_2"]["kernel"] is None


class SharedInput(nn.Module):
    """q/k/v-like Dense layers reading one input, a residual, and a Dense applied twice."""

    twice: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(24)(x))
        q, k, v = nn.Dense(16)(h), nn.Dense(16)(h), nn.Dense(16)(h)
        h = h + nn.Dense(24)(nn.relu(q * k + v))
        if self.twice:  # one module on its own output: not cuttable, falls back
            shared = nn.Dense(24)
            h = shared(nn.relu(shared(h)))
        return nn.Dense(8)(h)


@pytest.mark.parametrize("twice", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", [pytest.param("wanda", marks=pytest.mark.slow), "sparsegpt"])
def test_carried_activations_equal_recomputed_prefix(method, twice):
    """prune(carry=True) (one forward pass cut at every layer) gives the result of
    prune(carry=False) (the forward prefix re-run for every layer) bit for bit."""
    model = SharedInput(twice)
    variables = model.init(jax.random.key(1), jnp.zeros((1, 24)))
    batches = _batches(2)
    kw = dict(method=method, sparsity=0.5, blocksize=8)
    carried = oneshot.prune(model, variables, batches, carry=True, **kw)
    recomputed = oneshot.prune(model, variables, batches, carry=False, **kw)
    assert carried.layers == recomputed.layers and len(carried.layers) == 6 + twice
    for a, b in zip(jax.tree.leaves((carried.params, carried.masks)),
                    jax.tree.leaves((recomputed.params, recomputed.masks)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Without the repeated module the forward is cut (one pass); with it, the fallback runs.
    forward = oneshot.calibrate.cached_linen_forward(model.apply)
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    paths = [jaxsparse.masks.path_to_str(p) for p, _ in flat]
    modules = [p[len("params/"):-len("/kernel")] for p in carried.layers]
    plan = oneshot.calibrate.Sequential.plan(
        forward, variables, batches, modules, [paths.index(p) for p in carried.layers],
        with_gram=False)
    assert (plan is None) == twice


def test_donate_frees_the_dense_kernels(linen_setup):
    model, variables, batches = linen_setup
    kept = oneshot.prune(model, variables, batches, method="sparsegpt", sparsity=0.5,
                         blocksize=8)
    copy = jax.tree.map(jnp.copy, variables)
    donated = oneshot.prune(model, copy, batches, method="sparsegpt", sparsity=0.5,
                            blocksize=8, donate=True)
    for a, b in zip(jax.tree.leaves((kept.params, kept.masks)),
                    jax.tree.leaves((donated.params, donated.masks)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert copy["params"]["Dense_0"]["kernel"].is_deleted()
    assert not copy["params"]["Dense_0"]["bias"].is_deleted()
    assert not variables["params"]["Dense_0"]["kernel"].is_deleted()
