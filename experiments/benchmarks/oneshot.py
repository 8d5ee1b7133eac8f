"""One-shot pruning cost: wall time and peak memory per method vs model size.

The model is a synthetic residual stack of Dense pairs (``x + W2 gelu(W1 x)``, ``d -> 4d ->
d``, like a transformer's MLPs) with random weights, calibrated on random inputs; every
kernel is pruned to 50% per output neuron. Each (size, method) runs in a fresh subprocess;
the table reports the pruning wall time and the process's CPU time (user + system, all
threads; compilation included; on a shared machine the CPU time is the steadier number), CPU
time per pruned layer, the peak RSS *during pruning* (Linux: the high-water mark ``VmHWM`` is
reset through ``/proc/self/clear_refs`` just before ``prune``, so the model's initialisation
does not count; elsewhere ``ru_maxrss``, which may include it), and that peak minus the RSS
just before pruning (params, calibration data and the JAX runtime already resident) next to
the model's size in float32.

``--donate`` prunes with ``donate=True`` (the dense kernels are freed as their pruned copies
appear); ``--recompute`` with ``carry=False`` (the forward prefix re-run for every layer, the
calibration path before the carried activations).

Usage:
  python -m experiments.benchmarks.oneshot [--sizes 10m 100m] [--rows 2048] [--donate]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

SIZES = {"1m": (128, 4), "10m": (384, 8), "100m": (1024, 12)}  # (d, pairs)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    """Resets the process's peak RSS (``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(reset: bool) -> float:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(size: str, method: str, rows: int, batches: int, donate: bool = False,
        carry: bool = True) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxsparse import oneshot

    d, pairs = SIZES[size]

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(pairs):
                h = nn.gelu(nn.Dense(4 * d)(x))
                x = x + nn.Dense(d, kernel_init=nn.initializers.normal(0.02))(h)
            return x

    model = Stack()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, d)))
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    keys = jax.random.split(jax.random.key(1), batches)
    data = [jax.random.normal(k, (rows // batches, d)) for k in keys]
    jax.block_until_ready((params, data))
    before = _rss_mb()
    reset = _reset_peak()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res = oneshot.prune(model, params, data, method=method, sparsity=0.5, donate=donate,
                        carry=carry)
    jax.block_until_ready(res.params)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    peak = _peak_mb(reset)
    return dict(size=size, method=method, params=n_params, model_mb=4 * n_params / 2**20,
                rows=rows, wall_s=wall, cpu_s=cpu, layers=len(res.layers), rss_before_mb=before,
                peak_rss_mb=peak, growth_mb=peak - before, peak_reset=reset, donate=donate,
                carry=carry)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["10m", "100m"])
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--rows", type=int, default=2048, help="calibration rows (tokens)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--donate", action="store_true", help="prune with donate=True")
    p.add_argument("--recompute", action="store_true",
                   help="prune with carry=False (re-run the forward prefix per layer)")
    p.add_argument("--one", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    flags = [f for f, on in (("--donate", args.donate), ("--recompute", args.recompute)) if on]
    if args.one:
        print("RESULT " + json.dumps(one(*args.one, args.rows, args.batches, args.donate,
                                         not args.recompute)), flush=True)
        return
    import jax
    print(f"# {platform.machine()} {platform.system()}, jax {jax.__version__}, "
          f"{args.rows} calibration rows in {args.batches} batches, 50% per neuron"
          + (f", {' '.join(flags)}" if flags else ""))
    print("| size | params | model MB | method | wall s | CPU s | CPU s / layer | peak RSS MB | "
          "RSS growth MB | growth / model |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for method in args.methods:
            cmd = [sys.executable, "-m", "experiments.benchmarks.oneshot", "--one", size,
                   method, "--rows", str(args.rows), "--batches", str(args.batches), *flags]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"| {size} | - | - | {method} | failed: {out.stderr[-300:]!r} |")
                continue
            r = json.loads(line[0][7:])
            if not r["peak_reset"]:
                method = f"{method} (peak since start)"
            print(f"| {size} | {r['params'] / 1e6:.1f}M | {r['model_mb']:.0f} | {method} | "
                  f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['cpu_s'] / r['layers']:.2f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | "
                  f"{r['growth_mb'] / r['model_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
