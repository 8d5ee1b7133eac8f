"""What a ``lax.cond`` that reads every gradient costs a *dense* train step.

A sparse optimizer's topology update runs under a ``lax.cond`` whose update branch reads
every gradient, and every weight's update reads its result (the new masks). That makes the
cond a barrier in the compiled step: no weight's update can start before the last gradient
exists. This script measures the barrier alone, without any sparsity: the dense full step of
the ``scaling.py`` MLP stack (forward, backward, SGD with momentum) against the same step
with a cond whose untaken branch sums every gradient and whose (zero) result every gradient
then adds, timed alternating in one process. ``jaxsparse.topology_due`` and
``tx.update(..., topology_update=bool)`` are the way around it (the plain step compiles
without the cond).

  python -m experiments.benchmarks.cond_barrier --sizes 10M,100M
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from experiments.benchmarks import _timing, scaling


def steps(tx: optax.GradientTransformation) -> dict:
    """``{"dense": step, "barrier": step}``, each ``(params, state, x, y) -> (params,
    state)``: the barrier step's updates depend on a cond over all gradients (never taken)."""

    def dense(params, state, x, y):
        grads = jax.grad(scaling.loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def barrier(params, state, x, y):
        grads = jax.grad(scaling.loss_fn)(params, x, y)
        flag = jax.lax.cond(x[0, 0] > jnp.inf,
                            lambda g: sum(jnp.sum(v) for v in jax.tree.leaves(g)),
                            lambda g: jnp.zeros((), jnp.float32), grads)
        grads = jax.tree.map(lambda g: g + flag, grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return {"dense": dense, "barrier": barrier}


def measure(size: str, batch: int, repeats: int, calls: int) -> dict:
    spec = scaling.size_spec(size)
    params = scaling.init_params(spec, jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, spec.d_model))
    y = jax.random.normal(ky, (batch, spec.d_model))
    tx = scaling.INNER["sgdm"]()
    runs = {}
    for name, fn in steps(tx).items():
        p = jax.tree.map(jnp.copy, params)
        s = tx.init(p)
        runs[name] = [jax.jit(fn, donate_argnums=(0, 1)).lower(p, s, x, y).compile(), p, s]

    def call(name):
        r = runs[name]
        r[1], r[2] = r[0](r[1], r[2], x, y)
        return r[1]

    for name in runs:  # one warm call each
        jax.block_until_ready(call(name))
    times = _timing.interleaved({k: (lambda k=k: call(k), calls) for k in runs}, repeats)
    wall = times["wall"]
    r = _timing.ratio(wall["barrier"], wall["dense"])
    return dict(model=spec.label, params=spec.n_params, batch=batch,
                dense_ms=1e3 * statistics.median(wall["dense"]),
                barrier_ms=1e3 * statistics.median(wall["barrier"]),
                ratio_median=r.median, ratio_best=r.best,
                cpu_ratio=_timing.ratio(times["cpu"]["barrier"], times["cpu"]["dense"]).median)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M", help="parameter counts, e.g. 10M,100M")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed repetition")
    args = parser.parse_args(argv)
    print(_timing.machine_line())
    rows = [measure(s, args.batch, args.repeats, args.calls) for s in args.sizes.split(",")]
    print("| model | batch | dense ms | with cond ms | cond / dense med | min | CPU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['dense_ms']:.2f} | {r['barrier_ms']:.2f} | "
              f"{r['ratio_median']:.2f}x | {r['ratio_best']:.2f}x | {r['cpu_ratio']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
