"""Issue 13 items 4, 10, 11 for condensed inference: no silent clamping on any path, a safe
model file (no pickle, versioned, validated on load), a guarded C++ kernel cache."""

import json
import os
import re
import stat
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse.condensed as C
from jaxsparse.condensed.kernels import cpu
from jaxsparse.condensed.layers import CondensedDense

ROOT = Path(__file__).resolve().parents[1]


def np_mask(rng, n_in, n_out, k, ablate=()):
    mask = np.zeros((n_in, n_out), bool)
    for col in range(n_out):
        if col not in ablate:
            mask[rng.permutation(n_in)[:k], col] = True
    return mask


def layer_and_x(seed=0, n_in=40, n_out=12, k=5, batch=3, dtype=np.float32, group_size=1):
    rng = np.random.default_rng(seed)
    if group_size == 1:
        mask = np_mask(rng, n_in, n_out, k, ablate=(2,))
    else:
        mask = np.repeat(np_mask(rng, n_in, n_out // group_size, k, ablate=(1,)),
                         group_size, axis=1)
    kernel = rng.standard_normal((n_in, n_out)).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype)
    layer = C.condense_layer(kernel, mask, bias, group_size=group_size)
    x = jnp.asarray(rng.standard_normal((batch, n_in)).astype(dtype))
    return layer, x, kernel, mask, bias


# ----------------------------------------------------------------------------- item 4

CONCRETE_IMPLS = ["reference", "xla", "cpu", "triton_interpret"]


@pytest.mark.parametrize("impl", CONCRETE_IMPLS)
def test_every_path_refuses_a_concrete_out_of_range_index(impl):
    layer, x, *_ = layer_and_x()
    for bad_value in (40, -1):
        bad = layer.replace(indices=layer.indices.at[3, 1].set(bad_value))
        with pytest.raises(ValueError, match=rf"indices\[3, 1\] = {bad_value} is out of "
                                             r"range \[0, n_in=40\)"):
            C.condensed_dense(x, bad, impl=impl)


@pytest.mark.parametrize("impl", CONCRETE_IMPLS)
def test_raw_kernel_entry_points_refuse_concrete_bad_indices(impl):
    layer, x, *_ = layer_and_x()
    bad_idx = layer.indices.at[0, 0].set(99)
    with pytest.raises(ValueError, match=r"indices\[0, 0\] = 99 is out of range"):
        C.dispatch.run_kernel(impl, x, layer.values, bad_idx, layer.bias)


