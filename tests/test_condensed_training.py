"""Training on the condensed form (issue 18): exact conversion, the custom VJP against the
masked dense layer and finite differences, the C++ backward kernels against the jnp
reference, bad input, the condensed SRigL update against ``jaxsparse.srigl(ablation=False)``
on the masked dense model, and the Flax layer."""

import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxsparse
from jaxsparse.condensed import training as T
from jaxsparse.condensed.kernels import train_cpu
from jaxsparse.transform import find_sparse_states
from tests.helpers import examples, lenient

needs_kernel = pytest.mark.skipif(not train_cpu.available(), reason="no C++ compiler")
IMPLS = ["xla", pytest.param("cpu", marks=needs_kernel)]


def random_mask(rng, n_in, n_out, k):
    rows = np.argsort(rng.random((n_in, n_out)), axis=0)[:k]
    mask = np.zeros((n_in, n_out), bool)
    mask[rows, np.arange(n_out)[None, :]] = True
    return mask


def random_layer(seed, n_in, n_out, k):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, n_in, n_out, k)
    kernel = (rng.standard_normal((n_in, n_out)) * mask).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    return kernel, mask, bias


# ----------------------------------------------------------------------------- conversion


def test_layer_conversion_is_exact_both_ways():
    kernel, mask, bias = random_layer(0, 300, 40, 7)
    values, indices, b = T.condense_for_training(kernel + ~mask * np.float32(9), mask, bias)
    assert values.shape == indices.shape == (40, 7) and indices.dtype == jnp.int16
    assert np.all(np.diff(np.asarray(indices), axis=1) > 0)  # ascending, distinct
    k2, m2 = T.expand_from_training(values, indices, 300)
    np.testing.assert_array_equal(np.asarray(k2), kernel)  # entries outside the mask dropped
    np.testing.assert_array_equal(np.asarray(m2), mask)
    np.testing.assert_array_equal(np.asarray(b), bias)
    small, small_mask, _ = random_layer(0, 100, 40, 7)
    assert T.condense_for_training(small, small_mask)[1].dtype == jnp.int8
    assert T.condense_for_training(small, small_mask, index_dtype=np.int32)[1].dtype == jnp.int32


def test_tree_conversion_round_trip_and_dense_leaves_untouched():
    k0, m0, b0 = random_layer(1, 20, 16, 5)
    k1, m1, b1 = random_layer(2, 16, 8, 3)
    params = {"dense0": {"kernel": k0, "bias": b0}, "norm": {"scale": np.ones(16, np.float32)},
              "out": {"kernel": k1, "bias": b1}}
    masks = {"dense0": {"kernel": m0, "bias": None}, "norm": {"scale": None},
             "out": {"kernel": m1, "bias": None}}
    cparams, indices = T.condense_params(params, masks)
    assert set(cparams["dense0"]) == {"values", "bias"} and cparams["dense0"]["values"].shape == (16, 5)
    assert set(indices) == {"dense0", "out"} and indices["out"]["indices"].shape == (8, 3)
    back, bmasks = T.expand_params(cparams, indices, {"dense0": 20, "out": 16})
    for name in ("dense0", "out"):
        np.testing.assert_array_equal(np.asarray(back[name]["kernel"]), params[name]["kernel"])
        np.testing.assert_array_equal(np.asarray(bmasks[name]["kernel"]), masks[name]["kernel"])
    np.testing.assert_array_equal(np.asarray(back["norm"]["scale"]), params["norm"]["scale"])
    assert bmasks["norm"]["scale"] is None


def test_conversion_bad_input_names_the_leaf():
    kernel, mask, bias = random_layer(0, 30, 6, 4)
    uneven = mask.copy()
    uneven[np.flatnonzero(~mask[:, 3])[0], 3] = True
    with pytest.raises(ValueError, match=r"enc/kernel: condensed training needs constant "
                                         r"fan-in .* neuron 0 has 4 and neuron 3 has 5"):
        T.condense_params({"enc": {"kernel": kernel}}, {"enc": {"kernel": uneven}})
    with pytest.raises(ValueError, match="neuron 0 has 0"):
        T.condense_for_training(kernel, np.zeros_like(mask), name="zero")
    with pytest.raises(TypeError, match="mask must be a bool array"):
        T.condense_for_training(kernel, mask.astype(np.float32))
    with pytest.raises(ValueError, match="does not match kernel shape"):
        T.condense_for_training(kernel, mask[:-1])
    k_big, m_big, _ = random_layer(0, 200, 4, 3)
    with pytest.raises(ValueError, match=r"big: n_in=200 inputs do not fit index dtype int8"):
        T.condense_for_training(k_big, m_big, index_dtype=np.int8, name="big")
    with pytest.raises(ValueError, match="w: condensed training covers 2-D Dense kernels"):
        T.condense_params({"w": np.ones((2, 3, 4), np.float32)}, {"w": np.ones((2, 3, 4), bool)})
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda k: T.condense_for_training(k, mask))(kernel)
    _, idx, _ = T.condense_for_training(kernel, mask)
    with pytest.raises(ValueError, match=r"L/indices: indices\[1, 2\] = 30 is out of range"):
        T.expand_params({"L": {"values": jnp.ones((6, 4))}},
                        {"L": {"indices": idx.at[1, 2].set(30)}}, {"L": 30})
    with pytest.raises(ValueError, match="neuron 2 reads one input twice"):
        T.validate_indices(idx.at[2, 1].set(idx[2, 0]), 30)


# ----------------------------------------------------------------------------- the op


def _dense_loss(x, w, b):
    return jnp.sum(jnp.sin(x @ w + b[None, :]) * jnp.arange(w.shape[1], dtype=x.dtype)[None, :])


def _slots(dense, indices):
    return np.take_along_axis(np.asarray(dense).T, np.asarray(indices).astype(int), axis=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 37, pytest.param(5, marks=pytest.mark.slow)])
