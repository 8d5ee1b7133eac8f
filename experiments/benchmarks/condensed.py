"""Condensed inference benchmark (SRigL paper setup: ViT-B/16 MLP layers).

Layers 768 -> 3072 and 3072 -> 768 at 80/90/95/99% sparsity, batch 1 and 256 (and 2048 on
GPU), float32 and bfloat16, with constant fan-in masks with no ablation and with a fraction
of ablated neurons (same number of nonzeros, so survivors get a larger fan-in). Columns:
dense (masked dense matmul), structured-only, BCOO and BCSR (jax.experimental.sparse),
condensed-XLA (jnp reference formulation), condensed-kernel (the C++ FFI kernel on CPU, the
Pallas Triton kernel on GPU) and auto (the cost-model dispatch). Each cell is the median of
``--repeats`` timed calls after warm-up; the speedup column is dense time / time, both
measured in the same run.

    python experiments/benchmarks/condensed.py                  # CPU, writes the table + plot
    python experiments/benchmarks/condensed.py --batches 1 16 256 2048 --peak-gbs 4800  # H200
    python experiments/benchmarks/condensed.py --group-sizes 1 2 4 8 16 --sparsities 0.9
        # group-shared layout: kernel speed vs G, bytes moved, GB/s vs measured bandwidth

Run on a GPU machine as is: the kernel column then times the Pallas kernel.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

import jaxsparse.condensed as C
from jaxsparse.condensed.kernels import cpu as cpu_kernel


def make_mask(rng, n_in, n_out, sparsity, ablate):
    nnz = round((1 - sparsity) * n_in * n_out)
    n_act = max(1, round((1 - ablate) * n_out))
    k = max(1, min(n_in, nnz // n_act))
    mask = np.zeros((n_in, n_out), bool)
    cols = rng.permutation(n_out)[:n_act]
    scores = rng.random((n_in, n_act))
    rows = np.argpartition(scores, k - 1, axis=0)[:k]
    mask[rows, cols[None, :]] = True
    return mask


def timeit(f, *args, repeats):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_config(n_in, n_out, sparsity, ablate, batch, dtype, repeats, skip_slow):
    rng = np.random.default_rng(0)
    mask = make_mask(rng, n_in, n_out, sparsity, ablate)
    kernel = np.where(mask, rng.standard_normal((n_in, n_out)), 0).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype)
    layer = C.sparse_linear(kernel, mask, bias)
    x = jnp.asarray(rng.standard_normal((batch, n_in)), dtype)
    w, b = jnp.asarray(kernel), jnp.asarray(bias)
    fns = {
        "dense": (jax.jit(lambda x, w, b: x @ w + b[None, :]), (x, w, b)),
        "structured": (jax.jit(lambda x, s: C.structured_dense(x, s)), (x, layer.structured)),
    }
    big = batch * n_in * n_out * (1 - sparsity) > 5e7
    if not (skip_slow and big):
        wt_coo = sparse.BCOO.fromdense(w.T)
        wt_csr = sparse.BCSR.fromdense(w.T)
        fns["bcoo"] = (jax.jit(lambda x, m, b: (m @ x.T).T + b[None, :]), (x, wt_coo, b))
        fns["bcsr"] = (jax.jit(lambda x, m, b: (m @ x.T).T + b[None, :]), (x, wt_csr, b))
    cl = layer.condensed
    fns["condensed-xla"] = (jax.jit(lambda x, c: C.condensed_dense(x, c, impl="reference")),
                            (x, cl))
    impl = C.choose_impl(C.detect_platform())  # mosaic_gpu / triton / pallas_tpu / cpu
    if impl != "cpu" or cpu_kernel.available():
        fns["condensed-kernel"] = (jax.jit(lambda x, c: C.condensed_dense(x, c, impl=impl)),
                                   (x, cl))
    fns["auto"] = (jax.jit(lambda x, s: C.sparse_dense(x, s)), (x, layer))
    times = {name: timeit(f, *a, repeats=repeats) for name, (f, a) in fns.items()}
    item = np.dtype(dtype).itemsize
    moved = (cl.values.nbytes + cl.indices.nbytes + cl.bias.nbytes
             + batch * (n_in + cl.n_active) * item)  # the least any kernel must move
    return times, C.choose_form(layer, batch), cl.n_active, cl.k, moved


COLUMNS = ["dense", "structured", "bcoo", "bcsr", "condensed-xla", "condensed-kernel", "auto"]


def stream_bandwidth(repeats: int, mbytes: int = 64) -> float:
    """Measured copy bandwidth in bytes/s (read + write, as STREAM's copy counts it): the
    best of ``repeats`` one-thread ``np.copyto`` calls between preallocated arrays of
    ``mbytes`` (larger than the last-level cache, so the copy runs from DRAM)."""
    src = np.ones(mbytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def timeit_pair(f, a, g, b, repeats):
    """Best-of-``repeats`` times of ``f(*a)`` and ``g(*b)``, calls interleaved, so a busy
    machine slows both alike and the minimum is the least-disturbed call of each."""
    jax.block_until_ready(f(*a))
    jax.block_until_ready(g(*b))
    tf = tg = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*a))
        tf = min(tf, time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(g(*b))
        tg = min(tg, time.perf_counter() - t)
    return tf, tg


def group_mask(rng, n_in, n_out, sparsity, g):
    """Constant fan-in mask whose groups of ``g`` consecutive neurons share one column."""
    return np.repeat(make_mask(rng, n_in, n_out // g, sparsity, 0.0), g, axis=1)


def bench_groups(args):
    """Kernel speed vs group size G, with the bytes each call moves and the achieved rate.

    Bytes per call: dense = the weight matrix + x + y; condensed = values + indices + bias
    + x + y (each read once: the floor any kernel pays). Achieved GB/s = bytes / time; the
    machine's copy bandwidth is measured in the same process. Times are the best of
    ``--repeats`` interleaved calls (:func:`timeit_pair`).
    """
    dtypes = {"float32": np.float32, "bfloat16": jnp.bfloat16}
    impl = C.choose_impl(C.detect_platform())
    on_cpu = jax.default_backend() == "cpu"
    bw = stream_bandwidth(args.repeats) if on_cpu else float("nan")  # host copy: CPU only
    print(f"kernel: {impl}; measured copy bandwidth: {bw / 1e9:.1f} GB/s")
    # Per-call fixed cost: the same two calls on a 64x64 layer with k=8 (no real work).
    rng = np.random.default_rng(1)
    tiny = C.condense_layer(rng.standard_normal((64, 64)).astype(np.float32),
                            make_mask(rng, 64, 64, 0.875, 0.0))
    xs = jnp.ones((1, 64), jnp.float32)
    fixed_dense, fixed_kern = timeit_pair(
        jax.jit(lambda x, w: x @ w), (xs, jnp.ones((64, 64), jnp.float32)),
        jax.jit(lambda x, c: C.condensed_dense(x, c, impl=impl)), (xs, tiny), args.repeats)
    fixed = (f"per-call fixed cost (64x64 layer, k=8, batch 1): dense {fixed_dense * 1e6:.0f}"
             f" us, kernel {fixed_kern * 1e6:.0f} us")
    print(fixed)
    header = ("layer", "sparsity", "batch", "dtype", "G", "dense us", "kernel us",
              "kernel/dense", "dense MB", "kernel MB", "dense GB/s", "kernel GB/s")
    rows = []
    print(" | ".join(header))
    for layer_s in args.layers:
        n_in, n_out = map(int, layer_s.split("x"))
        for dt in args.dtypes:
            dtype = dtypes[dt]
            item = np.dtype(dtype).itemsize
            for sp in args.sparsities:
                for batch in args.batches:
                    rng = np.random.default_rng(0)
                    x = jnp.asarray(rng.standard_normal((batch, n_in)), dtype)
                    kernel = rng.standard_normal((n_in, n_out)).astype(dtype)
                    bias = jnp.asarray(rng.standard_normal(n_out), dtype)
                    for g in args.group_sizes:
                        mask = group_mask(rng, n_in, n_out, sp, g)
                        w = jnp.asarray(np.where(mask, kernel, 0).astype(dtype))
                        cl = C.condense_layer(w, mask, bias, group_size=g)
                        t_dense, t_kern = timeit_pair(
                            jax.jit(lambda x, w, b: x @ w + b[None, :]), (x, w, bias),
                            jax.jit(lambda x, c: C.condensed_dense(x, c, impl=impl)),
                            (x, cl), args.repeats)
                        io = (batch * n_in + batch * n_out) * item
                        b_dense = n_in * n_out * item + n_out * item + io
                        b_kern = (cl.values.nbytes + cl.indices.nbytes + cl.bias.nbytes
                                  + batch * n_in * item + batch * cl.n_active * item)
                        row = (layer_s, f"{sp:.0%}", batch, dt, g, f"{t_dense * 1e6:.0f}",
                               f"{t_kern * 1e6:.0f}", f"{t_dense / t_kern:.2f}x",
                               f"{b_dense / 1e6:.2f}", f"{b_kern / 1e6:.2f}",
                               f"{b_dense / t_dense / 1e9:.1f}",
                               f"{b_kern / t_kern / 1e9:.1f}")
                        rows.append(row)
                        print(" | ".join(map(str, row)), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(out.name + "_groups").with_suffix(".md")
    with open(path, "w") as f:
        f.write(f"backend: {jax.default_backend()}; times in microseconds (best of "
                f"{args.repeats} interleaved calls); kernel {impl}; measured copy "
                f"bandwidth {bw / 1e9:.1f} GB/s (one host thread, DRAM); {fixed}\n\n")
        f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for row in rows:
            f.write("| " + " | ".join(map(str, row)) + " |\n")
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--ablate", type=float, nargs="+", default=[0.0, 0.3],
                    help="fractions of ablated neurons (same nnz)")
    ap.add_argument("--layers", nargs="+", default=["768x3072", "3072x768"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-slow", action="store_true",
                    help="skip BCOO/BCSR at large batch (minutes on CPU)")
    ap.add_argument("--out", default="experiments/benchmarks/condensed")
    ap.add_argument("--peak-gbs", type=float, default=0.0,
                    help="the device's peak memory bandwidth in GB/s (H100 SXM 3350, H200 "
                         "4800) for the 'of peak' column; kernel GB/s counts the bytes any "
                         "kernel must move (values, indices, bias, x, y) once")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=None,
                    help="instead of the main table: kernel speed vs group size G (CPU "
                         "kernel), bytes moved and achieved GB/s vs measured bandwidth")
    args = ap.parse_args(argv)
    if args.group_sizes:
        return bench_groups(args)
    dtypes = {"float32": np.float32, "bfloat16": jnp.bfloat16}
    print(f"backend={jax.default_backend()} devices={jax.devices()}")
    header = ("layer", "sparsity", "ablated", "batch", "dtype", "n_act", "k", *COLUMNS,
              "kernel/dense", "kernel/bcoo", "auto form", "kernel GB/s", "of peak")
    rows = []
    print(" | ".join(header))
    for layer_s in args.layers:
        n_in, n_out = map(int, layer_s.split("x"))
        for dt in args.dtypes:
            for ablate in args.ablate:
                for sp in args.sparsities:
                    for batch in args.batches:
                        times, form, n_act, k, moved = bench_config(
                            n_in, n_out, sp, ablate, batch, dtypes[dt], args.repeats,
                            args.skip_slow)
                        kern = times.get("condensed-kernel")
                        row = (layer_s, f"{sp:.0%}", f"{ablate:.0%}", batch, dt, n_act, k,
                               *[f"{times[c] * 1e6:.0f}" if c in times else "-"
                                 for c in COLUMNS],
                               f"{times['dense'] / kern:.2f}x" if kern else "-",
                               f"{times['bcoo'] / kern:.2f}x" if kern and "bcoo" in times
                               else "-", form,
                               f"{moved / kern / 1e9:.1f}" if kern else "-",
                               f"{moved / kern / 1e9 / args.peak_gbs:.0%}"
                               if kern and args.peak_gbs else "-")
                        rows.append((row, times))
                        print(" | ".join(map(str, row)), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".md"), "w") as f:
        f.write(f"backend: {jax.default_backend()}; times in microseconds (median of "
                f"{args.repeats}); speedups = other / condensed-kernel, same run\n\n")
        f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for row, _ in rows:
            f.write("| " + " | ".join(map(str, row)) + " |\n")
    plot(rows, args, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


def plot(rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r[0], r[3], r[4], r[2]) for r, _ in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.4), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        sel = [(r, t) for r, t in rows if (r[0], r[3], r[4], r[2]) == g]
        xs = [float(r[1].rstrip("%")) for r, _ in sel]
        for c in COLUMNS:
            ys = [t.get(c, np.nan) * 1e6 for _, t in sel]
            if not all(np.isnan(ys)):
                ax.plot(xs, ys, marker="o", label=c)
        ax.set_yscale("log")
        ax.set_title(f"{g[0]} b={g[1]} {g[2]} abl={g[3]}", fontsize=7)
        ax.set_xlabel("sparsity %")
    axes[0][0].set_ylabel("time (us, log)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
