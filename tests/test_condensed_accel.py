"""Issue 16 parts 1-3: kernel choice per platform (each branch forced), the Pallas TPU and
Mosaic GPU kernels in their interpret modes against the jnp reference, deviceless TPU and
CUDA lowering, and real-accelerator runs (marked ``gpu``/``tpu``, skipped on CPU)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse.condensed as C
from jaxsparse.condensed import dispatch
from jaxsparse.condensed.kernels import pallas_gpu, pallas_mosaic_gpu, pallas_tpu

ALL = frozenset({"cpu", "mosaic_gpu", "triton", "pallas_tpu"})


@pytest.mark.parametrize("platform, want", [
    (C.Platform("cpu", None, ALL), "cpu"),
    (C.Platform("cpu", None, frozenset()), "xla"),
    (C.Platform("gpu", 9.0, ALL), "mosaic_gpu"),          # H100 / H200
    (C.Platform("gpu", 10.0, ALL), "mosaic_gpu"),         # Blackwell
    (C.Platform("gpu", 9.0, ALL - {"mosaic_gpu"}), "triton"),
    (C.Platform("gpu", 8.0, ALL), "triton"),              # A100: Triton while JAX has it
    (C.Platform("gpu", 8.0, ALL - {"triton"}), "xla"),    # A100 after Triton is removed
    (C.Platform("gpu", 7.5, ALL), "xla"),                 # Colab T4
    (C.Platform("gpu", None, ALL), "xla"),
    (C.Platform("tpu", None, ALL), "pallas_tpu"),
    (C.Platform("tpu", None, frozenset()), "xla"),
    (C.Platform("METAL", None, ALL), "xla"),
])
def test_choose_impl_for_every_platform(platform, want):
    assert C.choose_impl(platform) == want


def test_this_process_detects_cpu_with_every_kernel_importable():
    p = C.detect_platform()
    assert p.name == "cpu" and {"cpu", "mosaic_gpu", "pallas_tpu"} <= p.have
    assert ("triton" in p.have) == pallas_gpu.TRITON_AVAILABLE


def _layer(seed=0, n_in=40, n_groups=3, g=4, k=5, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    mask = np.zeros((n_in, n_groups * g), bool)
    for grp in range(n_groups):
        mask[rng.permutation(n_in)[:k], grp * g:(grp + 1) * g] = True
    kernel = rng.standard_normal(mask.shape).astype(np.float32)
    bias = rng.standard_normal(mask.shape[1]).astype(np.float32)
    layer = C.condense_layer(jnp.asarray(kernel, dtype), mask, jnp.asarray(bias, dtype),
                             group_size=g)
    return layer, rng


def test_forced_choice_runs_that_kernel_and_fallback_warns_once(monkeypatch):
    layer, rng = _layer()
    x = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    calls = []

    def fake_run(impl, *args, **kw):
        calls.append(impl)
        return dispatch.condensed_matmul_reference(*args, **kw)

    monkeypatch.setattr(dispatch, "run_kernel", fake_run)
    monkeypatch.setattr(dispatch, "_warned_platforms", set())
    for platform, want in [(C.Platform("tpu", None, ALL), "pallas_tpu"),
                           (C.Platform("gpu", 9.0, ALL), "mosaic_gpu"),
                           (C.Platform("gpu", 8.6, ALL), "triton")]:
        monkeypatch.setattr(dispatch, "detect_platform", lambda p=platform: p)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            C.condensed_dense(x, layer)
        assert calls[-1] == want
    monkeypatch.setattr(dispatch, "detect_platform",
                        lambda: C.Platform("gpu", 7.5, ALL))  # a T4: no kernel fits
    with pytest.warns(RuntimeWarning, match=r"no condensed kernel is usable on this gpu "
                                            r"\(compute capability 7.5\).*XLA"):
        y = C.condensed_dense(x, layer)
    assert calls[-1] == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process and platform
        C.condensed_dense(x, layer)
    np.testing.assert_allclose(y, C.condensed_dense(x, layer, impl="reference"))


# ----------------------------------------------------------------------------- interpret


@pytest.fixture(scope="module")
def cases():
    out = []
    for seed, g, batch, dtype, idx_dtype in [(0, 4, 3, jnp.float32, jnp.int8),
                                             (1, 1, 130, jnp.bfloat16, jnp.int16)]:
        layer, rng = _layer(seed, g=g, dtype=dtype)
        layer = layer.replace(indices=layer.indices.astype(idx_dtype))
        x = jnp.asarray(rng.standard_normal((batch, 40)), dtype)
        out.append((x, layer))
    return out


def _close(got, want, dtype):
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


@pytest.mark.parametrize("impl", ["pallas_tpu_interpret",
                                  pytest.param("mosaic_gpu_interpret", marks=pytest.mark.slow)])
def test_interpreted_kernels_match_the_reference(cases, impl):
    """Group-shared (G=4, fp32, int8 indices, one batch tile) and plain (G=1, bf16, int16,
    two batch tiles with padding)."""
    for x, layer in cases:
        _close(C.condensed_dense(x, layer, impl=impl),
               C.condensed_dense(x, layer, impl="reference"), x.dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dma_mode", ["on_wait", "eager"])
def test_tpu_double_buffering_is_race_free(cases, dma_mode):
    """The interpreter's happens-before race detector over the prefetch of group g + 1
    while group g computes, with DMAs run when waited on and as soon as issued."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    from jax.experimental.pallas import tpu as pltpu

    x, layer = cases[0]
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode=dma_mode)
    y = pallas_tpu.condensed_matmul_tpu(x, layer.values, layer.indices, layer.bias,
                                        group_size=layer.group_size, interpret=params)
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
    _close(y, C.condensed_dense(x, layer, impl="reference"), x.dtype)


