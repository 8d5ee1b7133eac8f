"""jaxsparse.checkpoint: bit-packed masks that keep shape and sharding; Orbax save/restore
onto another mesh; refusals that name the leaf or file and overwrite nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsparse import checkpoint as ckpt_lib
from jaxsparse.sharding import make_mesh

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")


def _tree(mesh, seed=0):
    """A param tree, its masks and a typed key, sharded on ``mesh`` (data, model)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(k1, (16, 64))
    v = jax.random.normal(k2, (64, 24))
    specs = {"a": P(None, "model"), "b": P("model", None)}
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    params = {"a": put(w, specs["a"]), "b": put(v, specs["b"]), "bias": put(jnp.ones(24), P())}
    masks = {"a": put(w > 0.3, specs["a"]), "b": put(v > 0.0, specs["b"]), "bias": None}
    return {"params": params, "masks": masks, "key": jax.random.key(seed + 7),
            "step": jnp.int32(3)}


def test_pack_unpack_keeps_shape_and_sharding():
    mesh = make_mesh((4, 2), ("data", "model"))
    t = _tree(mesh)
    packed = ckpt_lib.pack_masks(t["masks"])
    assert packed["bias"] is None
    assert packed["a"].dtype == jnp.uint8 and packed["a"].shape == (16, 8)
    assert packed["b"].shape == (64, 3)
    # 1 bit per weight (plus padding of each row to whole bytes: 24 -> 3 bytes, none here).
    assert packed["a"].nbytes * 8 == t["masks"]["a"].size
    assert packed["b"].nbytes * 8 == t["masks"]["b"].size
    # Shards of 32 columns pack to whole bytes: the model axis stays sharded; the rows of
    # "b" keep their sharding.
    assert packed["a"].sharding.spec == P(None, "model")
    assert packed["b"].sharding.spec == P("model", None)
    out = ckpt_lib.unpack_masks(packed, t["masks"])
    for k in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(t["masks"][k]))
        assert out[k].dtype == jnp.bool_
        assert out[k].sharding.is_equivalent_to(t["masks"][k].sharding, 2)
    # A last axis whose shards are not whole bytes is packed replicated, unpacked sharded.
    odd = jax.device_put(jnp.arange(4 * 12).reshape(4, 12) % 3 == 0,
                         NamedSharding(mesh, P(None, "model")))
    p = ckpt_lib.pack_masks(odd)
    assert p.shape == (4, 2) and p.sharding.spec == P(None, None)
    back = ckpt_lib.unpack_masks(p, odd)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(odd))
    assert back.sharding.spec == P(None, "model")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"packed mask \['a'\]"):
        ckpt_lib.unpack_masks({"a": packed["b"], "b": packed["b"], "bias": None},
                              t["masks"])


def test_save_restore_onto_another_mesh_and_refusals(tmp_path):
    mesh42 = make_mesh((4, 2), ("data", "model"))
    tree = _tree(mesh42)
    ck = ckpt_lib.Checkpointer(tmp_path / "ck")
    ck.save(3, tree)
    # Masks on disk: <= 1 bit per weight plus row padding (bytes of the packed arrays).
    manifest = ck.read_manifest(3)
    assert [e.get("packed", False) for e in manifest["leaves"]].count(True) == 2
    assert manifest["process_count"] == 1 and manifest["mesh"]["shape"] == [4, 2]

    mesh81 = make_mesh((8, 1), ("data", "model"))
    target = _tree(mesh81, seed=1)  # other values, other mesh: the checkpoint must win
    restored = ck.restore(target)
    for path, a in jax.tree_util.tree_leaves_with_path(tree):
        b = dict(jax.tree_util.tree_leaves_with_path(restored))[path]
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored["masks"]["b"].sharding.mesh.shape["data"] == 8
    assert restored["params"]["a"].sharding == target["params"]["a"].sharding
    # Abstract targets work too (nothing materialised before the restore).
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    again = ck.restore(abstract, step=3)
    np.testing.assert_array_equal(np.asarray(again["masks"]["a"]),
                                  np.asarray(tree["masks"]["a"]))

    with pytest.raises(ckpt_lib.CheckpointError, match="step 3 already exists"):
        ck.save(3, target)
    np.testing.assert_array_equal(np.asarray(ck.restore(target)["params"]["a"]),
                                  np.asarray(tree["params"]["a"]))  # not overwritten

    other = dict(target, params=dict(target["params"], a=jnp.zeros((16, 32))))
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=r"3/manifest: leaf .*\['params'\]\['a'\] float32\[16, 64\] in the "
                             r"checkpoint but .*\[16, 32\]"):
        ck.restore(other)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"the checkpoint has 7 leaves, the "
                                                       r"target 6 \(first unmatched: \[.step.\]\)"):
        ck.restore({k: v for k, v in target.items() if k != "step"})
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=r"3/manifest: saved with mesh=.*\[4, 2\].*allow_reshard=True"):
        ck.restore(target, allow_reshard=False)
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint step 9"):
        ck.restore(target, step=9)
    ck.close()