def test_gradients_equal_the_masked_dense_layer(impl, batch):
    kernel, mask, bias = random_layer(batch, 90, 24, 6)
    values, indices, _ = T.condense_for_training(kernel, mask)
    x = jax.random.normal(jax.random.key(batch), (batch, 90))

    def loss(x, v, b):
        y = T.condensed_linear(x, v, indices, b, impl=impl)
        return jnp.sum(jnp.sin(y) * jnp.arange(24, dtype=x.dtype)[None, :])

    y = T.condensed_linear(x, values, indices, jnp.asarray(bias), impl=impl)
    np.testing.assert_allclose(y, x @ kernel + bias[None, :], rtol=1e-5, atol=1e-5)
    gx, gv, gb = jax.jit(jax.grad(loss, (0, 1, 2)))(x, values, jnp.asarray(bias))
    dx, dw, db = jax.grad(_dense_loss, (0, 1, 2))(x, jnp.asarray(kernel), jnp.asarray(bias))
    np.testing.assert_allclose(gx, dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gv, _slots(dw, indices), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, db, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_finite_differences(impl):
    kernel, mask, bias = random_layer(3, 12, 5, 4)
    values, indices, _ = T.condense_for_training(kernel, mask)
    x = jax.random.normal(jax.random.key(0), (2, 3, 12))  # leading axes

    def f(x, v, b):
        return jnp.tanh(T.condensed_linear(x, v, indices, b, impl=impl))

    check_grads(f, (x, values, jnp.asarray(bias)), order=1, modes=["rev"], eps=1e-2,
                atol=2e-2, rtol=2e-2)


def test_bfloat16_uses_the_reference_and_matches_float32():
    kernel, mask, bias = random_layer(7, 64, 16, 8)
    values, indices, _ = T.condense_for_training(kernel, mask)
    x = jax.random.normal(jax.random.key(2), (6, 64))

    def loss(x, v, b):
        return jnp.sum(T.condensed_linear(x, v, indices, b).astype(jnp.float32) ** 2)

    args32 = (x, values, jnp.asarray(bias))
    args16 = tuple(a.astype(jnp.bfloat16) for a in args32)
    assert T.choose_train_impl("auto", jnp.bfloat16) == "xla"
    g16 = jax.jit(jax.grad(loss, (0, 1, 2)))(*args16)
    g32 = jax.grad(loss, (0, 1, 2))(*args32)
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=5e-2, atol=0.25)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_bias_and_vmap(impl):
    kernel, mask, _ = random_layer(4, 40, 9, 5)
    values, indices, _ = T.condense_for_training(kernel, mask)
    x = jax.random.normal(jax.random.key(1), (4, 3, 40))
    f = jax.vmap(lambda r: T.condensed_linear(r, values, indices, impl=impl))
    np.testing.assert_allclose(f(x), x @ kernel, rtol=1e-5, atol=1e-5)
    gv = jax.grad(lambda v: jnp.sum(jax.vmap(
        lambda r: T.condensed_linear(r, v, indices, impl=impl))(x) ** 2))(values)
    dw = jax.grad(lambda w: jnp.sum((x @ w) ** 2))(jnp.asarray(kernel))
    np.testing.assert_allclose(gv, _slots(dw, indices), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 31, 70])
@pytest.mark.parametrize("index_dtype, n_in", [(jnp.int8, 100), (jnp.int16, 700),
                                                (jnp.int32, 700)])
def test_cpu_backward_kernels_equal_the_reference(batch, index_dtype, n_in):
    rng = np.random.default_rng(batch + n_in)
    n_out, k = 300, 13  # 300 * 13 * 70 slots: the threaded paths too
    idx = jnp.asarray(np.stack([np.sort(rng.permutation(n_in)[:k]) for _ in range(n_out)]),
                      index_dtype)
    x = jnp.asarray(rng.standard_normal((batch, n_in)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, n_out)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((n_out, k)), jnp.float32)
    np.testing.assert_allclose(train_cpu.condensed_dvalues_cpu(x, dy, idx),
                               train_cpu.condensed_dvalues_reference(x, dy, idx),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(train_cpu.condensed_dx_cpu(dy, v, idx, n_in),
                               train_cpu.condensed_dx_reference(dy, v, idx, n_in),
                               rtol=1e-4, atol=1e-4)


def test_bad_indices_never_give_wrong_gradients():
    kernel, mask, bias = random_layer(5, 16, 6, 3)
    values, indices, _ = T.condense_for_training(kernel, mask)
    x = jnp.ones((2, 16))
    bad = indices.at[2, 1].set(16)
    with pytest.raises(ValueError, match=r"condensed_linear: indices\[2, 1\] = 16 is out of"):
        T.condensed_linear(x, values, bad)

    def grads(i, impl):  # indices passed into jit: traced, unknown at trace time
        return jax.jit(jax.grad(lambda x, v, i: jnp.sum(T.condensed_linear(x, v, i, impl=impl)),
                                (0, 1)))(x, values, i)

    gx, gv = grads(bad, "xla")  # traced: NaN, never a clamped read
    assert np.isnan(np.asarray(gv)[2]).all() and np.isfinite(np.asarray(gv)[[0, 1, 3]]).all()
    assert np.isnan(np.asarray(gx)).all()
    if train_cpu.available():
        with pytest.raises(Exception, match=r"index 16 out of range \[0, 16\)"):
            jax.block_until_ready(grads(bad, "cpu"))


def test_operand_errors_and_impl_choice(monkeypatch):
    kernel, mask, _ = random_layer(6, 16, 6, 3)
    values, indices, _ = T.condense_for_training(kernel, mask)
    x = jnp.ones((2, 16))
    with pytest.raises(TypeError, match="must share one dtype"):
        T.condensed_linear(x.astype(jnp.bfloat16), values, indices)
    with pytest.raises(ValueError, match="impl must be one of"):
        T.condensed_linear(x, values, indices, impl="gpu")
    assert T.choose_train_impl("auto", jnp.bfloat16) == "xla"
    # No compiler: "auto" warns once and uses the reference; "cpu" refuses.
    monkeypatch.setitem(train_cpu._state, "loaded", False)
    monkeypatch.setitem(train_cpu._state, "error", "no C++ compiler found")
    monkeypatch.setitem(T._warned, "cpu", False)
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler found"):
        assert T.choose_train_impl("auto", jnp.float32) == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = T.condensed_linear(x, values, indices)  # warned already: silent
    np.testing.assert_allclose(y, x @ kernel, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unavailable: no C\\+\\+ compiler"):
        T.choose_train_impl("cpu", jnp.float32)
    with pytest.raises(RuntimeError, match="kernels unavailable: no C\\+\\+ compiler"):
        train_cpu.condensed_dx_cpu(jnp.ones((2, 6)), values, indices, 16)


# ----------------------------------------------------------------------------- topology

D_IN, H, D_OUT = 20, 16, 8


def _n_in(hidden):
    return {**{f"dense{i}": D_IN if i == 0 else H for i in range(hidden)}, "out": H}


def _mlp_params(hidden):
    keys = jax.random.split(jax.random.key(0), hidden + 1)
    return {name: {"kernel": jax.random.normal(key, (n, D_OUT if name == "out" else H))
                   / np.sqrt(n), "bias": jnp.zeros(D_OUT if name == "out" else H)}
            for key, (name, n) in zip(keys, _n_in(hidden).items())}


def _hidden(p):
    return sorted(n for n in p if n != "out")


def _dense_apply(p, x):
    for name in _hidden(p):
        x = jax.nn.relu(x @ p[name]["kernel"] + p[name]["bias"][None, :])
    return x @ p["out"]["kernel"] + p["out"]["bias"][None, :]


def _condensed_apply(p, idx, x):
    def layer(name, x):
        return T.condensed_linear(x, p[name]["values"], idx[name]["indices"], p[name]["bias"])
    for name in _hidden(p):
        x = jax.nn.relu(layer(name, x))
    return layer("out", x)


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batch(t):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(5), t), (32, D_IN))
    return x, jnp.arange(32) % D_OUT


