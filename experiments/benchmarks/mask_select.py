"""How a masked SGD-with-momentum step pays for its mask, by the way the mask is applied.

One jitted, donated update of a stack of transformer-MLP kernels (768x3072 and 3072x768,
``--blocks`` of each pair), the work of the sparse step's plain path (``jaxsparse``'s
``kept`` masks the gradient, the momentum and the update), written four ways and timed
side by side with the dense step (repetitions alternating, see ``_timing.interleaved``):

* ``dense``: ``m = g + 0.9 m; p = p - lr m``;
* ``bool select``: the packed mask unpacked to bools (``bitmask.unpack``) and applied with
  ``jnp.where`` (the library's step before stop 39);
* ``bits``: ``bitmask.word_mask`` words and ``bitmask.select`` (and/or on the values' bits:
  the library's step now);
* ``byte mask``: a bool mask stored unpacked (1 byte per weight) and ``jnp.where``.

The three sparse variants compute the same values bit for bit (checked before timing).

Usage:
  python -m experiments.benchmarks.mask_select [--blocks 10] [--repeats 30]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import _timing
from jaxsparse import bitmask

LR, MOMENTUM = 1e-3, 0.9


def dense_step(p, m, g, mask):
    del mask
    m = [gi + MOMENTUM * mi for gi, mi in zip(g, m)]
    return [pi - LR * mi for pi, mi in zip(p, m)], m


def masked_step(where, prepare):
    """The sparse plain step with ``where(mask, a, b)`` after ``prepare(mask, like)``."""

    def step(p, m, g, masks):
        ks = [prepare(k, pi) for k, pi in zip(masks, p)]
        m = [where(k, gi, None) + MOMENTUM * where(k, mi, None) for k, gi, mi in zip(ks, g, m)]
        return [pi + where(k, -LR * mi, -pi) for k, pi, mi in zip(ks, p, m)], m

    return step


def _where(k, a, b):
    return jnp.where(k, a, jnp.zeros((), a.dtype) if b is None else b)


VARIANTS = {
    "bool select": (masked_step(_where, lambda k, p: bitmask.unpack(k)), "packed"),
    "bits": (masked_step(bitmask.select, lambda k, p: bitmask.word_mask(k, p.dtype)),
             "packed"),
    "byte mask": (masked_step(_where, lambda k, p: k), "bool"),
}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=10,
                        help="pairs of 768x3072 / 3072x768 kernels (10: 47M weights)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args(argv)

    shapes = [(768, 3072), (3072, 768)] * args.blocks
    keys = jax.random.split(jax.random.key(0), 3)
    params = [jax.random.normal(jax.random.fold_in(keys[0], i), s) for i, s in enumerate(shapes)]
    grads = [1e-2 * jax.random.normal(jax.random.fold_in(keys[1], i), s)
             for i, s in enumerate(shapes)]
    bools = [jax.random.uniform(jax.random.fold_in(keys[2], i), s) < args.density
             for i, s in enumerate(shapes)]
    masks = {"packed": [bitmask.pack(b) for b in bools], "bool": bools}
    params = [jnp.where(b, p, 0.0) for b, p in zip(bools, params)]
    n = sum(int(np.prod(s)) for s in shapes)
    print(_timing.machine_line())
    print(f"{len(shapes)} kernels, {n / 1e6:.1f}M weights, density {args.density}, "
          f"{args.repeats} repetitions")

    steps = {"dense": (dense_step, None), **{k: (f, masks[m]) for k, (f, m) in VARIANTS.items()}}
    compiled = {k: jax.jit(f, donate_argnums=(0, 1)) for k, (f, _) in steps.items()}
    # Same values bit for bit: one step of each sparse variant from the same state.
    outs = [jax.jit(f)(params, [jnp.zeros(s) for s in shapes], grads, mk)
            for k, (f, mk) in steps.items() if k != "dense"]
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                          np.asarray(b).view(np.uint32))
    state = {k: ([jnp.copy(p) for p in params], [jnp.zeros(s) for s in shapes])
             for k in steps}

    def call(name):
        def run():
            p, m = compiled[name](*state[name], grads, steps[name][1])
            state[name] = (p, m)
            return p
        return run

    for name in steps:  # compile and warm up
        jax.block_until_ready(call(name)())
    times = _timing.interleaved({k: (call(k), 1) for k in steps}, args.repeats)["wall"]
    rows = []
    print("| variant | ms | / dense (median) | / dense (min) |\n|---|---|---|---|")
    for name in steps:
        r = _timing.ratio(times[name], times["dense"])
        rows.append({"variant": name, "ms": 1e3 * float(np.median(times[name])),
                     "ratio_median": r.median, "ratio_best": r.best})
        print(f"| {name} | {rows[-1]['ms']:.2f} | {r.median:.3f} | {r.best:.3f} |")
    return rows


if __name__ == "__main__":
    main()
