"""Cost of :func:`jaxsparse.map_layers`' loops over a group of same-shaped layers.

``map_layers`` gives every layer's output a buffer of its own by rotating the group's output
buffers through its loop, which moves every buffer at every turn. This script compiles the
same ``map_layers`` call twice, with one loop over the whole group (``n**2`` moves) and with
the nested loops of :func:`jaxsparse.layermap.loop_shape` (about ``2 n**1.5``), and times
the two alternating in one process (``_timing.interleaved``). The per-layer function is the
packed sign mask a topology update returns (1 bit per weight), so the moved bytes are those
of a real update.

Usage:
  python -m experiments.benchmarks.layermap [--groups 24x256x256,96x256x256,192x1024x1024]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from unittest import mock

import jax
import jax.numpy as jnp

from experiments.benchmarks import _timing
from jaxsparse import layermap


def parse_group(text: str) -> tuple[int, tuple[int, int]]:
    """``"96x256x256"`` -> ``(96, (256, 256))``; errors name the option."""
    try:
        n, rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--groups: {text!r} is not LAYERSxROWSxCOLS, e.g. 96x256x256"
                         ) from None
    if min(n, rows, cols) < 1:
        raise ValueError(f"--groups: {text!r} needs positive sizes")
    return n, (rows, cols)


def packed_signs(layers: list, consts: list) -> list:
    return layermap.map_layers(lambda x, c: jnp.packbits(x > c, axis=0), layers, consts)


def measure(n: int, shape: tuple[int, int], repeats: int) -> dict:
    """Compile and time ``packed_signs`` over ``n`` layers, one loop vs nested loops."""
    layers = [jnp.full(shape, float(i % 7) - 3.0) for i in range(n)]
    consts = [jnp.float32(0.5)] * n
    compiled = {}
    for name, shape_of in (("one loop", lambda n: (1, n)), ("nested", layermap.loop_shape)):
        with mock.patch.object(layermap, "loop_shape", shape_of):
            # A function of its own per variant: jit's trace cache would reuse the first.
            compiled[name] = _timing.compile_timed(lambda *a: packed_signs(*a), layers,
                                                   consts)
    outs = {k: jax.device_get(c.executable(layers, consts)) for k, c in compiled.items()}
    for a, b in zip(outs["one loop"], outs["nested"], strict=True):
        if not (a == b).all():
            raise AssertionError("one loop and nested loops disagree")
    one = compiled["one loop"].executable
    calls = _timing.calls_for(_timing.mean_seconds(lambda: one(layers, consts), 1).wall, 0.3)
    times = _timing.interleaved(
        {k: (lambda c=c: c.executable(layers, consts), calls) for k, c in compiled.items()},
        repeats)
    return {
        "n": n, "shape": shape, "loop_shape": layermap.loop_shape(n),
        "compile_s": {k: c.wall_s for k, c in compiled.items()},
        "ms": {k: 1e3 * min(v) for k, v in times["wall"].items()},
        "ratio": _timing.ratio(times["wall"]["nested"], times["wall"]["one loop"]),
        "temp_mib": {k: _timing.memory_stats(c.executable)["temp"] / 2**20
                     for k, c in compiled.items()},
        "output_kib": shape[0] * shape[1] / 8 / 1024,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="24x256x256,96x256x256,192x1024x1024",
                        help="comma-separated LAYERSxROWSxCOLS groups")
    parser.add_argument("--repeats", type=int, default=7)
    a = parser.parse_args(argv)
    groups = [parse_group(g) for g in a.groups.split(",") if g]
    print(f"# {_timing.machine_line()}")
    print("| layers x shape | packed output KiB | nested loops (outer, inner) | compile s one "
          "loop -> nested | ms per call one loop -> nested (min) | nested / one loop "
          "(median, best) | temp MiB one loop -> nested |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n, shape in groups:
        r = measure(n, shape, a.repeats)
        rows.append(r)
        c, ms, t = r["compile_s"], r["ms"], r["temp_mib"]
        print(f"| {n} x {shape[0]}x{shape[1]} | {r['output_kib']:.0f} | {r['loop_shape']} | "
              f"{c['one loop']:.2f} -> {c['nested']:.2f} | {ms['one loop']:.2f} -> "
              f"{ms['nested']:.2f} | {r['ratio'].median:.2f}, {r['ratio'].best:.2f} | "
              f"{t['one loop']:.1f} -> {t['nested']:.1f} |", flush=True)
    print(f"# load at the end {_timing.load_average()}")
    return rows


if __name__ == "__main__":
    main()