@pytest.mark.parametrize("n_in, n_out, k, fraction", [
    (50, 20, 5, 0.3), (300, 40, 3, 1.0),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [(64, 7, 64, 0.5), (40, 30, 9, 0.0)])])
def test_slot_selection_equals_srigl_layer_on_the_dense_view(n_in, n_out, k, fraction):
    rng = np.random.default_rng(n_in + k)
    indices = jnp.asarray(np.stack([np.sort(rng.permutation(n_in)[:k]) for _ in range(n_out)]),
                          jnp.int16)
    values = rng.standard_normal((n_out, k)).astype(np.float32)
    values[rng.random(values.shape) < 0.3] = 0.0  # ties at zero: broken by the keyed ranks
    grad = rng.standard_normal((n_in, n_out)).astype(np.float32)
    grad[rng.random(grad.shape) < 0.3] = 0.0

    @jax.jit
    def both(v, i, g, key):
        return [T.srigl_condensed_layer(v, i, g, key, fraction=fraction, selection=s)
                for s in T.SELECTIONS]

    (i_slots, src_slots), (i_dense, src_dense) = both(jnp.asarray(values), indices,
                                                      jnp.asarray(grad), jax.random.key(k))
    np.testing.assert_array_equal(i_slots, i_dense)
    np.testing.assert_array_equal(src_slots, src_dense)
    assert (np.diff(np.asarray(i_slots), axis=1) > 0).all()
    kept = np.asarray(src_slots) >= 0  # a moved slot reads the same input as before
    if fraction == 0.0:
        assert kept.all()
    np.testing.assert_array_equal(
        np.take_along_axis(np.asarray(indices), np.maximum(np.asarray(src_slots), 0), 1)[kept],
        np.asarray(i_slots)[kept])



def _integer_growth_layer(n_in, n_out, k, batch, seed):
    """A layer with small-integer growth inputs: ``x^T @ dy`` is exact in float32 in any
    summation order (so blocked and whole-layer scores are the same numbers) and full of
    ties (so the keyed tie-breaks decide many growths)."""
    rng = np.random.default_rng(seed)
    indices = jnp.asarray(np.stack([np.sort(rng.permutation(n_in)[:k]) for _ in range(n_out)]),
                          jnp.int16)
    values = rng.standard_normal((n_out, k)).astype(np.float32)
    values[rng.random(values.shape) < 0.3] = 0.0
    x = rng.integers(-2, 3, (batch, n_in)).astype(np.float32)
    dy = rng.integers(-2, 3, (batch, n_out)).astype(np.float32)
    return jnp.asarray(values), indices, jnp.asarray(x), jnp.asarray(dy)


@pytest.mark.parametrize("n_in, n_out, k, fraction, blocks", [
    (50, 20, 5, 0.3, (7,)),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [
        (50, 20, 5, 0.3, (1, 4, 20, 64)), (300, 40, 3, 1.0, (16,)), (64, 7, 64, 0.5, (2,)),
        (40, 30, 9, 0.0, (4,))])])
def test_blocked_growth_equals_the_whole_layer_update(n_in, n_out, k, fraction, blocks):
    values, indices, x, dy = _integer_growth_layer(n_in, n_out, k, 6, n_in + k)
    grad = x.T @ dy  # exact: small integers
    key = jax.random.key(k)

    @jax.jit
    def whole(v, i, g, key):
        return [T.srigl_condensed_layer(v, i, g, key, fraction=fraction, selection=s)
                for s in T.SELECTIONS]

    want = whole(values, indices, grad, key)
    np.testing.assert_array_equal(want[0][0], want[1][0])
    growth = T.GrowthInputs(x, dy)
    for block in blocks:  # blocks that divide n_out, that do not, of one neuron, above n_out
        got = jax.jit(functools.partial(T.srigl_condensed_layer_blocked, fraction=fraction,
                                        block=block))(values, indices, growth, key)
        np.testing.assert_array_equal(got[0], want[0][0], err_msg=f"block={block}")
        np.testing.assert_array_equal(got[1], want[0][1], err_msg=f"block={block}")


@pytest.mark.parametrize("tie_key, blocks", [
    (jax.random.key(7), (5,)),
    pytest.param(None, (1, 5, 23), marks=pytest.mark.slow),
    pytest.param(jax.random.key(8), (1, 23, 40), marks=pytest.mark.slow)])
def test_grow_blocked_is_top_k_per_neuron(tie_key, blocks):
    values, indices, x, dy = _integer_growth_layer(37, 23, 6, 5, 1)
    kept = jnp.asarray(np.random.default_rng(2).random(indices.shape) < 0.5)
    cols = jnp.broadcast_to(jnp.arange(23)[:, None], indices.shape)
    keep = jnp.zeros((37, 23), bool).at[indices.astype(jnp.int32), cols].max(kept)
    grow = jaxsparse.topology.top_k_per_neuron(jnp.abs(x.T @ dy), 6 - kept.sum(1),
                                               where=~keep, tie_key=tie_key)
    want = T.mask_to_indices(keep | grow, 6, indices.dtype)
    for block in blocks:
        np.testing.assert_array_equal(
            T.grow_blocked(indices, kept, x, dy, tie_key, block=block), want)
    # Leading axes of x and dy are flattened (a sequence model's [batch, time, features]).
    got = T.grow_blocked(indices, kept, x.reshape(5, 1, 37), dy.reshape(5, 1, 23), tie_key,
                         block=blocks[0])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="growth block must be an int >= 1, got 0"):
        T.grow_blocked(indices, kept, x, dy, tie_key, block=0)


def _padded_layer(n_in, n_out, cap, k0, seed, growth, dtype=np.float32):
    """A padded layer (a third of its neurons ablated, the others at ``k0`` inputs; some
    zero weights) and its growth inputs: ``growth="ints"`` small integers (``x^T @ dy``
    exact in any summation order, full of ties), ``"normal"`` continuous."""
    rng = np.random.default_rng(seed)
    fan = np.where(rng.random(n_out) < 1 / 3, 0, k0).astype(np.int32)
    indices = np.zeros((n_out, cap), np.int16)
    values = np.zeros((n_out, cap), np.float32)
    for i in range(n_out):
        indices[i, :fan[i]] = np.sort(rng.permutation(n_in)[:fan[i]])
        values[i, :fan[i]] = rng.standard_normal(fan[i]) * (rng.random(fan[i]) > 0.2)
    if growth == "ints":
        x, dy = (rng.integers(-2, 3, (6, n)).astype(np.float32) for n in (n_in, n_out))
    else:
        x, dy = (rng.standard_normal((6, n)).astype(np.float32) for n in (n_in, n_out))
    return (jnp.asarray(values, dtype), jnp.asarray(indices), jnp.asarray(fan),
            T.GrowthInputs(jnp.asarray(x), jnp.asarray(dy)))


