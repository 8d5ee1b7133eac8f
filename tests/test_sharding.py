"""Sharding: the same train step on a Mesh of 8 simulated CPU devices (data x model) gives
the same masks and params as on one device; masks and per-weight state are placed like
their params (jaxsparse.sharding.like_params / state_shardings); bad meshes are refused
naming the leaf."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse
from jaxsparse import sharding as sh
from jaxsparse.masks import map_masked
from tests.helpers import lenient, make_step, tiny_batch, tiny_params

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

SPEC = {
    "dense0": {"kernel": P(None, "model"), "bias": P("model")},
    "norm": {"scale": P("model")},
    "dense1": {"kernel": P("model", None), "bias": P()},
}


def _shardings(mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), SPEC,
                        is_leaf=lambda s: isinstance(s, P))


def _make(algo):
    key = jax.random.key(0)
    if algo == "rigl":
        return jaxsparse.rigl(lenient(optax.adam(1e-2)), 0.8, key=key, end_step=12,
                              update_every=3)
    if algo == "snfs":
        return jaxsparse.snfs(lenient(optax.adam(1e-2)), 0.8, key=key, end_step=12,
                              update_every=3)
    # Global ranking: one threshold across all layers, i.e. across shards of every layer.
    return jaxsparse.magnitude_pruning(lenient(optax.adam(1e-2)), 0.8, end_step=9,
                                       update_every=3, ranking="global")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rigl", "snfs", "magnitude"])
def test_sharded_step_matches_single_device(algo):
    mesh = sh.make_mesh((4, 2), ("data", "model"))
    shardings = _shardings(mesh)

    def train(sharded):
        tx = _make(algo)
        params = tiny_params()
        state = tx.init(params)
        params = jaxsparse.apply_masks(params, jaxsparse.get_masks(state))
        if sharded:
            params = jax.device_put(params, shardings)
            put = lambda m, s: jax.device_put(m, s)  # noqa: E731
            state = state._replace(
                masks=map_masked(put, state.masks, shardings, dense=lambda s: None),
                ever_active=None if state.ever_active is None else map_masked(
                    put, state.ever_active, shardings, dense=lambda s: None),
            )
        step = jax.jit(make_step(tx))
        for t in range(14):
            x, y = tiny_batch(t)
            if sharded:
                x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
                y = jax.device_put(y, NamedSharding(mesh, P("data")))
            params, state, _ = step(params, state, x, y)
        return params, state

    p1, s1 = train(False)
    p8, s8 = train(True)
    # The sharded run stays sharded as laid out: XLA's propagation keeps every param and
    # mask on its param's sharding through 14 steps and 4 topology updates.
    for path, s in jax.tree_util.tree_leaves_with_path(shardings):
        p = dict(jax.tree_util.tree_leaves_with_path(p8))[path]
        assert p.sharding.is_equivalent_to(s, p.ndim), (path, p.sharding)
    for path, m in jax.tree_util.tree_leaves_with_path(jaxsparse.get_masks(s8)):
        s = dict(jax.tree_util.tree_leaves_with_path(shardings))[path]
        assert m.sharding.is_equivalent_to(s, m.ndim), (path, m.sharding)
    m1, m8 = jaxsparse.get_masks(s1), jaxsparse.get_masks(s8)
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m8)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ["rigl", "snfs"])
def test_init_places_masks_and_state_like_params(algo):
    mesh = sh.make_mesh((4, 2), ("data", "model"))
    params = jax.device_put(tiny_params(), _shardings(mesh))
    state = _make(algo).init(params)
    sparse = jaxsparse.transform.get_sparse_state(state)
    by_path = dict(jax.tree_util.tree_leaves_with_path(params))
    # Masks and the ITOP union are bit-packed: their bits get the param's sharding adapted
    # to the packed last axis.
    for tree in [sparse.masks, sparse.ever_active]:
        n = 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            p = by_path[path[:-1]]  # the PackedMask node adds one key (its bits)
            want = sh.packed_sharding(p.sharding, p.shape)
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, leaf.sharding)
            n += 1
        assert n == 2
    if algo == "snfs":
        n = 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(sparse.extra):
            want = by_path[path].sharding
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, leaf.sharding)
            n += 1
        assert n == 2


def test_like_params_concrete_jit_and_none_leaves():
    mesh = sh.make_mesh((4, 2), ("data", "model"))
    params = jax.device_put(tiny_params(), _shardings(mesh))
    masks = jax.tree.map(lambda p: p > 0, tiny_params())
    masks["dense0"]["bias"] = None
    masks["norm"]["scale"] = None
    masks["dense1"]["kernel"] = jnp.ones((3, 3), bool)  # not param-shaped: left alone
    out = sh.like_params(masks, params)
    assert out["dense0"]["bias"] is None and out["norm"]["scale"] is None
    assert out["dense0"]["kernel"].sharding == params["dense0"]["kernel"].sharding
    assert out["dense1"]["bias"].sharding == params["dense1"]["bias"].sharding
    assert out["dense1"]["kernel"].sharding == masks["dense1"]["kernel"].sharding
    np.testing.assert_array_equal(np.asarray(out["dense0"]["kernel"]),
                                  np.asarray(masks["dense0"]["kernel"]))

    # Under jit with explicit mesh axes the params' types carry their shardings.
    emesh = sh.make_mesh((4, 2), ("data", "model"), explicit=True)
    eparams = jax.device_put(tiny_params(), _shardings(emesh))
    fresh = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), tiny_params())
    with jax.set_mesh(emesh):
        placed = jax.jit(lambda m, p: sh.like_params(jax.tree.map(jnp.logical_not, m), p))(
            fresh, eparams)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(eparams)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    assert placed["dense0"]["kernel"].sharding.spec == P(None, "model")
    # Single-device params: nothing to follow.
    plain = tiny_params()
    assert sh.like_params(masks, plain)["dense0"]["kernel"] is masks["dense0"]["kernel"]


def test_state_shardings_follow_params_through_nesting():
    mesh = sh.make_mesh((4, 2), ("data", "model"))
    shardings = _shardings(mesh)
    tx = optax.chain(optax.clip(1.0), _make("snfs"))
    abstract = jax.eval_shape(tx.init, tiny_params())
    rep = NamedSharding(mesh, P())
    out = sh.state_shardings(abstract, tiny_params(), shardings, rep)
    sparse = out[1]
    assert sparse.masks["dense0"]["kernel"].bits == sh.packed_sharding(
        shardings["dense0"]["kernel"], tiny_params()["dense0"]["kernel"].shape)
    assert sparse.masks["dense0"]["bias"] is None
    assert sparse.extra["dense1"]["kernel"] == shardings["dense1"]["kernel"]
    assert sparse.inner_state[0].mu["norm"]["scale"] == shardings["norm"]["scale"]
    assert sparse.count == rep and sparse.key == rep


def test_mesh_and_divisibility_errors_name_the_culprit():
    with pytest.raises(ValueError, match=r"mesh shape \(3, 3\) needs 9 devices but 8"):
        sh.make_mesh((3, 3), ("data", "model"))
    mesh = sh.make_mesh((2, 4), ("data", "model"))
    rules = (("embed", None), ("mlp", "model"))
    logical = {"fc": {"kernel": P("embed", "mlp")}}
    shapes = {"fc": {"kernel": jax.ShapeDtypeStruct((8, 6), jnp.float32)}}
    with pytest.raises(ValueError, match=r"leaf 'fc/kernel': dimension 1 of shape \(8, 6\) "
                                         r"is not divisible by mesh axes \('model',\) of "
                                         r"size 4"):
        sh.logical_shardings(logical, mesh, rules, shapes=shapes)
    ok = sh.logical_shardings(logical, mesh, rules,
                              shapes={"fc": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)}})
    assert ok["fc"]["kernel"].spec == P(None, "model")


@jax.tree_util.register_pytree_node_class
class _Packed:
    """A bit-packed mask node like jaxsparse.bitmask.PackedMask (bits + static shape)."""

    def __init__(self, bits, shape):
        self.bits, self.shape = bits, tuple(shape)

    def tree_flatten(self):
        return (self.bits,), self.shape

    @classmethod
    def tree_unflatten(cls, shape, children):
        return cls(children[0], shape)


def test_packed_masks_follow_their_params():
    mesh = sh.make_mesh((4, 2), ("data", "model"))
    shardings = _shardings(mesh)
    raw = {"dense0": {"kernel": jnp.zeros((20, 16), bool), "bias": None},
           "norm": {"scale": None}, "dense1": {"kernel": jnp.zeros((16, 8), bool), "bias": None}}
    packed = jax.tree.map(lambda m: None if m is None else _Packed(jnp.packbits(m, axis=-1),
                                                                   m.shape),
                          raw, is_leaf=lambda x: x is None)
    params = jax.device_put(tiny_params(), shardings)
    out = sh.like_params(packed, params)
    # 16 columns over 2 shards = whole bytes per shard: stays sharded; 8 rows split 2 ways
    # on dense1's first axis: kept.
    assert out["dense0"]["kernel"].bits.sharding.spec == P(None, "model")
    assert out["dense1"]["kernel"].bits.sharding.spec == P("model", None)
    assert out["dense0"]["kernel"].shape == (20, 16)
    rep = NamedSharding(mesh, P())
    st = sh.state_shardings({"masks": packed}, tiny_params(), shardings, rep)
    assert st["masks"]["dense0"]["kernel"].bits.spec == P(None, "model")
    odd = sh.packed_sharding(NamedSharding(mesh, P(None, "model")), (4, 12))
    assert odd.spec == P(None, None)  # 6 columns per shard: not whole bytes


def _explicit_case():
    """Two kernels of one shape sharded differently (rows vs columns), a third shape and a
    dense bias; synthetic gradients, one per step."""
    k = jax.random.split(jax.random.key(3), 3)
    params = {"q": {"kernel": jax.random.normal(k[0], (16, 32))},
              "o": {"kernel": jax.random.normal(k[1], (16, 32))},
              "mlp": {"kernel": jax.random.normal(k[2], (32, 16)), "bias": jnp.zeros(16)}}
    spec = {"q": {"kernel": P(None, "model")}, "o": {"kernel": P("model", None)},
            "mlp": {"kernel": P("data", "model"), "bias": P("model")}}
    grads = [jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.fold_in(
        jax.random.key(t), p.size), p.shape), params) for t in range(7)]
    return params, spec, grads


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rigl", "srigl", "snfs", "magnitude"])
def test_explicit_mesh_step_matches_single_device(algo):
    # On a mesh with explicit axes (shardings in the types) the topology update runs with
    # automatic axes (jax.sharding.auto_axes): same masks as one device, params and state
    # keep their shardings, layers of one shape but different shardings included.
    key = jax.random.key(0)
    inner = optax.sgd(0.1, momentum=0.9)
    tx = {"rigl": lambda: jaxsparse.rigl(inner, 0.8, key=key, end_step=6, update_every=2),
          "srigl": lambda: jaxsparse.srigl(inner, 0.8, key=key, end_step=6, update_every=2),
          "snfs": lambda: jaxsparse.snfs(inner, 0.8, key=key, end_step=6, update_every=2),
          "magnitude": lambda: jaxsparse.magnitude_pruning(
              inner, 0.8, end_step=6, update_every=2, ranking="global")}[algo]()
    params, spec, grads = _explicit_case()

    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    def train(mesh):
        p = params
        if mesh is not None:
            shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec,
                                     is_leaf=lambda s: isinstance(s, P))
            p = jax.device_put(p, shardings)
        p, state = jaxsparse.init_masked(tx, p)
        gs = [g if mesh is None else jax.device_put(g, shardings) for g in grads]
        run = jax.jit(step).lower(p, state, gs[0]).compile()
        for g in gs:
            p, state = run(p, state, g)
        return p, state, run.as_text()

    p1, s1, _ = train(None)
    emesh = sh.make_mesh((4, 2), ("data", "model"), explicit=True)
    with jax.set_mesh(emesh):
        p8, s8, hlo = train(emesh)
    # The plain step (the ENTRY computation) communicates nothing; the update gathers no
    # whole layer (a layer has 512 entries; per-column counts are gathered).
    start = hlo.index("\nENTRY ")
    assert not re.search(r" (all-gather|all-to-all|collective-permute|all-reduce|"
                         r"reduce-scatter)", hlo[start:hlo.index("\n}\n", start)])
    sizes = [int(np.prod([int(d) for d in m.split(",") if d])) for m in re.findall(
        r"= \w+\[([\d,]*)\]\S* (?:all-gather|all-to-all|collective-permute)", hlo)]
    assert sizes and max(sizes) < 512, sorted(sizes)
    for path, s in jax.tree_util.tree_leaves_with_path(spec, is_leaf=lambda s: isinstance(s, P)):
        leaf = dict(jax.tree_util.tree_leaves_with_path(p8))[path]
        assert leaf.sharding.spec == s, (path, leaf.sharding)
        moment = dict(jax.tree_util.tree_leaves_with_path(
            jaxsparse.transform.get_sparse_state(s8).inner_state[0].trace))[path]
        assert moment.sharding.spec == s, (path, moment.sharding)
    m1, m8 = jaxsparse.get_masks(s1), jaxsparse.get_masks(s8)
    n_changed = 0
    for a, b, m0 in zip(jax.tree.leaves(m1), jax.tree.leaves(m8),
                        jax.tree.leaves(jaxsparse.get_masks(tx.init(params)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        n_changed += int(np.sum(np.asarray(a) != np.asarray(m0)))
    assert n_changed > 0  # the topology did change
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_auto_axes_like_runs_unannotated_code_on_an_explicit_mesh():
    emesh = sh.make_mesh((4, 2), ("data", "model"), explicit=True)
    x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(emesh, P(None, "model")))

    def flat_sum(a, b):  # flattening column shards: explicit mode wants an out_sharding
        return (a.reshape(-1, 1) + b.reshape(-1, 1)).reshape(8, 8)

    with jax.set_mesh(emesh):
        with pytest.raises(Exception, match="reshape"):
            jax.jit(flat_sum)(x, x)
        out = jax.jit(lambda a: sh.auto_axes_like(flat_sum, a, a, a))(x)
        assert out.sharding.spec == P(None, "model")
        np.testing.assert_array_equal(np.asarray(out), 2 * np.arange(64.0).reshape(8, 8))
        with pytest.raises(ValueError, match=r"float32\[3\].*no explicit sharding"):
            jax.jit(lambda a: sh.auto_axes_like(lambda a: a[0, :3], np.zeros(3, np.float32),
                                                a))(x)
    # No explicit sharding among the arguments: a plain call.
    assert sh.auto_axes_like(lambda a: a + 1, None, 1.0) == 2.0
