"""Test configuration shared by every test module.

* 8 simulated CPU devices (set before jax is imported) so sharding tests run anywhere.
* Hypothesis: derandomized under ``CI`` (same examples every run), exploring locally.
  ``JAXSPARSE_NIGHTLY=1`` is the nightly property run: every property test (marked
  ``property`` here, selected with ``-m property``) draws its nightly number of examples
  (``tests.helpers.examples``), freshly random; a fraction (``0.1``) runs that share of it.
* Strict numpy semantics, as in equinox's test suite: implicit dtype promotion
  (bool mask * float) and implicit rank promotion (silent broadcasting) raise.
* The fast tier (the default ``-m 'not slow'``) compiles fast rather than well (see
  :func:`_use_fast_compile`); every other selection, the slow tier included, runs with
  XLA's defaults, the configuration users run.
* One JAX compilation cache per test session, shared by the xdist workers: many tests build
  a fresh optimizer (a new jit) around the same program, which then compiles only once.
  The folder is new for every session (no state carried between runs) and removed at the end.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Set in the controller before xdist starts its workers, which inherit it.
_OWN_CACHE = "JAXSPARSE_TEST_JAX_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["JAXSPARSE_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="jaxsparse-test-jit-")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import is_hypothesis_test, settings  # noqa: E402

# CI replays the same examples every run (no flaky submissions); local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
# Nightly: new random examples every night, a failing one printed as a reproducible blob.
settings.register_profile("nightly", derandomize=False, deadline=None, print_blob=True)
if float(os.environ.get("JAXSPARSE_NIGHTLY") or 0) > 0:
    settings.load_profile("nightly")
else:
    settings.load_profile("ci" if os.environ.get("CI") else "dev")

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.environ["JAXSPARSE_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# XLA:CPU without LLVM optimisation and with its elemental emitters: the suite's time is
# compiling thousands of small programs, 2-3x faster this way (the fast tier on 2 cores:
# 460-480 s -> ~195 s). Not for the slow tier: its cross-program and cross-process
# bit-equality checks and its compiled-HLO shape checks hold for XLA's default pipeline
# (and the multi-process workers run with the defaults).
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _use_fast_compile() -> None:
    """Adds :data:`_FAST_COMPILE` to ``XLA_FLAGS`` (read when JAX first creates its CPU
    backend, after this hook; set in the xdist controller, inherited by its workers),
    after a child process showed this JAX knows the flags (an unknown one is fatal)."""
    if os.environ.get("JAXSPARSE_TEST_XLA_DEFAULTS") or _FAST_COMPILE in os.environ[
            "XLA_FLAGS"]:
        return
    import subprocess
    import sys

    flags = f"{os.environ['XLA_FLAGS']} {_FAST_COMPILE}"
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(abs)(1.0)"],
                           env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                           capture_output=True, timeout=120, check=False)
    if probe.returncode == 0:
        os.environ["XLA_FLAGS"] = flags


def pytest_configure(config):
    if config.option.markexpr == "not slow":  # the fast tier (pyproject's addopts)
        _use_fast_compile()
    config.addinivalue_line(
        "markers", "property: a hypothesis property test (added by conftest to every @given "
        "test); `JAXSPARSE_NIGHTLY=1 pytest -m property` is the nightly property run")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:  # the process that made the folder (the xdist controller) removes it
        shutil.rmtree(os.environ["JAXSPARSE_TEST_JAX_CACHE"], ignore_errors=True)


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_hypothesis_test(getattr(item, "obj", None)):
            item.add_marker(pytest.mark.property)
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