@functools.partial(jax.jit, static_argnames="block")
def _ablation_updates(values, indices, fan, growth, key, fraction, k0, tau, min_neurons,
                      block):
    """The whole-layer ablation update (``srigl_layer`` on the dense view of ``x^T @ dy``)
    and the blocked one; one compilation per shape and block."""
    kw = dict(fraction=fraction, k0=k0, tau=tau, min_neurons=min_neurons)
    return (T.srigl_ablation_condensed_layer(values, indices, fan,
                                             T.weight_grad(growth.x, growth.dy), key, **kw),
            T.srigl_ablation_condensed_layer_blocked(values, indices, fan, growth, key,
                                                     block=block, **kw))


@settings(deadline=None, max_examples=examples(10, nightly=300))
@given(seed=st.integers(0, 2**31 - 1), growth=st.sampled_from(["ints", "normal"]),
       output=st.booleans(), fraction=st.floats(0.0, 1.0), tau=st.integers(1, 5))
def test_blocked_ablation_update_equals_the_whole_layer_update(seed, growth, output,
                                                                fraction, tau):
    # 23 neurons in blocks of 7 (the last block shifted), capacity 12 of 50 inputs.
    n_in, n_out, cap, k0 = 50, 23, 12, 5
    values, indices, fan, growth = _padded_layer(n_in, n_out, cap, k0, seed, growth)
    min_neurons = jaxsparse.algorithms.structured.min_neurons(k0, n_out, n_in, output)
    want, got = _ablation_updates(values, indices, fan, growth, jax.random.key(seed),
                                  fraction, k0, tau, min_neurons, block=7)
    for name, w, g in zip(("indices", "src", "fan"), want, got):
        np.testing.assert_array_equal(g, w, err_msg=name)
    if output:
        assert (np.asarray(got[2]) > 0).all()


@pytest.mark.parametrize("n_in, n_out, cap, k0, dtype, blocks", [
    (50, 23, 12, 5, np.float32, (7,)),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [
        (50, 23, 12, 5, np.float32, (1, 23, 64)), (40, 30, 40, 6, np.float32, (4,)),
        (40, 30, 40, 6, jnp.bfloat16, (4,))])])
def test_blocked_ablation_update_ablates_revives_and_keeps_the_output_layer(
        n_in, n_out, cap, k0, dtype, blocks):
    values, indices, fan, growth = _padded_layer(n_in, n_out, cap, k0, 1, "ints", dtype)
    scores = np.abs(np.asarray(T.weight_grad(growth.x, growth.dy)))
    n_drop = int(np.floor(np.float32(0.5) * np.float32(k0 * n_out)))
    assert (scores == np.sort(scores, axis=None)[::-1][n_drop - 1]).sum() > 1  # saliency ties
    for output in (False, True):
        min_neurons = jaxsparse.algorithms.structured.min_neurons(k0, n_out, n_in, output)
        for block in blocks:
            want, got = _ablation_updates(values, indices, fan, growth, jax.random.key(0), 0.5,
                                          k0, 4, min_neurons, block=block)
            for name, w, g in zip(("indices", "src", "fan"), want, got):
                np.testing.assert_array_equal(g, w, err_msg=f"{name}, block={block}")
        new_fan, old_fan = np.asarray(got[2]), np.asarray(fan)
        if output:
            assert (new_fan > 0).all()
        else:  # some neurons ablated, some ablated ones back
            assert (new_fan == 0).any() and ((old_fan == 0) & (new_fan > 0)).any()
        T.validate_indices(got[0], n_in, fan=new_fan)


def test_blocked_ablation_update_bad_input():
    values, indices, fan, growth = _padded_layer(10, 6, 4, 2, 0, "ints")
    kw = dict(fraction=0.5, k0=2, tau=1, min_neurons=1)
    with pytest.raises(ValueError, match=r"fc: growth inputs x \(6, 10\) and dy \(6, 5\) are "
                                         r"not \[..., n_in\] and \[..., n_out=6\]"):
        T.srigl_ablation_condensed_layer_blocked(
            values, indices, fan, T.GrowthInputs(growth.x, growth.dy[:, :5]),
            jax.random.key(0), name="fc", **kw)
    with pytest.raises(ValueError, match="growth block must be an int >= 1, got 0"):
        T.srigl_ablation_condensed_layer_blocked(values, indices, fan, growth,
                                                 jax.random.key(0), block=0, **kw)
    with pytest.raises(ValueError, match="capacity 4 exceeds n_in=3"):
        T.srigl_ablation_condensed_layer_blocked(
            values, indices, fan, T.GrowthInputs(growth.x[:, :3], growth.dy),
            jax.random.key(0), **kw)


def _runs(steps, poison_step=None, hidden=1, capacity=None, gamma_sal=0.9, trace=None):
    """The masked dense SRigL run and the condensed one, side by side; with ``capacity``
    (an int or ``{layer: int}``), both with neuron ablation, the condensed one padded.
    ``trace``: a list that gets ``(masked masks, condensed masks)`` after every step."""
    key = jax.random.key(3)
    inner = lenient(optax.adam(1e-2))
    kw = dict(key=key, end_step=100, update_every=3, drop_fraction=0.5)
    ablation = capacity is not None
    tx = jaxsparse.srigl(inner, 0.7, ablation=ablation, gamma_sal=gamma_sal,
                         distribution="uniform", track_itop=False, **kw)
    mp, ms = jax.jit(lambda p: jaxsparse.init_masked(tx, p))(_mlp_params(hidden))
    masks0 = jaxsparse.get_masks(ms)
    cp, ci = T.condense_params(mp, masks0)
    fan = None
    if ablation:
        cp, ci, fan = T.pad_condensed(cp, ci, capacity, _n_in(hidden))
    ctx = T.srigl_condensed(inner, ablation=ablation, gamma_sal=gamma_sal, **kw)
    cs = ctx.init(cp, ci, fan)

    def poison(g, t):
        if poison_step is None:
            return g
        return jax.tree.map(lambda a: jnp.where(t == poison_step, jnp.nan, a), g)

    @jax.jit
    def masked_step(p, s, t):
        x, y = _batch(t)
        g = poison(jax.grad(lambda p: _xent(_dense_apply(p, x), y))(p), t)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def condensed_step(p, s, t):
        x, y = _batch(t)
        idx = T.get_indices(s)
        g = jax.grad(lambda p: _xent(_condensed_apply(p, idx, x), y))(p)

        def dense_grads():
            dense, _ = T.expand_params(p, idx, _n_in(hidden), s.fan)
            full = jax.grad(lambda d: _xent(_dense_apply(d, x), y))(dense)
            return poison({n: full[n]["kernel"] for n in _n_in(hidden)}, t)

        return ctx.step(g, s, p, dense_grads=dense_grads)

    for t in range(steps):
        mp, ms = masked_step(mp, ms, t)
        cp, cs = condensed_step(cp, cs, t)
        if trace is not None:
            trace.append((jaxsparse.get_masks(ms),
                          T.expand_params(cp, T.get_indices(cs), _n_in(hidden), cs.fan)[1]))
    return (mp, ms, masks0), (cp, cs)