@pytest.mark.slow
def test_mosaic_gpu_persistent_blocks_are_race_free(cases):
    """Two persistent blocks walking three work items (block 0 reuses its shared-memory
    buffers for its second item), under the GPU interpreter's race detector."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    x, layer = cases[0]
    y = pallas_mosaic_gpu.condensed_matmul_mosaic_gpu(
        x, layer.values, layer.indices, layer.bias, group_size=layer.group_size,
        interpret=InterpretGPUParams(detect_races=True),
        config=pallas_mosaic_gpu.MosaicGpuConfig(blocks=2))
    assert not gpu_callbacks.get_races().races_found
    _close(y, C.condensed_dense(x, layer, impl="reference"), x.dtype)


@pytest.mark.slow
def test_interpreted_tpu_kernel_traced_bad_index_gives_nan(cases):
    x, layer = cases[0]
    bad = layer.replace(indices=layer.indices.at[1, 0].set(-3))  # group 1 = neurons 4..7
    y = jax.jit(lambda x, lyr: C.condensed_dense(x, lyr, impl="pallas_tpu_interpret"))(x, bad)
    assert np.isnan(np.asarray(y[:, 4:8])).all() and not np.isnan(np.asarray(y[:, :4])).any()
    with pytest.raises(ValueError, match=r"condensed_matmul_mosaic_gpu: indices\[1, 0\] = -3"):
        pallas_mosaic_gpu.condensed_matmul_mosaic_gpu(x, bad.values, bad.indices, bad.bias,
                                                      group_size=4, interpret=True)


# ----------------------------------------------------------------------------- lowering

VIT = dict(n_in=768, n_active=3072, k=77)


def _shapes(dtype, idx_dtype, g):
    return (jax.ShapeDtypeStruct((256, VIT["n_in"]), dtype),
            jax.ShapeDtypeStruct((VIT["n_active"], VIT["k"]), dtype),
            jax.ShapeDtypeStruct((VIT["n_active"] // g, VIT["k"]), idx_dtype),
            jax.ShapeDtypeStruct((VIT["n_active"],), dtype))


@pytest.mark.parametrize("dtype, g", [(jnp.float32, 8),
                                      pytest.param(jnp.bfloat16, 16, marks=pytest.mark.slow)])
def test_tpu_kernel_lowers_for_tpu_without_a_tpu(dtype, g):
    """Pallas -> Mosaic TPU lowering (the Mosaic compiler itself runs only on a TPU)."""
    text = pallas_tpu.lower_for_tpu(*_shapes(dtype, jnp.int16, g), group_size=g).as_text()
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("dtype, g", [(jnp.float32, 8),
                                      pytest.param(jnp.bfloat16, 1, marks=pytest.mark.slow)])
def test_mosaic_gpu_kernel_lowers_for_cuda_without_a_gpu(dtype, g):
    text = pallas_mosaic_gpu.lower_for_cuda(*_shapes(dtype, jnp.int16, g),
                                            group_size=g).as_text()
    assert "mosaic_gpu" in text


# ----------------------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("g", [1, 8])
def test_mosaic_gpu_kernel_on_a_gpu(dtype, g):
    layer, rng = _layer(0, n_in=768, n_groups=3072 // g, g=g, k=77, dtype=dtype)
    x = jax.device_put(jnp.asarray(rng.standard_normal((256, 768)), dtype),
                       jax.devices("gpu")[0])
    _close(C.condensed_dense(x, layer, impl="mosaic_gpu"),
           C.condensed_dense(x, layer, impl="reference"), dtype)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernel_on_a_tpu(dtype):
    layer, rng = _layer(0, n_in=768, n_groups=3072 // 8, g=8, k=77, dtype=dtype)
    x = jnp.asarray(rng.standard_normal((256, 768)), dtype)
    _close(C.condensed_dense(x, layer, impl="pallas_tpu"),
           C.condensed_dense(x, layer, impl="reference"), dtype)
