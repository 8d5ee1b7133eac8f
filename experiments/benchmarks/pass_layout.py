"""Layout of the counting pass: how one whole-layer count is reduced on XLA:CPU.

Every round of a whole-layer counting search (``jaxsparse.topology.select_by_counting``,
the CPU path) is one pass over the layer's keys: at a pivot, the number of keys at or above
it, the smallest of them and the largest key below (``topology._reduce``). The same result
can be reduced in several layouts, and XLA:CPU runs them very differently:

* **one reduction** over both axes: a scalar result, which XLA:CPU runs on one thread;
  over a short last axis (a narrow layer) it is not vectorised either;
* **rows first**: each row reduced to a vector (XLA:CPU splits a reduction with a vector
  result across its threads), then the rows' results;
* **flat** (measured, not taken): the layer as one flat vector (contiguous, vectorised, one
  thread); flattening a sharded layer gathers it.

``topology._fold`` picks rows first for a large layer of wide rows, else one reduction
(thread hand-off costs more than it saves on a small layer). This script times one pass in
each layout per layer shape, interleaved in one process, and with ``--timed SIZE`` the
update steps of whole models compiled with the library's choice and with one reduction
everywhere (the layout before it), interleaved with the dense optimizer step
(``experiments.benchmarks.search_rounds.update_times``). Results never depend on the layout
(property-tested: ``tests/test_topology.py``).

Usage:
  python -m experiments.benchmarks.pass_layout [--shapes 784x300,768x3072] [--repeats 200]
  python -m experiments.benchmarks.pass_layout --timed 100M --algorithms rigl,srigl,snfs
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import _timing, search_rounds
from jaxsparse import topology

SHAPES = "784x300,768x3072,3072x768,4096x4096,131072x16"
_NEVER = 1 << 62


def layout(name: str):
    """Forces ``topology._fold``'s whole-array layout while a function is traced:
    ``"library"`` (its own choice), ``"one reduction"`` or ``"rows first"``."""
    settings = {"library": None, "one reduction": {"_ROWS_FIRST_MIN_SIZE": _NEVER},
                "rows first": {"_ROWS_FIRST_MIN_SIZE": 0, "_WIDE": 0}}
    if name not in settings:
        raise ValueError(f"unknown layout {name!r}; choose one of {sorted(settings)}")
    forced = settings[name]
    return contextlib.nullcontext() if forced is None else mock.patch.multiple(topology, **forced)


def flat_pass(keys, pivot):
    """The pass of ``topology._reduce`` over the layer as one flat vector."""
    parts, inits = topology._at(keys, pivot, None, True)
    out = jax.lax.reduce(tuple(p.reshape(-1) for p in parts), inits, topology._combine, (0,))
    return tuple(jnp.atleast_1d(x) for x in out)


LAYOUTS = ("library", "one reduction", "rows first", "flat")


def pass_times(shape: tuple, repeats: int) -> dict:
    """Median ms of one counting pass over a ``shape`` layer of |normal| keys per layout
    (calls interleaved), and whether every layout gave the same triple."""
    rng = np.random.default_rng(0)
    keys = topology.sortable_key(jnp.asarray(np.abs(rng.standard_normal(shape)), jnp.float32))
    pivot = topology.sortable_key(jnp.full((1,), 0.67, jnp.float32))
    variants, results = {}, []
    for name in LAYOUTS:
        if name == "flat":
            fn = jax.jit(flat_pass).lower(keys, pivot).compile()
        else:
            with layout(name):
                fn = jax.jit(lambda k, p: topology._reduce([k], None, p, True)).lower(
                    keys, pivot).compile()
        results.append(tuple(int(x[0]) for x in fn(keys, pivot)))
        variants[name] = (lambda f=fn: f(keys, pivot), 1)
    times = _timing.interleaved(variants, repeats)["wall"]
    med = {n: 1e3 * float(np.median(t)) for n, t in times.items()}
    return {**med, "equal": len(set(results)) == 1}


def pass_table(rows: list[tuple], repeats: int) -> str:
    lines = [f"| layer (one counting pass, medians of {repeats}) | "
             + " | ".join(f"{n} ms" for n in LAYOUTS) + " | one reduction / library | "
             "same result |", "|---|" + "---|" * (len(LAYOUTS) + 2)]
    for shape, t in rows:
        lines.append(f"| {'x'.join(map(str, shape))} | "
                     + " | ".join(f"{t[n]:.3f}" for n in LAYOUTS)
                     + f" | {t['one reduction'] / t['library']:.2f} | {t['equal']} |")
    return "\n".join(lines)


def main(argv=None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help=f"layers ({SHAPES})")
    parser.add_argument("--repeats", type=int, default=200, help="timed repetitions (200)")
    parser.add_argument("--timed", default=None, metavar="SIZE",
                        help="instead: time the update steps of --algorithms at SIZE (e.g. "
                        "100M), the library's layout and one reduction, beside dense")
    parser.add_argument("--algorithms", default="rigl,srigl,snfs")
    parser.add_argument("--warm", type=int, default=3,
                        help="update steps before timing (the state the scaling "
                        "benchmark times)")
    args = parser.parse_args(argv)
    print(_timing.machine_line())
    if args.timed:
        rows = search_rounds.update_times(
            [a for a in args.algorithms.split(",") if a], args.timed, args.repeats, args.warm,
            {"library": lambda: layout("library"), "one reduction": lambda: layout("one reduction")})
        print(search_rounds.time_table(rows, args.repeats, ("library", "one reduction")))
        return rows
    try:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        parser.error(f"--shapes: {args.shapes!r} is not ROWSxCOLUMNS,..., e.g. 768x3072")
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        parser.error(f"--shapes: {args.shapes!r} is not ROWSxCOLUMNS,..., e.g. 768x3072")
    rows = [(shape, pass_times(shape, args.repeats)) for shape in shapes]
    print(pass_table(rows, args.repeats))
    return rows


if __name__ == "__main__":
    main()