@pytest.mark.slow
@pytest.mark.parametrize("hidden, steps", [(1, 7), (2, 13)])
def test_condensed_srigl_equals_masked_srigl(hidden, steps):
    (mp, ms, masks0), (cp, cs) = _runs(steps, hidden=hidden)  # updates every 3 steps
    n_in = _n_in(hidden)
    dense, cmasks = T.expand_params(cp, T.get_indices(cs), n_in)
    masks = jaxsparse.get_masks(ms)
    changed = 0
    for name in n_in:
        m, c = np.asarray(masks[name]["kernel"]), np.asarray(cmasks[name]["kernel"])
        np.testing.assert_array_equal(c, m)  # same topology
        assert (c.sum(0) == c.sum(0)[0]).all()  # constant fan-in, exact count
        changed += int((c != np.asarray(masks0[name]["kernel"])).sum())
        np.testing.assert_allclose(dense[name]["kernel"], mp[name]["kernel"], atol=1e-5)
        np.testing.assert_allclose(cp[name]["bias"], mp[name]["bias"], atol=1e-5)
    assert changed > 20  # the updates moved weights
    # Adam moments moved with their weights (grown ones zero): equal to the masked run's.
    c_mu = cs.inner_state[0].mu
    m_mu = find_sparse_states(ms)[0].inner_state[0].mu
    for name in n_in:
        idx = T.get_indices(cs)[name]["indices"]
        np.testing.assert_allclose(c_mu[name]["values"],
                                   _slots(m_mu[name]["kernel"], idx), atol=1e-6)
    assert cs.count == steps


@pytest.mark.slow
@pytest.mark.parametrize("hidden, steps", [(1, 10), (2, 13)])
def test_condensed_srigl_with_ablation_equals_masked_srigl(hidden, steps):
    trace = []
    (mp, ms, masks0), (cp, cs) = _runs(steps, hidden=hidden, capacity=_n_in(hidden),
                                       trace=trace)  # capacity n_in: never binds
    n_in = _n_in(hidden)
    for masks, cmasks in trace:  # every step, every layer: the same topology, bit for bit
        for name in n_in:
            np.testing.assert_array_equal(np.asarray(cmasks[name]["kernel"]),
                                          np.asarray(masks[name]["kernel"]))
    dense, cmasks = T.expand_params(cp, T.get_indices(cs), n_in, cs.fan)
    ablated = 0
    for name in n_in:
        c = np.asarray(cmasks[name]["kernel"])
        fan = np.asarray(cs.fan[name]["indices"])
        np.testing.assert_array_equal(c.sum(0), fan)
        k0 = int(np.asarray(masks0[name]["kernel"]).sum(0)[0])
        active = fan > 0
        assert len(set(fan[active])) == 1  # constant fan-in k' among active neurons
        assert fan[active][0] == min(k0 * fan.size // active.sum(), n_in[name])  # k'
        ablated += int((~active).sum())
        if name == "out":
            assert active.all()
        # Padded slots and ablated neurons hold exact zeros, in the params and the moments.
        pad = ~np.asarray(T.live_slots(fan, cp[name]["values"].shape[1]))
        assert (np.asarray(cp[name]["values"])[pad] == 0).all()
        assert (np.asarray(cs.inner_state[0].mu[name]["values"])[pad] == 0).all()
        np.testing.assert_allclose(dense[name]["kernel"], mp[name]["kernel"], atol=1e-5)
        np.testing.assert_allclose(cp[name]["bias"], mp[name]["bias"], atol=1e-5)
    assert ablated > 0  # gamma_sal=0.9: the rule did ablate
    c_mu = cs.inner_state[0].mu
    m_mu = find_sparse_states(ms)[0].inner_state[0].mu
    for name in n_in:
        live = np.asarray(T.live_slots(cs.fan[name]["indices"], c_mu[name]["values"].shape[1]))
        moved = _slots(m_mu[name]["kernel"], T.get_indices(cs)[name]["indices"])
        np.testing.assert_allclose(np.asarray(c_mu[name]["values"])[live],
                                   np.asarray(moved)[live], atol=1e-6)


@pytest.mark.parametrize("capacity", [7, pytest.param(9, marks=pytest.mark.slow),
                                      pytest.param(20, marks=pytest.mark.slow)])
def test_ablation_layer_never_exceeds_capacity_and_is_srigl_layer_when_it_does_not_bind(
        capacity):
    # Unguarded, SRigL gives k' = 9 (capacity 7: binds) or 8 (9, 20: does not).
    n_in, n_out, k0 = 20, 16, 6
    rng = np.random.default_rng(capacity)
    indices = jnp.asarray(np.stack([np.sort(rng.permutation(n_in)[:k0])
                                    for _ in range(n_out)]), jnp.int8)
    values = jnp.asarray(rng.standard_normal((n_out, k0)), jnp.float32)
    cp, ci, fan = T.pad_condensed({"l": {"values": values}}, {"l": {"indices": indices}},
                                  capacity, {"l": n_in})
    v, i, f = cp["l"]["values"], ci["l"]["indices"], fan["l"]["indices"]
    grad = jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32)
    key = jax.random.key(0)
    tau = 5  # most neurons fall below tau: k' would be large
    new_i, src, new_f = jax.jit(functools.partial(
        T.srigl_ablation_condensed_layer, fraction=0.5, k0=k0, tau=tau,
        min_neurons=1))(v, i, f, grad, key)
    new_f = np.asarray(new_f)
    assert new_f.max() <= capacity and (new_f[new_f > 0] == new_f.max()).all()
    T.validate_indices(new_i, n_in, fan=new_f)
    w, m = T.expand_from_training(v, i, n_in, f)

    def masked(min_neurons):
        return np.asarray(jax.jit(functools.partial(
            jaxsparse.algorithms.structured.srigl_layer, k0=k0, fraction=0.5, gamma_sal=0.0,
            ablation=True, min_neurons=min_neurons, tau=tau))(m, w, grad, key))

    got = np.asarray(T.to_mask(new_i, n_in, new_f))
    unguarded = masked(1)
    binds = unguarded.sum(0).max() > capacity
    assert binds == (capacity == 7)
    # The documented rule: at least floor(B / (capacity + 1)) + 1 neurons stay active.
    np.testing.assert_array_equal(got, masked(k0 * n_out // (capacity + 1) + 1)
                                  if binds else unguarded)
    kept = np.asarray(src) >= 0  # a moved slot reads the same input as before
    np.testing.assert_array_equal(
        np.take_along_axis(np.asarray(i), np.maximum(np.asarray(src), 0), 1)[kept],
        np.asarray(new_i)[kept])
    assert (np.asarray(src)[~np.asarray(T.live_slots(new_f, capacity))] == -1).all()


def test_padded_layout_conversion_and_bad_input():
    kernel, mask, bias = random_layer(0, 30, 12, 4)
    params = {"fc": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
    cp, ci = T.condense_params(params, {"fc": {"kernel": mask, "bias": None}})
    pp, pi, fan = T.pad_condensed(cp, ci, 9, {"fc": 30})
    assert pp["fc"]["values"].shape == pi["fc"]["indices"].shape == (12, 9)
    np.testing.assert_array_equal(fan["fc"]["indices"], np.full(12, 4))
    dense, masks = T.expand_params(pp, pi, {"fc": 30}, fan)
    np.testing.assert_array_equal(masks["fc"]["kernel"], mask)
    np.testing.assert_array_equal(dense["fc"]["kernel"], kernel)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 30)), jnp.float32)
    np.testing.assert_allclose(T.condensed_linear(x, pp["fc"]["values"], pi["fc"]["indices"]),
                               x @ kernel, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"fc: capacity=3 must be in \[k=4, n_in=30\]"):
        T.pad_condensed(cp, ci, 3, {"fc": 30})
    with pytest.raises(ValueError, match=r"fc: capacity=31 must be in"):
        T.pad_condensed(cp, ci, 31, {"fc": 30})
    with pytest.raises(ValueError, match="fc: n_in of this condensed layer is not given"):
        T.pad_condensed(cp, ci, 9, {})
    bad = {"fc": {"indices": fan["fc"]["indices"].at[2].set(10)}}
    with pytest.raises(ValueError, match=r"fc/indices: fan must be \[n_out=12\] in \[0, 9\]"):
        T.expand_params(pp, pi, {"fc": 30}, bad)
    tx = T.srigl_condensed(optax.sgd(0.1), key=jax.random.key(0), end_step=10, ablation=True)
    with pytest.raises(ValueError, match="fc/indices: SRigL starts from constant fan-in"):
        tx.init(pp, pi, {"fc": {"indices": fan["fc"]["indices"].at[0].set(3)}})
    with pytest.raises(ValueError, match="fc/indices: fan has no leaf"):
        tx.init(pp, pi, {})
    with pytest.raises(ValueError, match="output_layer 'head' matches no condensed layer"):
        T.srigl_condensed(optax.sgd(0.1), key=jax.random.key(0), end_step=10, ablation=True,
                          output_layer="head").init(pp, pi, fan)
    with pytest.raises(ValueError, match="fan \\(a padded layout\\) is for ablation=True"):
        T.srigl_condensed(optax.sgd(0.1), key=jax.random.key(0), end_step=10).init(pp, pi, fan)
    with pytest.raises(ValueError, match="selection must be one of"):
        T.srigl_condensed(optax.sgd(0.1), key=jax.random.key(0), end_step=10, ablation=True,
                          selection="blocked")
    with pytest.raises(ValueError, match="needs a state from its own init"):
        tx.step(cp, T.srigl_condensed(optax.sgd(0.1), key=jax.random.key(0), end_step=10
                                      ).init(pp, pi), pp, dense_grads={})


