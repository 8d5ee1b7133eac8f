"""map_groups / map_layers: reading layers in place gives what copying them gives, and
copies nothing."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from jaxsparse import layermap

SHAPE = (64, 48)


def _params():
    # One group of three same-shaped kernels (a group of one is always read directly).
    keys = jax.random.split(jax.random.key(3), 3)
    return {f"dense_{i}": {"kernel": jax.random.normal(k, SHAPE), "bias": jnp.zeros(SHAPE[-1])}
            for i, k in enumerate(keys)}


# SET shares RigL's per-layer rule (drop_and_grow); these are the three ways of reading.
FACTORIES = {
    "rigl": lambda: jaxsparse.rigl(optax.sgd(0.05, momentum=0.9), 0.8, key=jax.random.key(1),
                                   end_step=100, update_every=2),
    "srigl": lambda: jaxsparse.srigl(optax.sgd(0.05, momentum=0.9), 0.8, key=jax.random.key(1),
                                     end_step=100, update_every=2, gamma_sal=0.5),
    "snfs": lambda: jaxsparse.snfs(optax.sgd(0.05, momentum=0.9), 0.8, key=jax.random.key(1),
                                   end_step=100, update_every=2),
}


def _run(factory, steps=5):
    tx = factory()
    params, state = jaxsparse.init_masked(tx, _params())

    @jax.jit
    def step(params, state, key):
        # Gradients of a fixed random quadratic: every layer's topology moves.
        grads = jax.tree.map(lambda p: p - jax.random.normal(key, p.shape), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        params, state = step(params, state, jax.random.key(100 + t))
    return params, jaxsparse.get_masks(state)


@pytest.mark.parametrize("name", [
    "rigl", *(pytest.param(n, marks=pytest.mark.slow) for n in ("snfs", "srigl"))])
def test_reading_layers_in_place_equals_copying_them(name, monkeypatch):
    # The test layers are below the in-place threshold; with it at 0 the same rules read
    # every layer in place. Masks and params must be equal, bit for bit.
    copied = _run(FACTORIES[name])
    monkeypatch.setattr(layermap, "READ_IN_PLACE_MIN_SIZE", 0)
    in_place = _run(FACTORIES[name])
    changed = any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(copied[1]), jax.tree.leaves(jaxsparse.get_masks(
            FACTORIES[name]().init(_params())))))
    assert changed  # the topology did move
    for a, b in zip(jax.tree.leaves(copied), jax.tree.leaves(in_place), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _temp_bytes(read: bool, monkeypatch) -> int:
    monkeypatch.setattr(layermap, "READ_IN_PLACE_MIN_SIZE", 0)
    layers = [jnp.full((256, 256), float(i)) for i in range(4)]

    def total(layers):
        if read:
            fn = lambda rd, c: rd(lambda x: jnp.sum(jnp.abs(x) * c))  # noqa: E731
        else:
            fn = lambda x, c: jnp.sum(jnp.abs(x) * c)  # noqa: E731
        groups = layermap.map_groups(fn, layers, [jnp.float32(2.0)] * 4, read=read)
        return sum(jnp.sum(s) for _, s in groups)

    compiled = jax.jit(total).lower(layers).compile()
    assert float(compiled(layers)) == 2.0 * 256 * 256 * (0 + 1 + 2 + 3)
    return compiled.memory_analysis().temp_size_in_bytes


def test_reading_in_place_copies_no_layer(monkeypatch):
    layer_bytes = 256 * 256 * 4
    assert _temp_bytes(read=False, monkeypatch=monkeypatch) >= layer_bytes  # a copy
    assert _temp_bytes(read=True, monkeypatch=monkeypatch) < layer_bytes // 16


def test_map_layers_equals_a_loop_over_layers():
    # Two groups of same-shaped layers (one of them interleaved) and a group of one.
    layers = ([jnp.arange(12.0).reshape(3, 4) * i for i in range(3)] + [jnp.ones((2, 5))]
              + [jnp.full((3, 4), -1.0)])
    consts = [jnp.float32(i) for i in range(len(layers))]

    def fn(x, c):
        return {"scaled": x * c, "total": jnp.sum(x), "packed": jnp.packbits(x > c, axis=-1)}

    want = [fn(x, c) for x, c in zip(layers, consts)]
    for got in (layermap.map_layers(fn, layers, consts),
                jax.jit(lambda ls: layermap.map_layers(fn, ls, consts))(layers)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("stack", [False, True])
def test_each_group_traces_the_layer_function_once(stack):
    # The loops take their output shapes from the one trace they replay: a second trace
    # just for the shapes would double the Python time of every rule at every compile.
    calls = []

    def fn(read, c):
        calls.append(None)
        return read(lambda x: jnp.sum(x) * c)

    layers = [jnp.full((3, 4), float(i)) for i in range(5)] + [jnp.ones((2, 2))]
    members = []

    def run(layers):
        groups = layermap.map_groups(fn, layers, [jnp.float32(2.0)] * 6, read=True,
                                     stack=stack)
        members.extend(i for m, _ in groups for i in m)
        return [jnp.reshape(jnp.asarray(out), -1) for _, out in groups]

    outs = jax.jit(run)(layers)
    assert len(calls) == 2  # two groups, one trace each
    got = dict(zip(members, np.concatenate([np.asarray(o) for o in outs]).tolist()))
    assert got == {i: 24.0 * i for i in range(5)} | {5: 8.0}


@pytest.mark.parametrize("n", [6, 23])
def test_nested_rotating_loops_keep_the_layer_order(n):
    # 6 layers: two loops of 3; 23 layers: 4 x 6 turns, the last one padding.
    assert layermap.loop_shape(n) == {6: (2, 3), 23: (4, 6)}[n]
    layers = [jnp.arange(12.0).reshape(3, 4) - i for i in range(n)]
    consts = [jnp.float32(i % 5) for i in range(n)]

    def fn(x, c):
        return {"packed": jnp.packbits(x > c, axis=-1), "total": jnp.sum(x) * c}

    got = jax.jit(lambda ls: layermap.map_layers(fn, ls, consts))(layers)
    assert len(got) == n
    for g, x, c in zip(got, layers, consts):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(fn(x, c)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loop_shape_bounds_the_moves():
    for n in range(1, 300):
        outer, inner = layermap.loop_shape(n)
        assert outer * inner >= n and outer * inner - n < inner
        moves = outer * inner * inner + (outer * outer * inner if outer > 1 else 0)
        assert moves <= n * n
        assert moves <= 2.5 * n ** 1.5 + 2 * n  # about 2 n**1.5 (padding adds a little)


def _packed_outputs_temp(n: int) -> int:
    layers = [jnp.full((128, 128), float(i)) for i in range(n)]

    def packed(layers):
        return layermap.map_layers(lambda x, c: jnp.packbits(x > c, axis=-1), layers,
                                   [jnp.float32(1.0)] * n)

    return jax.jit(packed).lower(layers).compile().memory_analysis().temp_size_in_bytes


def test_map_layers_temporaries_do_not_grow_with_depth():
    # Each layer's output is its own buffer: no stack of all the outputs, which would add
    # one output (128 x 16 bytes) per layer to the temporaries (20 more layers: 40 KiB). The
    # nested loops hold at most their inner loop's buffers besides (24 layers: 4 x 6).
    output_bytes = 128 * 16
    outer, inner = layermap.loop_shape(24)
    assert (outer, inner) == (4, 6) and layermap.loop_shape(4) == (1, 4)
    assert _packed_outputs_temp(24) - _packed_outputs_temp(4) < inner * output_bytes


def _update_temp_per_weight(tx, depth, shape=(512, 512)):
    """XLA temporaries of ``tx``'s update step (state donated) on ``depth`` layers of
    ``shape``, in bytes per weight of one layer."""
    params = {f"layer_{i:02d}": {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}
              for i in range(depth)}
    state = jax.eval_shape(tx.init, params)

    def step(p, s, g):
        updates, s = tx.update(g, s, p, topology_update=True)
        return optax.apply_updates(p, updates), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes / np.prod(shape)


def test_snfs_holds_no_kept_masks_between_its_passes():
    # SNFS drops in one pass over the layers and grows in another; between them it keeps a
    # threshold per layer (three scalars), not a packed mask of the kept weights. What grows
    # with depth is then one packed copy of the new masks (1/8 byte per weight, shared by
    # every algorithm): 4 -> 16 layers add 12 / 8 = 1.5 bytes per weight of a layer, where
    # the kept masks added as much again (3.0).
    tx = jaxsparse.snfs(optax.sgd(0.1), 0.9, key=jax.random.key(0), end_step=100)
    four = _update_temp_per_weight(tx, 4)
    growth = _update_temp_per_weight(tx, 16) - four
    assert growth < 12 / 8 + 0.75, growth
    # At 4 layers: one layer's 4-byte keys and packed masks. The sum of the layer's
    # |momentum| waits for its drop threshold (XLA:CPU stores a large sum's summand, 4
    # bytes, which lived beside the keys: 8.7 bytes).
    assert four < 4 + 4 / 8 + 0.5, four


def test_initial_masks_are_the_per_layer_draws():
    # draw_masks runs same-shaped layers in one loop: layer j still gets exactly the mask
    # drawn for it alone from fold_in(key, j) with its count (a dense and a bias leaf
    # skipped, two groups interleaved).
    from jaxsparse.algorithms.common import draw_masks
    from jaxsparse.topology import random_mask

    params = {"a": jnp.ones((20, 30)), "b": jnp.ones((7,)), "c": jnp.ones((8, 5)),
              "d": jnp.ones((20, 30)), "e": jnp.ones((8, 5)), "f": jnp.ones((20, 30))}
    counts = {"a": 100, "b": 3, "c": 40, "d": 599, "e": 9, "f": 600}  # c, f: dense
    key = jax.random.key(7)
    got = draw_masks(params, counts, random_mask, key)
    sparse = ["a", "b", "d", "e"]
    assert got["c"] is None and got["f"] is None
    for j, name in enumerate(sparse):
        want = random_mask(jax.random.fold_in(key, j), params[name].shape, counts[name])
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want), err_msg=name)
        assert int(np.sum(got[name])) == counts[name]


@pytest.mark.parametrize("name", ["rigl", "srigl"])
def test_initial_draw_is_traced_once_per_shape(name):
    # 4 and 12 same-shaped layers: the init program holds the same loops (a draw per
    # layer, unrolled, compiled a selection per layer: 15 s at 96 layers).
    def n_loops(depth):
        params = {f"dense_{i}": {"kernel": jnp.ones(SHAPE)} for i in range(depth)}
        jaxpr = jax.make_jaxpr(FACTORIES[name]().init)(params)
        count = 0

        def walk(j):
            nonlocal count
            for e in j.eqns:
                count += e.primitive.name == "while"
                for sub in jax.extend.core.jaxprs_in_params(e.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return count

    assert 0 < n_loops(4) == n_loops(12)


def test_global_magnitude_ranking_holds_one_layer_at_a_time():
    # One ranking over every layer, each layer's keys computed where it lives, pass by
    # pass: no keys are stored (4 bytes per weight of every layer before: 4 -> 16 layers
    # added 48 per weight of a layer). What grows with depth is packed masks: the new ones
    # (every algorithm holds them) and, when the step donates its state, a copy XLA makes
    # of the old ones, which the passes' loops read while the output aliases them
    # (12 / 8 bytes per weight of a layer each).
    tx = jaxsparse.magnitude_pruning(optax.sgd(0.1), 0.9, end_step=100, ranking="global")
    four = _update_temp_per_weight(tx, 4)
    assert _update_temp_per_weight(tx, 16) - four < 2 * 12 / 8 + 0.75
    assert four < 1.0, four
