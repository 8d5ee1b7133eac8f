"""Cost of the topology selections against the sort-based ways to get the same masks.

For each layer shape it times, interleaved in one process (so machine noise hits every
column alike), the exact top-k masks that a topology update needs:

* whole-layer top-k with a traced k (``jaxsparse.topology.top_k_mask``) vs ``jnp.argsort``
  and ``jax.lax.top_k`` with a static k (which cannot follow a traced count);
* per-neuron top-k (``top_k_per_neuron``) vs a per-column ``jnp.argsort``;
* one whole SRigL layer update (``srigl_layer``: 2 whole-layer + 1-2 per-neuron selections,
  ablation) and one RigL-style drop + grow.

Usage:
  python -m experiments.benchmarks.topology [--repeats 30]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import topology
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}), "
          f"90% sparse constant fan-in masks, medians of {args.repeats} interleaved calls")
    head = ("shape", "top_k_mask ms", "argsort ms", "lax.top_k ms", "argsort / top_k_mask",
            "per-neuron ms", "argsort per column ms", "argsort / per-neuron",
            "srigl_layer ms", "rigl drop+grow ms")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for shape in SHAPES:
        t = {n: v * 1e3 for n, v in bench_shape(shape, args.repeats).items()}
        print(f"| {'x'.join(map(str, shape))} | {t['top_k_mask']:.2f} | {t['argsort']:.2f} | "
              f"{t['lax.top_k (static k)']:.2f} | {t['argsort'] / t['top_k_mask']:.1f}x | "
              f"{t['top_k_per_neuron']:.2f} | {t['argsort per column']:.2f} | "
              f"{t['argsort per column'] / t['top_k_per_neuron']:.1f}x | "
              f"{t['srigl_layer']:.2f} | {t['rigl drop+grow']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
