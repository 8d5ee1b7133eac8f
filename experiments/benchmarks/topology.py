"""Cost of the topology selections against the sort-based ways to get the same masks.

For each layer shape it times, interleaved in one process (so machine noise hits every
column alike), the exact top-k masks that a topology update needs:

* whole-layer top-k with a traced k (``jaxsparse.topology.top_k_mask``) vs ``jnp.argsort``
  and ``jax.lax.top_k`` with a static k (which cannot follow a traced count);
* per-neuron top-k (``top_k_per_neuron``) vs a per-column ``jnp.argsort``;
* one whole SRigL layer update (``srigl_layer``: 2 whole-layer + 1-2 per-neuron selections,
  ablation) and one RigL-style drop + grow.

With ``--breakdown`` it also times the pieces of one RigL layer update against a dense
SGD-momentum step of the same layer (``--breakdown_shape``, default 768x3072): the |W| and
|grad| selection keys, the drop selection, the grow selection (by |grad| among the weights
not kept, from random normal gradients; on distinct keys; on keys that tie at its threshold:
its rank search hashes every position in each pass), the packing of the new mask (the
dense step is not donated, as none of the pieces is).

Usage:
  python -m experiments.benchmarks.topology [--repeats 30] [--breakdown]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import bitmask, topology
from jaxsparse.algorithms.structured import srigl_layer

SHAPES = [(784, 300), (3072, 768), (3, 3, 64, 128)]


def timed(fns: dict, args: dict, repeats: int) -> dict:
    """Median seconds per call of each jitted fn, calls interleaved round-robin."""
    compiled = {n: jax.jit(f) for n, f in fns.items()}
    for n, f in compiled.items():
        jax.block_until_ready(f(*args[n]))
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[n]))
            times[n].append(time.perf_counter() - t0)
    return {n: float(np.median(t)) for n, t in times.items()}


def argsort_top_k(scores, k):
    flat = scores.reshape(-1)
    order = jnp.argsort(-flat)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size))
    return (ranks < k).reshape(scores.shape)


def argsort_per_column(scores, k):
    cols = scores.reshape(-1, scores.shape[-1])
    ranks = jnp.argsort(jnp.argsort(-cols, axis=0), axis=0)
    return (ranks < k).reshape(scores.shape)


def bench_shape(shape, repeats: int, density: float = 0.1):
    key = jax.random.key(0)
    kw, kg, km = jax.random.split(key, 3)
    n_out = shape[-1]
    fan_in = int(np.prod(shape[:-1]))
    k0 = max(1, int(density * fan_in))
    mask = topology.random_mask_per_neuron(km, shape, k0)
    w = jnp.where(mask, jax.random.normal(kw, shape), 0.0)
    g = jax.random.normal(kg, shape)
    budget = k0 * n_out
    n_drop = int(0.3 * budget)
    k = jnp.int32(budget - n_drop)
    static_k = budget - n_drop
    fns = {
        "top_k_mask": lambda s, k: topology.top_k_mask(s, k),
        "argsort": argsort_top_k,
        "lax.top_k (static k)": lambda s, k: jnp.zeros(s.size, bool).at[
            jax.lax.top_k(s.reshape(-1), static_k)[1]].set(True).reshape(s.shape),
        "top_k_per_neuron": lambda s, k: topology.top_k_per_neuron(s, k),
        "argsort per column": argsort_per_column,
        "srigl_layer": lambda m, w, g: srigl_layer(
            m, w, g, key, k0=k0, fraction=0.3, gamma_sal=0.3, ablation=True, min_neurons=1),
        "rigl drop+grow": lambda m, w, g: topology.grow_highest(
            topology.drop_lowest(m, jnp.abs(w), n_drop), jnp.abs(g), n_drop),
    }
    abs_w = jnp.abs(w)
    kcol = jnp.int32(max(1, k0 - n_drop // n_out))
    args = {
        "top_k_mask": (abs_w, k), "argsort": (abs_w, k), "lax.top_k (static k)": (abs_w, k),
        "top_k_per_neuron": (abs_w, kcol), "argsort per column": (abs_w, kcol),
        "srigl_layer": (mask, w, g), "rigl drop+grow": (mask, w, g),
    }
    return timed(fns, args, repeats)


def _sgdm(p, g, m):
    """One SGD-momentum step of a leaf (lr 0.01, momentum 0.9)."""
    m = 0.9 * m + g
    return p - 0.01 * m, m


def breakdown(shape, repeats: int, density: float = 0.1) -> dict:
    """Median seconds of the pieces of one RigL layer update and of a dense SGD-momentum
    step of the layer (see the module docstring)."""
    kw, kg, km, kt, kp = jax.random.split(jax.random.key(0), 5)
    size = int(np.prod(shape))
    nnz = int(density * size)
    mask = topology.random_mask(km, shape, nnz)
    w = jnp.where(mask, jax.random.normal(kw, shape), 0.0)
    g = jax.random.normal(kg, shape)
    n = int(0.3 * nnz)
    w_keys = topology.candidate_keys(jnp.abs(w), mask)
    kept = topology.top_k_keys(w_keys, nnz - n, tie_key=kt)
    # Grow scores over every position: distinct integers (no tie anywhere), or each value
    # twice, the odd count cutting through a pair (a tie at the threshold).
    distinct = jax.random.permutation(kp, size).reshape(shape).astype(jnp.float32)
    distinct_keys = topology.candidate_keys(distinct)
    paired_keys = topology.candidate_keys(jnp.floor(distinct / 2))
    odd = n | 1
    fns = {
        "|W| keys": lambda w, m: topology.candidate_keys(jnp.abs(w), m),
        "drop selection": lambda k: topology.top_k_keys(k, nnz - n, tie_key=kt),
        "|grad| keys": lambda g, kept: topology.candidate_keys(jnp.abs(g), ~kept),
        "grow selection, |grad|": lambda k: topology.top_k_keys(k, n, tie_key=kt),
        "grow selection, no tie": lambda k: topology.top_k_keys(k, odd, tie_key=kt),
        "grow selection, tie": lambda k: topology.top_k_keys(k, odd, tie_key=kt),
        "pack": lambda a, b: bitmask.pack(a | b),
        "dense SGD-momentum step": _sgdm,
    }
    args = {
        "|W| keys": (w, mask), "drop selection": (w_keys,), "|grad| keys": (g, kept),
        "grow selection, |grad|": (topology.candidate_keys(jnp.abs(g), ~kept),),
        "grow selection, no tie": (distinct_keys,), "grow selection, tie": (paired_keys,),
        "pack": (kept, kept), "dense SGD-momentum step": (w, g, jnp.zeros(shape)),
    }
    return timed(fns, args, repeats)


def print_breakdown(shape, repeats: int) -> dict:
    t = breakdown(shape, repeats)
    dense = t["dense SGD-momentum step"]
    print(f"\nOne RigL layer update of {'x'.join(map(str, shape))} at 90% sparsity, in pieces "
          f"(medians of {repeats} interleaved calls):")
    print("| piece | ms | / dense SGD-momentum step of the layer |")
    print("|---|---|---|")
    for name in ("|W| keys", "drop selection", "|grad| keys", "grow selection, |grad|",
                 "grow selection, no tie", "grow selection, tie", "pack",
                 "dense SGD-momentum step"):
        print(f"| {name} | {t[name] * 1e3:.3f} | {t[name] / dense:.2f}x |")
    return t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the pieces of one RigL layer update")
    parser.add_argument("--breakdown_shape", default="768x3072",
                        help="the layer of --breakdown, e.g. 768x3072")
    parser.add_argument("--shapes", default=None,
                        help="the selection table's layers, e.g. 784x300,3x3x64x128 "
                             "('' for none; default: the three of SHAPES)")
    args = parser.parse_args(argv)
    try:
        breakdown_shape = tuple(int(d) for d in args.breakdown_shape.split("x"))
        shapes = SHAPES if args.shapes is None else [
            tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        parser.error("--breakdown_shape / --shapes: layer shapes like 768x3072")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}), "
          f"90% sparse constant fan-in masks, medians of {args.repeats} interleaved calls")
    head = ("shape", "top_k_mask ms", "argsort ms", "lax.top_k ms", "argsort / top_k_mask",
            "per-neuron ms", "argsort per column ms", "argsort / per-neuron",
            "srigl_layer ms", "rigl drop+grow ms")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for shape in shapes:
        t = {n: v * 1e3 for n, v in bench_shape(shape, args.repeats).items()}
        print(f"| {'x'.join(map(str, shape))} | {t['top_k_mask']:.2f} | {t['argsort']:.2f} | "
              f"{t['lax.top_k (static k)']:.2f} | {t['argsort'] / t['top_k_mask']:.1f}x | "
              f"{t['top_k_per_neuron']:.2f} | {t['argsort per column']:.2f} | "
              f"{t['argsort per column'] / t['top_k_per_neuron']:.1f}x | "
              f"{t['srigl_layer']:.2f} | {t['rigl drop+grow']:.2f} |", flush=True)
    if args.breakdown:
        print_breakdown(breakdown_shape, args.repeats)


if __name__ == "__main__":
    main()
