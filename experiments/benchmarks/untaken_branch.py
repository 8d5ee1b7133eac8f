"""What an untaken ``lax.cond`` branch costs each call of a compiled program.

A sparse optimizer's plain step carries its topology update in the untaken branch of a
``lax.cond``. On a GPU or TPU an untaken branch is not touched; XLA:CPU's runtime, however,
allocates (and frees) every buffer allocation of the whole program on every call, the
untaken branch's included: among them a few bytes for each operand and result of every
reduction's reducer computation. So a branch with more reductions makes every call slower,
and by how much depends on the host's ``malloc``.

This script compiles ``x -> cond(False, update, identity, x)`` where ``update`` holds ``n``
column sums (each a reduction of its own), for several ``n``, and times the calls
(``_timing.interleaved``: the programs alternate, minimum and median microseconds per call).
Run it under glibc and under jemalloc to compare allocators:

  python -m experiments.benchmarks.untaken_branch
  LD_PRELOAD=libjemalloc.so.2 python -m experiments.benchmarks.untaken_branch
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from experiments.benchmarks import _timing


def program(n: int):
    """``(x, pred) -> x``, jitted (``x`` donated): the identity unless ``pred``, when ``n``
    column sums update ``x`` one after the other."""

    def update(x):
        for i in range(n):
            x = x + 1e-9 * jnp.sum(x * (i + 1), axis=0, keepdims=True)
        return x

    def fn(x, pred):
        return jax.lax.cond(pred, update, lambda x: x, x)

    return jax.jit(fn, donate_argnums=0)


def measure(counts: Sequence[int], calls: int, repeats: int, shape=(78, 30)) -> list[dict]:
    """Microseconds per call (branch not taken) of :func:`program` for each count."""
    pred = jnp.asarray(False)
    variants, state = {}, {}
    for n in counts:
        f = program(n)
        state[n] = jnp.ones(shape)
        for _ in range(5):  # compile and warm up
            state[n] = f(state[n], pred)

        def call(f=f, n=n):
            state[n] = f(state[n], pred)
            return state[n]

        variants[n] = (call, calls)
    times = _timing.interleaved(variants, repeats)["wall"]
    return [{"reductions": n, "us_min": 1e6 * min(times[n]),
             "us_median": 1e6 * statistics.median(times[n])} for n in counts]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="0,50,200,400",
                   help="reductions in the untaken branch, comma-separated")
    p.add_argument("--calls", type=int, default=300, help="calls per timed repetition")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    try:
        counts = [int(c) for c in a.counts.split(",")]
    except ValueError:
        p.error(f"--counts: {a.counts!r} is not a comma-separated list of integers")
    if min(counts) < 0:
        p.error("--counts: counts must be >= 0")
    rows = measure(counts, a.calls, a.repeats)
    print(f"# {_timing.machine_line()}")
    print("| reductions in the untaken branch | us per call (min) | us per call (median) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['reductions']} | {r['us_min']:.1f} | {r['us_median']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