@pytest.mark.parametrize("impl", ["reference", "triton_interpret"])
def test_traced_out_of_range_index_gives_nan_never_a_clamped_value(impl):
    layer, x, *_ = layer_and_x()
    bad = layer.replace(indices=layer.indices.at[3, 1].set(40))
    y = jax.jit(lambda x, lyr: C.condensed_dense(x, lyr, impl=impl))(x, bad)
    want = C.condensed_dense(x, layer, impl="reference")
    assert np.isnan(np.asarray(y[:, 3])).all()
    np.testing.assert_allclose(np.delete(np.asarray(y), 3, axis=1),
                               np.delete(np.asarray(want), 3, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu.available(), reason="no C++ compiler")
def test_cpu_kernel_fails_on_a_traced_out_of_range_index():
    layer, x, *_ = layer_and_x()
    bad = layer.replace(indices=layer.indices.at[3, 1].set(-5))
    with pytest.raises(Exception, match=r"index -5 out of range \[0, 40\)"):
        jax.block_until_ready(jax.jit(lambda x, lyr: C.condensed_dense(x, lyr, impl="cpu"))(
            x, bad))


def test_validate_condensed_names_the_bad_field():
    layer, x, *_ = layer_and_x()
    cases = [
        (layer.replace(indices=layer.indices.astype(jnp.float32)), TypeError,
         "indices must be int8, int16 or int32"),
        (layer.replace(indices=layer.indices.astype(jnp.uint8)), TypeError,
         "indices must be int8, int16 or int32, got uint8"),
        (layer.replace(values=layer.values.astype(jnp.int32)), TypeError,
         "x must be float32, bfloat16 or float16, got int32"),
        (layer.replace(bias=layer.bias.astype(jnp.bfloat16)), TypeError, "must share one dtype"),
        (layer.replace(bias=layer.bias[:3]), ValueError, r"bias shape \(3,\)"),
        (layer.replace(neurons=layer.neurons[::-1]), ValueError, "strictly increasing"),
        (layer.replace(neurons=layer.neurons.at[0].set(12)), ValueError,
         r"neurons\[0\] = 12 is out of range \[0, n_out=12\)"),
        (layer.replace(neurons=layer.neurons.astype(jnp.int16)), ValueError, "neurons must be"),
        (layer.replace(ablated_bias=layer.ablated_bias[:5]), ValueError, "ablated_bias must be"),
        (layer.replace(n_in=-1), ValueError, "n_in must be a non-negative int"),
        (layer.replace(group_size=5), ValueError, "group_size=5 does not divide n_active=11"),
    ]
    for bad, err, msg in cases:
        with pytest.raises(err, match=msg):
            C.validate_condensed(bad, "Dense_3")
        with pytest.raises(err, match="Dense_3"):
            C.validate_condensed(bad, "Dense_3")
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        C.condensed_dense(x, layer, impl="cuda")
    with pytest.raises(TypeError, match="expected a CondensedLinear"):
        C.validate_condensed(layer.values)


# ----------------------------------------------------------------------------- group-shared


def test_group_shared_export_and_reference_match_the_masked_dense_layer():
    layer, x, kernel, mask, bias = layer_and_x(n_out=16, group_size=4)
    assert layer.group_size == 4 and layer.indices.shape == (3, 5)
    assert layer.values.shape == (12, 5)
    np.testing.assert_array_equal(layer.neurons, [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15])
    w, b = C.to_dense(layer)
    np.testing.assert_array_equal(w, np.where(mask, kernel, 0))
    np.testing.assert_array_equal(b, bias)
    want = np.asarray(x, np.float64) @ np.where(mask, kernel, 0) + bias
    for impl in ("reference", "cpu"):
        got = C.expand(C.condensed_dense(x, layer, impl=impl), layer)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    mod = CondensedDense(features=16, n_active=12, k=5, index_dtype=layer.indices.dtype,
                         group_size=4, impl="reference")
    got = mod.apply(CondensedDense.variables_from(layer), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_group_shared_export_errors_and_padding():
    rng = np.random.default_rng(1)
    mask = np.repeat(np_mask(rng, 20, 3, 4), 2, axis=1)  # 6 neurons, groups of 2
    kernel = rng.standard_normal((20, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="Dense_0: group_size=4 does not divide the layer's "
                                         "n_out=6"):
        C.condense_layer(kernel, mask, group_size=4, name="Dense_0")
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        C.condense_layer(kernel, mask, group_size=0)
    odd = mask.copy()
    odd[np.flatnonzero(~odd[:, 3])[0], 3] = True  # neuron 3 differs from neuron 2 (found at 2)
    with pytest.raises(ValueError, match=r"neuron 2 \(group 1\) differs.*pad=True"):
        C.condense_layer(kernel, odd, group_size=2)
    padded = C.condense_layer(kernel, odd, group_size=2, pad=True)
    assert padded.padded and padded.k == 5
    w, _ = C.to_dense(padded)
    np.testing.assert_array_equal(w, np.where(odd, kernel, 0))
    # An ablated neuron inside a live group stays (zero values, its own bias).
    half = mask.copy()
    half[:, 4] = False
    lay = C.condense_layer(kernel, half, np.arange(6, dtype=np.float32), group_size=2)
    assert not lay.padded and lay.n_active == 6
    np.testing.assert_array_equal(C.to_dense(lay)[0], np.where(half, kernel, 0))


# ----------------------------------------------------------------------------- items 10


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    layer, _, kernel, mask, bias = layer_and_x()
    grouped = layer_and_x(1, n_out=16, group_size=4)[0]
    bf16 = layer_and_x(2, dtype=jnp.bfloat16)[0]
    sl = C.sparse_linear(kernel, mask, bias)
    rng = np.random.default_rng(3)
    params = [{"kernel": rng.standard_normal((30, 20)).astype(np.float32),
               "bias": rng.standard_normal(20).astype(np.float32)},
              {"kernel": rng.standard_normal((20, 4)).astype(np.float32)}]
    masks = [np_mask(rng, 30, 20, 6, ablate=(0, 7)), np_mask(rng, 20, 4, 5)]
    mlp = C.condense_mlp(params, masks, activation=jax.nn.gelu)
    models = {"dict": {"params/Dense_0": layer, "params/Dense_1": grouped,
                       "params/Dense_2": bf16},
              "layer": grouped, "sparse_linear": sl, "mlp": mlp}
    paths = {k: C.save_condensed(d / f"{k}.npz", m) for k, m in models.items()}
    return models, paths, (params, masks)


def _same_layer(a, b):
    assert type(a) is type(b)
    if isinstance(a, C.SparseLinear):
        _same_layer(a.condensed, b.condensed)
        assert (a.structured is None) == (b.structured is None)
        if a.structured is not None:
            np.testing.assert_array_equal(a.structured.kernel, b.structured.kernel)
        return
    for f in ("values", "indices", "bias", "neurons", "ablated_bias"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert (a.n_in, a.n_out, a.padded, a.group_size) == (b.n_in, b.n_out, b.padded,
                                                         b.group_size)


def test_save_load_round_trip(saved_models):
    models, paths, (params, masks) = saved_models
    loaded = C.load_condensed(paths["dict"])
    assert list(loaded) == list(models["dict"])
    for name in loaded:
        _same_layer(loaded[name], models["dict"][name])
    assert loaded["params/Dense_2"].values.dtype == jnp.bfloat16
    _same_layer(C.load_condensed(paths["layer"]), models["layer"])
    _same_layer(C.load_condensed(paths["sparse_linear"]), models["sparse_linear"])
    mlp = C.load_condensed(paths["mlp"])
    assert mlp.activation is jax.nn.gelu
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 30)).astype(np.float32))
    np.testing.assert_allclose(C.mlp_apply(mlp, x, impl="reference"),
                               C.dense_mlp_apply(params, masks, x, jax.nn.gelu),
                               rtol=1e-4, atol=1e-4)


def _rewrite(src, dst, edit_meta=None, edit_arrays=None):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("__metadata__").tobytes())
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    arrays["__metadata__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(dst, **arrays)
    return dst


def test_load_refuses_bad_files_naming_the_file(saved_models, tmp_path):
    _, paths, _ = saved_models
    src = paths["dict"]
    data = src.read_bytes()

    def with_bytes(name, b):
        p = tmp_path / name
        p.write_bytes(b)
        return p

    def set_(k, v):
        return lambda m: m.__setitem__(k, v)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF

    def out_of_range(a):
        a["l0.indices"] = a["l0.indices"].copy()
        a["l0.indices"][2, 1] = 40

    cases = [
        (with_bytes("trunc.npz", data[: len(data) // 2]), "not a readable condensed model"),
        (with_bytes("flip.npz", bytes(flipped)), "not a readable|out of range|metadata"),
        (with_bytes("text.npz", b"hello"), "not a readable condensed model"),
        (_rewrite(src, tmp_path / "v2.npz", set_("version", 2)),
         "written in format version 2; this jaxsparse reads version 1"),
        (_rewrite(src, tmp_path / "fmt.npz", set_("format", "other")), "format 'other'"),
        (_rewrite(src, tmp_path / "oor.npz", edit_arrays=out_of_range),
         r"params/Dense_0: indices\[2, 1\] = 40 is out of range \[0, n_in=40\)"),
        (_rewrite(src, tmp_path / "shape.npz",
                  edit_arrays=lambda a: a.__setitem__("l1.values", a["l1.values"][:, :2])),
         r"params/Dense_1: values is float32\[12, 2\], the metadata says float32\[12, 5\]"),
        (_rewrite(src, tmp_path / "miss.npz", edit_arrays=lambda a: a.pop("l0.bias")),
         "params/Dense_0: array bias .* is missing"),
        (_rewrite(src, tmp_path / "extra.npz",
                  edit_arrays=lambda a: a.__setitem__("evil", np.zeros(3))), "unexpected arrays"),
        (_rewrite(src, tmp_path / "dt.npz",
                  edit_meta=lambda m: m["layers"][0].__setitem__("indices_dtype", "int64")),
         "indices dtype 'int64' is not one of"),
        (_rewrite(src, tmp_path / "grp.npz",
                  edit_meta=lambda m: m["layers"][1].__setitem__("group_size", 5)),
         "group_size=5 does not divide n_active=12"),
    ]
    for path, msg in cases:
        before = path.read_bytes()
        with pytest.raises(C.CondensedFileError, match=msg) as e:
            C.load_condensed(path)
        assert str(path) in str(e.value)
        assert path.read_bytes() == before  # loading never writes
    with pytest.raises(C.CondensedFileError, match="cannot read the file"):
        C.load_condensed(tmp_path / "absent.npz")


def test_load_never_unpickles(tmp_path):
    """An npz holding a pickled object array is refused, and its payload never runs."""
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.npz"
    np.savez(evil, __metadata__=np.array([Boom()], dtype=object))
    with pytest.raises(C.CondensedFileError, match="evil.npz"):
        C.load_condensed(evil)
    assert not marker.exists()


def test_mlp_file_activation_and_save_errors(saved_models, tmp_path):
    models, paths, _ = saved_models
    bad = _rewrite(paths["mlp"], tmp_path / "act.npz", lambda m: m.__setitem__(
        "activation", "os.system"))
    with pytest.raises(C.CondensedFileError, match="activation 'os.system' is not one of"):
        C.load_condensed(bad)
    assert C.load_condensed(bad, activation=jnp.tanh).activation is jnp.tanh
    custom = models["mlp"].replace(activation=lambda h: h)
    with pytest.raises(ValueError, match="cannot be stored by name"):
        C.save_condensed(tmp_path / "c.npz", custom)
    with pytest.raises(TypeError, match="cannot save a list"):
        C.save_condensed(tmp_path / "c.npz", [1])
    layer = models["layer"]
    with pytest.raises(ValueError, match=r"l: indices\[0, 0\] = 99"):
        C.save_condensed(tmp_path / "c.npz", {"l": layer.replace(
            indices=layer.indices.at[0, 0].set(99))})
    assert not (tmp_path / "c.npz").exists()


def test_no_pickle_in_the_condensed_package_or_quickstart():
    files = [*(ROOT / "jaxsparse" / "condensed").rglob("*.py"),
             ROOT / "experiments" / "quickstart.py"]
    unsafe = re.compile(r"import (pickle|dill|cloudpickle)|pickle\.loads?\(|"
                        r"allow_pickle=True|from pickle")
    for f in files:
        assert not unsafe.search(f.read_text()), f


# ----------------------------------------------------------------------------- item 11


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("JAXSPARSE_CACHE_DIR", str(d))
    saved = dict(cpu._state)
    cpu._reset_for_tests()
    yield d
    cpu._state.clear()
    cpu._state.update(saved)


def test_cache_dir_is_created_private(cache):
    assert cpu.secure_cache_dir() == cache
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


def test_cache_dir_writable_by_others_is_refused(cache):
    cache.mkdir(mode=0o700)
    os.chmod(cache, 0o777)
    with pytest.raises(cpu.CacheError, match=f"kernel cache {cache} is writable by other"):
        cpu.secure_cache_dir()
    link = cache.parent / "link"
    os.chmod(cache, 0o700)
    link.symlink_to(cache)
    with pytest.raises(cpu.CacheError, match="is a symlink"):
        cpu.secure_cache_dir(link)


needs_cxx = pytest.mark.skipif(cpu.find_compiler() is None, reason="no C++ compiler")


@needs_cxx
def test_planted_library_is_never_loaded(cache):
    """A library with the expected name but no build record: refused before dlopen, so its
    constructor cannot run; the call falls back to XLA with a warning naming the file."""
    lib = cpu.library_path()
    lib.write_bytes(b"\x7fELF planted")
    os.chmod(lib, 0o700)
    assert not cpu.load()
    err = cpu._state["error"]
    assert isinstance(err, cpu.CacheError) and "no checksum recorded" in str(err)
    layer, x, *_ = layer_and_x()
    with pytest.warns(RuntimeWarning, match=f"{lib.with_suffix('.sha256')} is missing"):
        y = C.condensed_dense(x, layer, impl="cpu")
    np.testing.assert_allclose(y, C.condensed_dense(x, layer, impl="reference"), rtol=1e-6)


@needs_cxx
def test_tampered_library_is_refused(cache):
    lib = cpu.library_path()
    lib.write_bytes(b"\x7fELF built")
    cpu.checksum_path(lib).write_text(__import__("hashlib").sha256(b"\x7fELF built")
                                      .hexdigest())
    for f in (lib, cpu.checksum_path(lib)):
        os.chmod(f, 0o600)
    assert cpu.read_verified(lib) == b"\x7fELF built"  # an intact record passes
    lib.write_bytes(b"\x7fELF tampered")
    with pytest.raises(cpu.CacheError, match=f"{lib}: SHA-256 .* differs .* recorded at "
                                             "build time"):
        cpu.read_verified(lib)
    assert not cpu.load()
    os.chmod(lib, 0o666)
    with pytest.raises(cpu.CacheError, match="writable only by it"):
        cpu.read_verified(lib)


@needs_cxx
def test_built_library_records_its_checksum_and_loads():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.load(), cpu._state["error"]
    lib = cpu.library_path()  # the process's own cache (built once for all the tests)
    assert cpu.read_verified(lib)
    assert stat.S_IMODE(os.stat(lib).st_mode) & 0o022 == 0


def test_remaining_error_paths_name_their_argument(saved_models, tmp_path):
    layer, x, *_ = layer_and_x()
    v, i, b = layer.values, layer.indices, layer.bias
    with pytest.raises(ValueError, match="condensed_matmul_reference: group_size must be a "
                                         "positive int, got 0"):
        C.condensed_matmul_reference(x, v, i, b, group_size=0)
    with pytest.raises(ValueError, match="condensed_matmul_reference: x must have a trailing"):
        C.condensed_matmul_reference(x[0, 0], v, i, b)
    big = layer.replace(values=jnp.zeros((13, 5)), indices=jnp.zeros((13, 5), jnp.int8),
                        bias=jnp.zeros(13), neurons=jnp.arange(13, dtype=jnp.int32))
    with pytest.raises(ValueError, match="Dense_9: 13 active neurons but n_out=12"):
        C.validate_condensed(big, "Dense_9")
    rng = np.random.default_rng(5)
    mask = np.repeat(np_mask(rng, 20, 2, 4), 2, axis=1)
    mask[np.flatnonzero(~mask[:, 2])[0], 2:4] = True  # group 1: fan-in 5, group 0: 4
    with pytest.raises(ValueError, match=r"Dense_4: .*groups have fan-in between 4 and 5"):
        C.condense_layer(np.ones((20, 4), np.float32), mask, group_size=2, name="Dense_4")
    with pytest.raises(TypeError, match="layer names must be strings, got 3"):
        C.save_condensed(tmp_path / "k.npz", {3: layer})
    src = saved_models[1]["mlp"]

    def chain(m):
        m["layers"][1]["n_in"] = 7

    cases = [
        (_rewrite(src, tmp_path / "kind.npz", lambda m: m.__setitem__("kind", "exe")),
         "unknown kind 'exe'"),
        (_rewrite(src, tmp_path / "nolayers.npz", lambda m: m.__setitem__("layers", {})),
         "metadata has no layer list"),
        (_rewrite(src, tmp_path / "rec.npz", lambda m: m["layers"].__setitem__(0, 5)),
         "layer record l0 is malformed"),
        (_rewrite(src, tmp_path / "int.npz",
                  lambda m: m["layers"][0].__setitem__("k", -1)),
         "layer 0: metadata k=-1 is not a non-negative int"),
        (_rewrite(src, tmp_path / "chain.npz", chain),
         r"layer 1: indices\[\d+, \d+\] = \d+ is out of range \[0, n_in=7\)"),
        (_rewrite(src, tmp_path / "one.npz", lambda m: m.__setitem__("kind", "layer")),
         "a 'layer' file holds exactly one such layer"),
    ]
    for path, msg in cases:
        with pytest.raises(C.CondensedFileError, match=msg):
            C.load_condensed(path)
    np.savez(tmp_path / "nometa.npz", values=np.zeros(3))
    with pytest.raises(C.CondensedFileError, match="nometa.npz: no __metadata__ entry"):
        C.load_condensed(tmp_path / "nometa.npz")
    np.savez(tmp_path / "json.npz", __metadata__=np.frombuffer(b"{no", np.uint8))
    with pytest.raises(C.CondensedFileError, match="json.npz: metadata is not valid JSON"):
        C.load_condensed(tmp_path / "json.npz")


def test_cache_path_that_is_a_file_is_refused(cache):
    cache.write_text("not a directory")
    with pytest.raises((cpu.CacheError, FileExistsError), match=str(cache)):
        cpu.secure_cache_dir()