@pytest.mark.slow
def test_host_driven_skip_and_update_programs_equal_the_scheduled_step():
    params = _mlp_params(1)
    rng = np.random.default_rng(1)
    masks = {n: {"kernel": random_mask(rng, *params[n]["kernel"].shape, 4), "bias": None}
             for n in params}
    cp, ci = T.condense_params(jax.tree.map(jnp.asarray, params), masks)
    tx = T.srigl_condensed(lenient(optax.adam(1e-2)), key=jax.random.key(0), end_step=50,
                           update_every=2, drop_fraction=0.5)

    def make(topology):
        @jax.jit
        def step(p, s, t):
            x, y = _batch(t)
            idx = T.get_indices(s)
            g = jax.grad(lambda p: _xent(_condensed_apply(p, idx, x), y))(p)

            def dense_grads():
                dense, _ = T.expand_params(p, idx, _n_in(1))
                full = jax.grad(lambda d: _xent(_dense_apply(d, x), y))(dense)
                return {n: full[n]["kernel"] for n in _n_in(1)}

            return tx.step(g, s, p, dense_grads if topology != "skip" else None,
                           topology=topology)
        return step

    scheduled, skip, update = make("scheduled"), make("skip"), make("update")
    a = b = (cp, tx.init(cp, ci))
    for t in range(5):  # updates at steps 2 and 4
        a = scheduled(*a, t)
        b = (update if tx.is_update_step(b[1].count) else skip)(*b, t)
    for name in _n_in(1):
        np.testing.assert_array_equal(a[1].indices[name]["indices"], b[1].indices[name]["indices"])
        np.testing.assert_allclose(a[0][name]["values"], b[0][name]["values"], atol=1e-6)
    assert (np.asarray(a[1].indices["dense0"]["indices"])
            != np.asarray(ci["dense0"]["indices"])).any()
    with pytest.raises(ValueError, match="topology must be one of"):
        tx.step(a[0], a[1], a[0], topology="sometimes")


@pytest.mark.slow
def test_non_finite_gradients_keep_the_topology():
    (_, ms, masks0), (cp, cs) = _runs(4, poison_step=3)
    masks = jaxsparse.get_masks(ms)
    _, cmasks = T.expand_params(cp, T.get_indices(cs), _n_in(1))
    for name in _n_in(1):
        np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]),
                                      np.asarray(masks0[name]["kernel"]))
        np.testing.assert_array_equal(np.asarray(cmasks[name]["kernel"]),
                                      np.asarray(masks[name]["kernel"]))


def test_step_bad_input():
    params = _mlp_params(2)
    rng = np.random.default_rng(0)
    masks = {n: {"kernel": random_mask(rng, *params[n]["kernel"].shape, 2), "bias": None}
             for n in params}
    cp, ci = T.condense_params(params, masks)
    tx = T.srigl_condensed(optax.sgd(0.1), key=jax.random.key(0), end_step=10, update_every=1)
    state = tx.init(cp, ci)
    grads = jax.tree.map(jnp.zeros_like, cp)
    with pytest.raises(ValueError, match="needs dense_grads"):
        tx.step(grads, state, cp)
    with pytest.raises(ValueError, match="dense_grads has 1 leaves for 3 condensed layers"):
        tx.step(grads, state._replace(count=jnp.int32(1)), cp, dense_grads=[jnp.zeros((20, 16))])
    with pytest.raises(ValueError, match="out/indices: no params leaf 'out/values'"):
        tx.init({k: v for k, v in cp.items() if k != "out"}, ci)
    with pytest.raises(ValueError, match="srigl_condensed needs key"):
        T.srigl_condensed(optax.sgd(0.1), key=None, end_step=10)
    with pytest.raises(ValueError, match="growth_block must be an int >= 1, got 0"):
        T.srigl_condensed(optax.sgd(0.1), key=jax.random.key(0), end_step=10, growth_block=0)
    growth = {n: T.GrowthInputs(jnp.zeros((4, params[n]["kernel"].shape[0])),
                                jnp.zeros((4, 3))) for n in params}
    with pytest.raises(ValueError, match=r"\w+/indices: growth inputs x \(4, 20\) and dy "
                                         r"\(4, 3\) are not \[..., n_in\] and \[..., n_out=16\]"):
        tx.step(grads, state._replace(count=jnp.int32(1)), cp, dense_grads=growth)


