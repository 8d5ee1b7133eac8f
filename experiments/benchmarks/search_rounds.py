"""Rounds of the counting search: how many passes over a layer each selection takes.

On CPU every top-k selection of a topology update is a counting search
(``jaxsparse.topology.select_by_counting``): a first pass over the layer (its key range and,
over a whole large layer, two sample pivots), then one pass per round until the k-th key is
pinned. The rounds, each a full read of the layer's keys, are most of the update's time at
scale, and their number depends on how the pivots are chosen. This script counts them (a
host callback in each round, so its times mean nothing), whole-layer and per-neuron searches
apart, for

* whole topology updates of the scaling benchmark's model (``--size``, default 10M;
  ``experiments.benchmarks.scaling``): the first update, and the same update step repeated
  (the state the scaling benchmark times: a third of the active weights were grown at zero
  by the step before, a cluster of tiny magnitudes far below the rest);
* single selections on synthetic scores (|normal|, uniform, |Cauchy|, lognormal, a 30%
  cluster of magnitudes 1e-5 times the rest, values on a grid of 1/50) over a 768x3072
  layer (``--shape``): whole-layer selections, and per-neuron ones with ``--compare hint``.

Each row is run twice in one process, the two settings of ``--compare``:

* ``pivot`` (default): the quadratic pivot estimate vs the secant alone
  (``topology._QUADRATIC_MIN_KEYS`` past any bracket; per-neuron searches never take the
  quadratic estimate: they stop with their slowest column, which it does not make faster);
* ``hint``: per-neuron searches whose first round counts at the sample's estimate of the
  whole layer's threshold (``topology._sample_hint``) vs from the column's key range alone.

The two columns differ only in the pivots; results never depend on them (property-tested).
A row prints the mean rounds per search.

With ``--timed 100M`` it instead times the update step of each algorithm compiled with
each setting, interleaved with the dense optimizer step in one process (medians).

Usage:
  python -m experiments.benchmarks.search_rounds [--size 10M] [--updates 4] [--compare hint]
  python -m experiments.benchmarks.search_rounds --timed 100M --algorithms rigl,srigl,snfs
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import platform
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import _timing, scaling
from jaxsparse import topology

_SECANT_ONLY = (1 << 31) - 1  # more keys than any bracket holds


class Counter:
    """Counts the searches and their rounds, whole-layer and per-neuron apart, while
    installed over ``topology._search``."""

    def __init__(self):
        self.calls = collections.Counter()

    def reset(self):
        self.calls.clear()

    @contextlib.contextmanager
    def installed(self):
        search = topology._search

        def counted(count, k, *args, **kwargs):
            scope = "per neuron" if k.size > 1 else "whole"
            jax.debug.callback(lambda: self.calls.update([f"searches {scope}"]))

            def counting(pivot):
                jax.debug.callback(lambda: self.calls.update([f"rounds {scope}"]))
                return count(pivot)

            return search(counting, k, *args, **kwargs)

        with mock.patch.object(topology, "_search", counted):
            yield self

    def searches(self, scope: str) -> int:
        return self.calls[f"searches {scope}"]

    def mean_rounds(self, scope: str) -> float:
        return self.calls[f"rounds {scope}"] / max(self.searches(scope), 1)


def secant_only(on: bool):
    """The secant alone (no bracket reaches the quadratic estimate's size) while ``on``."""
    return (mock.patch.object(topology, "_QUADRATIC_MIN_KEYS", _SECANT_ONLY) if on
            else contextlib.nullcontext())


def column_hint(on: bool):
    """Per-neuron searches without the sample's hint unless ``on``."""
    return (contextlib.nullcontext() if on
            else mock.patch.object(topology, "_sample_hint", lambda keys, k: None))


# --compare: two settings (name -> context manager factory in force while a step is traced).
COMPARISONS = {
    "pivot": {"quadratic": lambda: secant_only(False), "secant only": lambda: secant_only(True)},
    "hint": {"hint": lambda: column_hint(True), "no hint": lambda: column_hint(False)},
}


def update_rounds(algorithm: str, size: str, updates: int, variants: dict) -> list[tuple]:
    """``[(label, searches, rounds of each variant...)]`` of whole topology updates, whole
    and per-neuron searches in rows of their own (a scope with no search has no row)."""
    spec = scaling.size_spec(size)
    setup = scaling.make_setup(spec, "sgdm", 8, ["opt"])
    out = {}
    for context in variants.values():
        counter = Counter()
        with context(), counter.installed():
            tx = scaling.make_sparse(algorithm, scaling.INNER["sgdm"](), 0.9, 1000,
                                     jax.random.key(1))
            runner = scaling.Runner(tx, setup.params, sparse=True)
            at_update = jnp.asarray(1000, jnp.int32)
            step = jax.jit(scaling.opt_step(tx), donate_argnums=(0, 1))
            for i in range(updates):
                counter.reset()
                jax.block_until_ready(runner(step, setup.grads, at_update))
                jax.effects_barrier()
                label = "first update" if i == 0 else f"update repeated ({i + 1})"
                for scope in ("whole", "per neuron"):
                    out.setdefault((label, scope), []).append(
                        (counter.searches(scope), counter.mean_rounds(scope)))
    return [(f"{algorithm} {spec.label}: {label}, {scope}", runs[0][0], *(r[1] for r in runs))
            for (label, scope), runs in out.items() if runs[0][0]]


def update_times(algorithms: list[str], size: str, repeats: int, warm: int,
                 variants: dict | None = None) -> list[tuple]:
    """``[(label, ms dense, ms of each variant...)]``: the update step of each algorithm
    compiled under each of ``variants`` (name -> a context manager factory in force while
    the step is traced, as in :data:`COMPARISONS`; default ``"pivot"``), each with its
    own state advanced by ``warm`` update steps first, timed interleaved with the dense
    optimizer step in one rotation; medians."""
    if variants is None:
        variants = COMPARISONS["pivot"]
    spec = scaling.size_spec(size)
    setup = scaling.make_setup(spec, "sgdm", 8, ["opt"])
    at_update = jnp.asarray(1000, jnp.int32)
    rows = []
    for algorithm in algorithms:
        timed = {"dense": (lambda: setup.dense(setup.dense_opt, setup.grads, at_update), 1)}
        for name, context in variants.items():
            with context():
                tx = scaling.make_sparse(algorithm, scaling.INNER["sgdm"](), 0.9, 1000,
                                         jax.random.key(1))
                runner = scaling.Runner(tx, setup.params, sparse=True)
                step = jax.jit(scaling.opt_step(tx), donate_argnums=(0, 1)).lower(
                    runner.params, runner.state, setup.grads, at_update).compile()
            for _ in range(warm):
                jax.block_until_ready(runner(step, setup.grads, at_update))
            timed[name] = (lambda r=runner, c=step: r(c, setup.grads, at_update), 1)
        times = _timing.interleaved(timed, repeats)["wall"]
        med = {n: 1e3 * float(np.median(t)) for n, t in times.items()}
        rows.append((f"{algorithm} {spec.label}", med["dense"], *(med[n] for n in variants)))
        del timed
    return rows


def time_table(rows: list[tuple], repeats: int,
               names: tuple[str, str] = ("quadratic", "secant only")) -> str:
    """The table of :func:`update_times` rows of two variants named ``names``."""
    a, b = names
    lines = [f"| update step ({repeats} interleaved repetitions) | dense ms | {a} ms | "
             f"{b} ms | {a} / {b} | {a} / dense |",
             "|---|---|---|---|---|---|"]
    for label, dense, first, second in rows:
        lines.append(f"| {label} | {dense:.1f} | {first:.1f} | {second:.1f} | "
                     f"{first / second:.2f} | {first / dense:.1f}x |")
    return "\n".join(lines)


def synthetic_scores(kind: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    n = int(np.prod(shape))
    if kind == "|normal|":
        s = rng.standard_normal(n)
    elif kind == "uniform":
        s = rng.random(n)
    elif kind == "|cauchy|":
        s = rng.standard_cauchy(n)
    elif kind == "lognormal":
        s = np.exp(3 * rng.standard_normal(n))
    elif kind == "cluster":
        s = np.where(rng.random(n) < 0.3, 1e-5, 1.0) * rng.standard_normal(n)
    elif kind == "grid":
        s = np.round(rng.standard_normal(n) * 50) / 50
    else:
        raise ValueError(kind)
    return np.abs(s).astype(np.float32).reshape(shape)


KINDS = ("|normal|", "uniform", "|cauchy|", "lognormal", "cluster", "grid")
# (candidates, k as a fraction of them): a RigL drop (keep 70% of 10%), a grow (3% of 90%),
# a median.
CASES = ((0.1, 0.7), (0.9, 0.03), (1.0, 0.5))


def synthetic_rounds(shape: tuple, per_neuron: bool, seeds: int, variants: dict) -> list[tuple]:
    """``[(label, draws, rounds of each variant...)]`` of single selections (per neuron: k
    the fraction of the column with the fewest candidates, for every column)."""
    rng = np.random.default_rng(0)
    cases = []
    for kind in KINDS:
        for density, frac in CASES:
            inputs = []
            for _ in range(seeds):
                where = rng.random(shape) < density
                k = int(frac * (where.sum(0).min() if per_neuron else where.sum()))
                inputs.append((synthetic_scores(kind, shape, rng), where, np.int32(k)))
            cases.append((kind, density, frac, inputs))
    scope = "per neuron" if per_neuron else "whole"
    means: dict = {}
    for context in variants.values():
        counter = Counter()
        with context(), counter.installed():
            # Compiled once per setting (traced with it), reused for every case.
            select = jax.jit(lambda s, w, k: topology.top_k_keys(
                topology.candidate_keys(s, w), k, per_neuron=per_neuron))
            for kind, density, frac, inputs in cases:
                counter.reset()
                for s, w, k in inputs:
                    jax.block_until_ready(select(s, w, k))
                jax.effects_barrier()
                means.setdefault((kind, density, frac), []).append(counter.mean_rounds(scope))
    return [(f"{kind} {shape[0]}x{shape[1]} {scope}, {density:.0%} candidates, k {frac:.0%}",
             seeds, *means[(kind, density, frac)]) for kind, density, frac, _ in cases]


def table(rows: list[tuple], names: tuple[str, str]) -> str:
    a, b = names
    lines = [f"| selections | searches | rounds per search: {a} | {b} | ratio |",
             "|---|---|---|---|---|"]
    for label, n, q, s in rows:
        ratio = f"{q / s:.2f}" if s else "-"
        lines.append(f"| {label} | {n} | {q:.1f} | {s:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="10M", help="model of the whole updates (10M)")
    parser.add_argument("--updates", type=int, default=4,
                        help="update steps per algorithm (first, then repeated)")
    parser.add_argument("--algorithms", default="rigl,srigl,snfs,magnitude")
    parser.add_argument("--compare", default="pivot", choices=sorted(COMPARISONS),
                        help="the two settings compared (default pivot: quadratic vs secant "
                        "only; hint: per-neuron searches with and without the sample's hint)")
    parser.add_argument("--seeds", type=int, default=20, help="draws per synthetic case (20)")
    parser.add_argument("--shape", default="768x3072", help="synthetic layer (768x3072)")
    parser.add_argument("--timed", default=None, metavar="SIZE",
                        help="instead: time the update steps of --algorithms at SIZE (e.g. "
                        "100M) under both settings, side by side with dense")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (15)")
    parser.add_argument("--warm", type=int, default=3,
                        help="update steps before timing (the state the scaling "
                        "benchmark times)")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(d) for d in args.shape.lower().split("x"))
    except ValueError:
        parser.error(f"--shape: {args.shape!r} is not ROWSxCOLUMNS, e.g. 768x3072")
    if len(shape) != 2 or min(shape) < 1:
        parser.error(f"--shape: {args.shape!r} is not ROWSxCOLUMNS, e.g. 768x3072")
    variants = COMPARISONS[args.compare]
    names = tuple(variants)
    if args.timed:
        print(_timing.machine_line())
        rows = update_times([a for a in args.algorithms.split(",") if a], args.timed,
                            args.repeats, args.warm, variants)
        print(time_table(rows, args.repeats, names))
        return rows
    print(f"jax {jax.__version__} on {jax.default_backend()}, {platform.machine()}; "
          f"counting searches (topology.COUNTING_PLATFORMS) on cpu")
    rows = []
    for algorithm in filter(None, args.algorithms.split(",")):
        rows += update_rounds(algorithm, args.size, args.updates, variants)
    if args.seeds > 0:
        rows += synthetic_rounds(shape, args.compare == "hint", args.seeds, variants)
    print(table(rows, names))
    return rows


if __name__ == "__main__":
    main()
