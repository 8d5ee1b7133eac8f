"""Schedules: when the topology changes, how much of it, and how sparse a pruned model is.

Every schedule is a pure function of a traced step (int32 scalar), so a jitted train step is
compiled once for the whole run. Fractions and sparsities reuse optax schedules; any optax
schedule (``step -> value``) is accepted where a schedule is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def as_float_schedule(schedule: Schedule) -> Schedule:
    """Wraps an optax-style schedule so it returns float32 whatever the promotion mode.

    optax schedules mix Python floats with the int32 step, which
    ``jax_numpy_dtype_promotion="strict"`` rejects; they run here under standard promotion.
    """

    def wrapped(step):
        with jax.numpy_dtype_promotion("standard"):
            return jnp.asarray(schedule(step), jnp.float32)

    return wrapped


def _check_int(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def periodic(
    every: int, end_step: int | None = None, begin_step: int = 0, include_begin: bool = False
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Update predicate for step ``t``: ``(t - begin) % every == 0`` and ``begin < t < end``.

    ``include_begin=True`` also fires at ``t == begin`` (gradual pruning starts there);
    dynamic sparse training does not update before it has trained ``every`` steps.
    ``end_step=None`` never stops.

    Example:
      >>> is_update = periodic(100, end_step=7500)   # fires at 100, 200, ..., 7400
    """
    every = _check_int(every, "update_every", 1)
    begin_step = _check_int(begin_step, "begin_step")
    if end_step is not None:
        end_step = _check_int(end_step, "end_step")
        if end_step <= begin_step:
            raise ValueError(f"end_step ({end_step}) must be greater than begin_step ({begin_step})")

    def is_update_step(step):
        step = jnp.asarray(step, jnp.int32)
        since = step - begin_step
        ok = (since % every == 0) & ((since > 0) | (include_begin & (since == 0)))
        if end_step is not None:
            ok = ok & (step < end_step)
        return ok

    return is_update_step


def never(step) -> jnp.ndarray:
    """Update predicate of static sparsity."""
    del step
    return jnp.asarray(False)


def drop_fraction_schedule(
    drop_fraction: float | Schedule, end_step: int | None, decay: str = "cosine"
) -> Schedule:
    """Fraction of active weights replaced at an update.

    ``decay="cosine"``: f_t = alpha / 2 * (1 + cos(pi * t / end_step)) (RigL, SNFS);
    ``"constant"``: f_t = alpha. A callable is used as given (e.g. an optax schedule).
    """
    if callable(drop_fraction):
        return as_float_schedule(drop_fraction)
    # ``drop_fraction`` may be a traced value (optax.inject_hyperparams); check it if concrete.
    try:
        alpha_value = float(drop_fraction)
    except (TypeError, jax.errors.ConcretizationTypeError):
        alpha_value = None
    if alpha_value is not None and not 0.0 <= alpha_value <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction!r}")
    if decay == "constant":
        return lambda step: jnp.asarray(drop_fraction, jnp.float32)
    if decay == "cosine":
        if end_step is None:
            raise ValueError("a cosine drop_fraction schedule needs end_step")
        horizon = float(end_step)

        def cosine(step):
            t = jnp.minimum(jnp.asarray(step, jnp.float32), horizon)
            alpha = jnp.asarray(drop_fraction, jnp.float32)
            return alpha * 0.5 * (1.0 + jnp.cos(jnp.pi * t / horizon))

        return cosine
    raise ValueError(f"unknown drop fraction decay {decay!r}; choose 'cosine' or 'constant'")


def polynomial_sparsity(
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    begin_step: int = 0,
    end_step: int = 1,
    power: int = 3,
) -> Schedule:
    """Zhu & Gupta (2017) ramp: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3.

    Constant ``s_i`` before ``begin_step`` and ``s_f`` after ``end_step``. Combine with
    :func:`periodic` (``include_begin=True``) to prune every ``dt`` steps.
    """
    if end_step <= begin_step:
        raise ValueError(f"end_step ({end_step}) must be greater than begin_step ({begin_step})")
    return as_float_schedule(optax.polynomial_schedule(
        init_value=float(initial_sparsity),
        end_value=float(final_sparsity),
        power=power,
        transition_steps=int(end_step) - int(begin_step),
        transition_begin=int(begin_step),
    ))


def one_shot_sparsity(final_sparsity: float, at_step: int = 0) -> Schedule:
    """Sparsity 0 before ``at_step`` and ``final_sparsity`` from then on."""
    final_sparsity = float(final_sparsity)

    def schedule(step):
        return jnp.where(jnp.asarray(step) >= at_step, final_sparsity, 0.0)

    return schedule


def inject_hyperparams(factory: Callable, hyperparams=("drop_fraction",), **kwargs) -> Callable:
    """``optax.inject_hyperparams`` for a jaxsparse factory: the named arguments become
    hyperparameters (a number or an optax schedule, stored in the state, changeable between
    steps without recompiling); every other argument of ``factory`` is static.

    Structural arguments (``sparsity``, ``key``, ``end_step``, ``update_every``, ...) shape
    the masks and the schedule on the host, so they cannot be traced; plain
    ``optax.inject_hyperparams`` would make each numeric one a hyperparameter unless listed
    in ``static_args``. ``kwargs`` go to ``optax.inject_hyperparams`` (e.g.
    ``hyperparam_dtype``).

    Example:
      >>> tx = jaxsparse.inject_hyperparams(jaxsparse.rigl)(
      ...     inner=optax.adam(1e-3), sparsity=0.9, key=jax.random.key(0), end_step=10_000,
      ...     drop_fraction=optax.linear_schedule(0.5, 0.1, 10_000))
      >>> state.hyperparams["drop_fraction"]   # the value used at the last update
    """
    names = list(inspect.signature(factory).parameters)
    hyperparams = (hyperparams,) if isinstance(hyperparams, str) else tuple(hyperparams)
    unknown = [h for h in hyperparams if h not in names]
    if unknown:
        raise ValueError(f"{getattr(factory, '__name__', factory)!r} has no argument(s) "
                         f"{unknown}; its arguments are {names}")
    static = tuple(n for n in names if n not in hyperparams)
    return optax.inject_hyperparams(factory, static_args=static, **kwargs)