# ----------------------------------------------------------------------------- Flax


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(T.CondensedTrainDense(32, k=6, name="fc0")(x))
        return T.CondensedTrainDense(D_OUT, k=4, name="fc1")(x)


def test_flax_layer_equals_dense_and_optimizer_state_covers_values_only():
    net = _Net()
    x, y = _batch(0)
    variables = jax.jit(net.init)(jax.random.key(0), x)
    assert set(variables) == {"params", "sparsity"}
    assert variables["params"]["fc0"]["values"].shape == (32, 6)
    idx = np.asarray(variables["sparsity"]["fc0"]["indices"])
    assert idx.dtype == np.int8 and (np.diff(idx, axis=1) > 0).all() and idx.max() < D_IN
    # The layer equals its masked dense layer.
    kernel, _ = T.expand_from_training(variables["params"]["fc0"]["values"], idx, D_IN)
    y0 = T.CondensedTrainDense(32, k=6).apply(
        {"params": variables["params"]["fc0"], "sparsity": variables["sparsity"]["fc0"]}, x)
    np.testing.assert_allclose(y0, x @ kernel, rtol=1e-5, atol=1e-5)

    # dense_weight_grads: the gradient of the loss w.r.t. each dense effective weight.
    dg = jax.jit(lambda v: T.dense_weight_grads(net.apply, v, _xent, x, y))(variables)
    k1, _ = T.expand_from_training(variables["params"]["fc1"]["values"],
                                   variables["sparsity"]["fc1"]["indices"], 32)

    def dense_loss(w0, w1):
        h = jax.nn.relu(x @ w0 + variables["params"]["fc0"]["bias"][None, :])
        return _xent(h @ w1 + variables["params"]["fc1"]["bias"][None, :], y)

    w_grads = jax.jit(jax.grad(dense_loss, (0, 1)))(kernel, k1)
    np.testing.assert_allclose(dg["fc0"]["kernel"], w_grads[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dg["fc1"]["kernel"], w_grads[1], rtol=1e-4, atol=1e-5)

    tx = T.srigl_condensed(lenient(optax.adam(3e-2)), key=jax.random.key(1), end_step=40,
                           update_every=5)
    state = tx.init(variables["params"], variables["sparsity"])
    n_state = sum(a.size for a in jax.tree.leaves(state.inner_state))
    assert n_state == 2 * (32 * 6 + 32 + D_OUT * 4 + D_OUT) + 1  # mu, nu over values + count


@pytest.mark.slow
def test_flax_layer_trains_with_condensed_srigl():
    net = _Net()
    x, y = _batch(0)
    variables = jax.jit(net.init)(jax.random.key(0), x)
    idx = np.asarray(variables["sparsity"]["fc0"]["indices"])

    def loss(v):
        return _xent(net.apply(v, x), y)

    tx = T.srigl_condensed(lenient(optax.adam(3e-2)), key=jax.random.key(1), end_step=40,
                           update_every=5)
    params = variables["params"]
    state = tx.init(params, variables["sparsity"])

    @jax.jit
    def step(params, state):
        v = {"params": params, "sparsity": T.get_indices(state)}
        g = jax.grad(lambda p: loss({**v, "params": p}))(params)
        return tx.step(g, state, params, dense_grads=lambda: T.dense_weight_grads(
            net.apply, v, _xent, x, y))

    first = float(loss(variables))
    for _ in range(20):
        params, state = step(params, state)
    final = {"params": params, "sparsity": T.get_indices(state)}
    assert float(loss(final)) < 0.7 * first
    new_idx = np.asarray(T.get_indices(state)["fc0"]["indices"])
    assert (new_idx != idx).any() and (np.diff(new_idx, axis=1) > 0).all()


def _growth_and_dense_grads(net, variables, x, y):
    return jax.jit(lambda v: (T.growth_inputs(net.apply, v, _xent, x, y),
                              T.dense_weight_grads(net.apply, v, _xent, x, y)))(variables)


def test_growth_inputs_factor_the_dense_weight_gradients():
    net = _Net()
    x, y = _batch(0)
    variables = jax.jit(net.init)(jax.random.key(0), x)
    growth, dense = _growth_and_dense_grads(net, variables, x, y)
    assert list(growth) == ["fc0", "fc1"]  # the layers' order, as the sparsity tree's
    for name, n_in in (("fc0", D_IN), ("fc1", 32)):
        assert growth[name].x.shape == (32, n_in) and growth[name].dy.shape[0] == 32
        np.testing.assert_allclose(T.weight_grad(growth[name].x, growth[name].dy),
                                   dense[name]["kernel"], rtol=1e-5, atol=1e-6)
    # The collections are only there when asked for: a plain apply is unchanged.
    plain, asked = jax.jit(lambda v: (net.apply(v, x),
                                      net.apply(v, x, mutable=["growth_x"])[0]))(variables)
    np.testing.assert_array_equal(plain, asked)


@pytest.mark.slow
@pytest.mark.parametrize("ablation", [False, True])
def test_growth_inputs_update_equals_the_dense_gradient_update(ablation):
    net = _PaddedNet(12) if ablation else _Net()
    x, y = _batch(0)
    variables = jax.jit(net.init)(jax.random.key(0), x)
    # Blocked growth (GrowthInputs, growth_block=5: with ablation the blocked saliency
    # passes too) vs the whole-layer reference (dense gradients; with ablation also
    # GrowthInputs multiplied out whole under selection="dense").
    txs = {selection: T.srigl_condensed(
        lenient(optax.adam(3e-2)), key=jax.random.key(1), end_step=40, update_every=1,
        growth_block=5, ablation=ablation, gamma_sal=0.9, selection=selection)
        for selection in ("slots", "dense")}
    fan = T.constant_fan(variables["sparsity"], {"fc0": 6, "fc1": 4}) if ablation else None
    state = txs["slots"].init(variables["params"], variables["sparsity"], fan)

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def update(params, state, fn, selection):
        v = {"params": params, "sparsity": T.get_indices(state)}
        g = jax.grad(lambda p: _xent(net.apply({**v, "params": p}, x), y))(params)
        return txs[selection].step(g, state, params,
                                   dense_grads=lambda: fn(net.apply, v, _xent, x, y),
                                   topology="update")

    runs = [(T.growth_inputs, "slots"), (T.dense_weight_grads, "slots")]
    if ablation:
        runs.append((T.growth_inputs, "dense"))
    (p_b, s_b), *refs = [update(variables["params"], state, *run) for run in runs]
    for p_d, s_d in refs:
        jax.tree.map(np.testing.assert_array_equal, s_b.indices, s_d.indices)
        jax.tree.map(np.testing.assert_array_equal, p_b, p_d)
        if ablation:
            jax.tree.map(np.testing.assert_array_equal, s_b.fan, s_d.fan)
    assert (np.asarray(s_b.indices["fc0"]["indices"])
            != np.asarray(variables["sparsity"]["fc0"]["indices"])).any()
    if ablation:  # gamma_sal=0.9: the rule ablated neurons
        assert (np.asarray(s_b.fan["fc0"]["indices"]) == 0).any()


class _PaddedNet(nn.Module):
    capacity: int | None = None

    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(T.CondensedTrainDense(32, k=6, capacity=self.capacity, name="fc0")(x))
        return T.CondensedTrainDense(D_OUT, k=4, capacity=self.capacity and 8, name="fc1")(x)


def test_flax_layer_with_capacity_is_the_padded_layout():
    x, _ = _batch(0)
    plain = jax.jit(_Net().init)(jax.random.key(0), x)
    padded = jax.jit(_PaddedNet(12).init)(jax.random.key(0), x)
    want_p, want_i, want_f = T.pad_condensed(plain["params"], plain["sparsity"],
                                             {"fc0": 12, "fc1": 8}, {"fc0": D_IN, "fc1": 32})
    for name in ("fc0", "fc1"):
        np.testing.assert_array_equal(padded["params"][name]["values"], want_p[name]["values"])
        np.testing.assert_array_equal(padded["sparsity"][name]["indices"],
                                      want_i[name]["indices"])
    fan = T.constant_fan(padded["sparsity"], {"fc0": 6, "fc1": 4})
    jax.tree.map(np.testing.assert_array_equal, fan, want_f)
    np.testing.assert_allclose(_PaddedNet(12).apply(padded, x), _Net().apply(plain, x),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"fc1: k=5 must be in \[1, 4\]"):
        T.constant_fan(plain["sparsity"], 5)


@pytest.mark.slow
def test_flax_layer_with_capacity_trains_with_ablation():
    net = _PaddedNet(12)
    x, y = _batch(0)
    variables = jax.jit(net.init)(jax.random.key(0), x)
    tx = T.srigl_condensed(lenient(optax.adam(3e-2)), key=jax.random.key(1), end_step=40,
                           update_every=5, ablation=True, gamma_sal=0.9)
    params = variables["params"]
    state = tx.init(params, variables["sparsity"],
                    T.constant_fan(variables["sparsity"], {"fc0": 6, "fc1": 4}))

    @jax.jit
    def step(params, state):
        v = {"params": params, "sparsity": T.get_indices(state)}
        g = jax.grad(lambda p: _xent(net.apply({**v, "params": p}, x), y))(params)
        return tx.step(g, state, params, dense_grads=lambda: T.dense_weight_grads(
            net.apply, v, _xent, x, y))

    first = float(_xent(net.apply(variables, x), y))
    for _ in range(20):
        params, state = step(params, state)
    final = {"params": params, "sparsity": T.get_indices(state)}
    assert float(_xent(net.apply(final, x), y)) < 0.7 * first
    fan = np.asarray(state.fan["fc0"]["indices"])
    assert (fan == 0).any() and fan.max() > 6  # ablated neurons, survivors grew to k' > k0
    assert (np.asarray(state.fan["fc1"]["indices"]) == 4).all()  # output layer: no ablation


def test_flax_layer_bad_configuration():
    x = jnp.ones((2, 10))
    with pytest.raises(ValueError, match=r"fan-in k=11 must be in \[1, n_in=10\]"):
        T.CondensedTrainDense(4, k=11).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="index dtype int8 cannot index n_in=300"):
        T.CondensedTrainDense(4, k=3, index_dtype=jnp.int8).init(
            jax.random.key(0), jnp.ones((2, 300)))
    with pytest.raises(ValueError, match=r"capacity=11 must be in \[k=3, n_in=10\]"):
        T.CondensedTrainDense(4, k=3, capacity=11).init(jax.random.key(0), x)


