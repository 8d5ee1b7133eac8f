"""Condensed kernels vs the jnp reference: the C++ FFI CPU kernel (and its XLA fallback),
the Pallas GPU kernel in interpret mode, a deviceless CUDA lowering check, real-GPU runs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse.condensed as C
from jaxsparse.condensed.kernels import cpu, pallas_gpu, pallas_mosaic_gpu, pallas_tpu


def random_condensed(seed, batch, n_in, n_active, k, dtype, index_dtype):
    rng = np.random.default_rng(seed)
    idx = np.stack([np.sort(rng.permutation(n_in)[:k]) for _ in range(n_active)])
    x = jnp.asarray(rng.standard_normal((batch, n_in)), dtype)
    values = jnp.asarray(rng.standard_normal((n_active, k)), dtype)
    bias = jnp.asarray(rng.standard_normal(n_active), dtype)
    return x, values, jnp.asarray(idx, index_dtype), bias


def reference(x, values, indices, bias):
    return C.condensed_matmul_reference(x, values, indices, bias)


def tol(dtype):
    return dict(rtol=2e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-4)


needs_kernel = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler")


@needs_kernel
@pytest.mark.parametrize("batch", [1, 37, *(pytest.param(b, marks=pytest.mark.slow) for b in (5, 8))])
# small-batch loop and tiled loop + tail (1 and 37 in the fast tier)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("index_dtype, n_in", [(jnp.int8, 100), (jnp.int16, 700),
                                                (jnp.int32, 700)])
def test_cpu_kernel_matches_reference(batch, dtype, index_dtype, n_in):
    args = random_condensed(batch * 7 + n_in, batch, n_in, 50, 21, dtype, index_dtype)
    got = jax.jit(cpu.condensed_matmul_cpu)(*args)
    assert got.dtype == dtype and got.shape == (batch, 50)
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(reference(*args), np.float32), **tol(dtype))


@needs_kernel
def test_cpu_kernel_leading_axes_vmap_and_no_bias():
    x, v, i, b = random_condensed(0, 6, 64, 10, 7, jnp.float32, jnp.int8)
    x3 = x.reshape(2, 3, 64)
    np.testing.assert_allclose(cpu.condensed_matmul_cpu(x3, v, i, b),
                               reference(x3, v, i, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(lambda r: cpu.condensed_matmul_cpu(r, v, i, b))(x),
                               reference(x, v, i, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cpu.condensed_matmul_cpu(x, v, i), reference(x, v, i, None),
                               rtol=1e-5, atol=1e-5)


@needs_kernel
def test_cpu_kernel_rejects_out_of_range_indices_at_run_time():
    x, v, i, b = random_condensed(0, 2, 64, 10, 7, jnp.float32, jnp.int8)
    with pytest.raises(Exception, match=r"index 64 out of range \[0, 64\)"):
        jax.block_until_ready(jax.jit(cpu.condensed_matmul_cpu)(x, v, i.at[3, 2].set(64), b))
    with pytest.raises(ValueError, match=r"indices\[0, 0\] = -2 is out of range"):
        jax.block_until_ready(cpu.condensed_matmul_cpu(x, v, i.at[0, 0].set(-2), b))


def test_kernel_wrappers_reject_bad_shapes_and_dtypes():
    x, v, i, b = random_condensed(0, 2, 64, 10, 7, jnp.float32, jnp.int8)
    for f in (cpu.condensed_matmul_cpu, pallas_tpu.condensed_matmul_tpu,
              pallas_mosaic_gpu.condensed_matmul_mosaic_gpu):
        with pytest.raises(TypeError, match="must share one dtype"):
            f(x.astype(jnp.bfloat16), v, i, b)
        with pytest.raises(ValueError, match=r"must both be \[n_active, k\]"):
            f(x, v, i[:, :3], b)
        with pytest.raises(TypeError, match="indices must be int8, int16 or int32"):
            f(x, v, i.astype(jnp.uint8), b)
        with pytest.raises(ValueError, match="bias shape"):
            f(x, v, i, b[:3])


def test_cpu_fallback_without_compiler_warns_and_matches(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("JAXSPARSE_CACHE_DIR", str(tmp_path))
    saved = dict(cpu._state)
    cpu._reset_for_tests()
    try:
        with pytest.raises(cpu.BuildError, match="no C\\+\\+ compiler"):
            cpu.build()
        x, v, i, b = random_condensed(1, 3, 64, 10, 7, jnp.float32, jnp.int8)
        with pytest.warns(RuntimeWarning, match="using the slower XLA formulation"):
            got = cpu.condensed_matmul_cpu(x, v, i, b)
        np.testing.assert_allclose(got, reference(x, v, i, b), rtol=1e-6, atol=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warns only once
            cpu.condensed_matmul_cpu(x, v, i, b)
        with pytest.raises(cpu.BuildError, match="unavailable"):
            cpu.condensed_matmul_cpu(x, v, i, b, fallback=False)
    finally:
        cpu._state.update(saved)


@needs_kernel
def test_condensed_dense_auto_uses_kernel_on_cpu():
    x, v, i, b = random_condensed(2, 3, 64, 10, 7, jnp.float32, jnp.int8)
    layer = C.CondensedLinear(v, i, b, jnp.arange(10, dtype=jnp.int32),
                              jnp.zeros((10,)), 64, 10)
    hlo = jax.jit(lambda x: C.condensed_dense(x, layer)).lower(x).as_text()
    assert cpu.TARGET_NAME in hlo
    np.testing.assert_allclose(C.condensed_dense(x, layer), reference(x, v, i, b),
                               rtol=1e-5, atol=1e-5)


SMALL = pallas_gpu.PallasConfig(block_n=16, block_b=16)
needs_triton = pytest.mark.skipif(not pallas_gpu.TRITON_AVAILABLE,
                                  reason="this JAX no longer ships Pallas Triton")


@needs_triton
@pytest.mark.parametrize("batch, n_active", [(1, 16), (20, 40)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_interpret_matches_reference(batch, n_active, dtype):
    args = random_condensed(batch + n_active, batch, 48, n_active, 6, dtype, jnp.int8)
    got = pallas_gpu.condensed_matmul_pallas(*args, config=SMALL, interpret=True)
    assert got.dtype == dtype and got.shape == (batch, n_active)
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(reference(*args), np.float32), **tol(dtype))


@needs_triton
@pytest.mark.parametrize("dtype, index_dtype", [(jnp.float32, jnp.int16),
                                                (jnp.bfloat16, jnp.int16),
                                                (jnp.float32, jnp.int32)])
def test_pallas_lowers_for_cuda_through_triton(dtype, index_dtype):
    shapes = (jax.ShapeDtypeStruct((256, 768), dtype), jax.ShapeDtypeStruct((3072, 77), dtype),
              jax.ShapeDtypeStruct((3072, 77), index_dtype),
              jax.ShapeDtypeStruct((3072,), dtype))
    text = pallas_gpu.lower_for_cuda(*shapes).as_text()
    assert "triton" in text.lower()


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 256])
def test_pallas_on_gpu_matches_reference(dtype, batch):
    args = random_condensed(0, batch, 768, 3072, 77, dtype, jnp.int16)
    args = jax.device_put(args, jax.devices("gpu")[0])
    got = pallas_gpu.condensed_matmul_pallas(*args)
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(reference(*args), np.float32), **tol(dtype))


@needs_kernel
def test_cpu_kernel_vmap_over_weights_falls_back_to_xla():
    x, v, i, b = random_condensed(5, 3, 64, 10, 7, jnp.float32, jnp.int8)
    vs = jnp.stack([v, 2 * v])
    got = jax.vmap(lambda vv: cpu.condensed_matmul_cpu(x, vv, i, b))(vs)
    want = jnp.stack([reference(x, v, i, b), reference(x, 2 * v, i, b)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
