"""Tiny models and a training loop shared by the core tests."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse


def examples(ci: int, nightly: int) -> int:
    """``max_examples`` of a hypothesis property test: ``ci`` in every ordinary run, the
    test's share of the nightly property run under ``JAXSPARSE_NIGHTLY``.

    ``JAXSPARSE_NIGHTLY`` is the fraction of the nightly run to do: unset or ``0`` gives
    ``ci``, ``1`` the full ``nightly`` count, ``0.1`` a tenth of it (never fewer than
    ``ci``). Expensive tests (a compilation per drawn shape) get smaller nightly counts than
    cheap ones; BUILD.md ("Nightly property run") gives the total and its wall time.
    """
    fraction = float(os.environ.get("JAXSPARSE_NIGHTLY") or 0)
    if fraction < 0:
        raise ValueError(f"JAXSPARSE_NIGHTLY must be >= 0, got {fraction}")
    return ci if fraction == 0 else max(ci, round(nightly * fraction))


def tiny_params(key=0, d_in=20, hidden=16, d_out=8):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {
        "dense0": {
            "kernel": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
            "bias": jnp.zeros((hidden,)),
        },
        "norm": {"scale": jnp.ones((hidden,))},
        "dense1": {
            "kernel": jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden),
            "bias": jnp.zeros((d_out,)),
        },
    }


def tiny_apply(params, x):
    h = x @ params["dense0"]["kernel"] + params["dense0"]["bias"][None, :]
    h = jax.nn.relu(h) * params["norm"]["scale"][None, :]
    return h @ params["dense1"]["kernel"] + params["dense1"]["bias"][None, :]


def tiny_batch(step, batch=32, d_in=20, d_out=8):
    kx = jax.random.fold_in(jax.random.key(1234), step)
    x = jax.random.normal(kx, (batch, d_in))
    y = jnp.arange(batch) % d_out
    return x, y


def loss_fn(params, x, y):
    logits = tiny_apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx):
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    return step


def run(tx, steps, params=None, jit=True, step=None):
    """Runs ``steps`` steps; returns a list of dicts of numpy snapshots, one per step, with
    the params and masks *after* the step and the grads used in it, and the step function.

    ``step``: a step returned by an earlier ``run`` of an optimizer built the same way (it
    reads its key from the state, which ``tx.init`` makes), reused without compiling again.
    """
    params = tiny_params() if params is None else params
    state = tx.init(params)
    params = jaxsparse.apply_masks(params, jaxsparse.get_masks(state))
    if step is None:
        step = jax.jit(make_step(tx)) if jit else make_step(tx)
    history = [{"params": jax.device_get(params), "masks": jax.device_get(jaxsparse.get_masks(state)),
                "state": jax.device_get(state)}]
    for t in range(steps):
        x, y = tiny_batch(t)
        params, state, grads = step(params, state, x, y)
        history.append({
            "params": jax.device_get(params),
            "masks": jax.device_get(jaxsparse.get_masks(state)),
            "state": jax.device_get(state),
            "grads": jax.device_get(grads),
        })
    return history, step


def lenient(tx):
    """Runs an optax optimizer under standard dtype promotion.

    The test suite sets ``jax_numpy_dtype_promotion="strict"`` to catch implicit promotions in
    jaxsparse; optax's own optimizers (e.g. Adam's ``decay ** count`` bias correction) are not
    written for strict mode, so third-party inner optimizers run leniently.
    """

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None, **extra):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(init, update)