@pytest.mark.slow
def test_benchmark_script_prints_a_well_formed_row(capsys):
    from experiments.benchmarks import condensed_training as bench

    with jax.numpy_dtype_promotion("standard"):
        bench.main(["--sizes", "40", "32", "8", "--batches", "4", "--sparsities", "0.75",
                    "--repeats", "1", "--seconds", "0.01", "--update-every", "5"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4 ")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "75%" and cells[6].endswith("x") and float(cells[7][:-1]) > 0
    # params + Adam state of the condensed model: about the density of the dense one's.
    mem, density = float(cells[8]), float(cells[9])
    assert density == pytest.approx(0.25, abs=0.01) and density < mem < 1.5 * density
    # The update table: whole-layer growth and each growth block, one row each.
    with jax.numpy_dtype_promotion("standard"):
        bench.main(["--sizes", "40", "32", "8", "--batches", "4", "--sparsities", "0.75",
                    "--repeats", "1", "--seconds", "0.01", "--update-table", "5"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4 ")]
    assert [r.split("|")[3].strip() for r in rows] == ["whole (dense grads)",
                                                       "blocked, 5 neurons"]
    assert rows[0].rstrip().endswith("| 1.00 |")
    # The same table for SRigL with neuron ablation.
    with jax.numpy_dtype_promotion("standard"):
        bench.main(["--sizes", "40", "32", "8", "--batches", "4", "--sparsities", "0.75",
                    "--repeats", "1", "--seconds", "0.01", "--update-table", "5", "--ablation"])
    out = capsys.readouterr().out
    assert "SRigL with neuron ablation" in out
    rows = [line for line in out.splitlines() if line.startswith("| 4 ")]
    assert [r.split("|")[3].strip() for r in rows] == ["whole (dense grads)",
                                                       "blocked, 5 neurons"]


@pytest.mark.slow
def test_without_a_compiler_training_falls_back_to_the_reference(tmp_path):
    import os
    import subprocess
    import sys

    code = """
import functools
import warnings
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from jaxsparse.condensed import training as T
from jaxsparse.condensed.kernels import train_cpu
assert not train_cpu.available()
x = jnp.ones((3, 8)); v = jnp.arange(8.0).reshape(4, 2) / 8
i = jnp.asarray([[0, 1], [2, 3], [4, 5], [6, 7]], jnp.int8)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    g = jax.grad(lambda v: T.condensed_linear(x, v, i).sum())(v)
assert any("unavailable" in str(m.message) for m in w), [str(m.message) for m in w]
np.testing.assert_allclose(g, np.full((4, 2), 3.0))
print("fallback ok")
"""
    env = {**os.environ, "CXX": "", "JAXSPARSE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fallback ok" in out.stdout


def test_forward_and_training_libraries_both_load_in_one_process():
    # Each library is loaded from an in-memory file named /proc/self/fd/N; when the first
    # one's descriptor was closed, the second got the same N and the loader handed back the
    # first library (undefined symbol JaxsparseCondensedDvalues: silent jnp fallback).
    import subprocess
    import sys

    from jaxsparse.condensed.kernels import cpu

    if cpu.find_compiler() is None:
        pytest.skip("no C++ compiler")
    code = ("from jaxsparse.condensed.kernels import cpu, train_cpu\n"
            "assert cpu.available(), cpu._state['error']\n"
            "assert train_cpu.available(), train_cpu.unavailable_reason()\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
