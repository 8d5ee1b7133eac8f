"""Quickstart: RigL at 90% sparsity vs a dense baseline, on a fresh machine in a few minutes.

  python -m experiments.quickstart                       # embedded 8x8 digits, no download
  python -m experiments.quickstart --dataset fashion_mnist --data_dir ../shared/data/fashion_mnist

Trains LeNet-300-100 twice (dense, then RigL/ERK at 90%), prints both test accuracies and
RigL's per-layer sparsity table, writes ``quickstart.png`` (test accuracy over training and
per-layer density) to ``--out``, and, when this jaxsparse provides ``jaxsparse.condense``,
exports the sparse model in condensed form to ``condensed.npz`` (a safe file: npz arrays +
JSON metadata, no pickle; ``jaxsparse.condensed.load_condensed`` reads and validates it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_EPOCHS = {"digits": 20, "mnist": 3, "fashion_mnist": 3, "cifar10": 3}


def _config(dataset, data_dir, algorithm, epochs, seed):
    from experiments.configs import base

    c = base.get_config()
    c.dataset, c.data_dir, c.algorithm, c.seed = dataset, data_dir, algorithm, seed
    c.epochs = epochs
    c.sparsity = 0.9
    c.print_table = False
    if dataset == "digits":
        c.batch_size, c.update_every, c.log_every = 64, 20, 20
    else:
        c.batch_size, c.update_every, c.log_every, c.learning_rate = 128, 100, 100, 0.05
    return c


def export_condensed(params, masks, out_dir: Path) -> str:
    """Condensed export through ``jaxsparse.condense`` when it exists; else a note.

    RigL does not keep a constant fan-in, so layers are padded to their largest fan-in
    (``pad=True``); each exported layer is checked against the dense masked kernel.
    """
    import jaxsparse

    condense = getattr(jaxsparse, "condense", None)
    if condense is None:
        return "jaxsparse.condense is not available in this version: condensed export skipped"
    import jax

    try:
        layers = condense(params, masks, pad=True)
        to_dense = jaxsparse.condensed.to_dense
    except Exception as e:  # a young API: report rather than fail the quickstart
        return f"condensed export failed ({type(e).__name__}: {e}); skipped"
    flat = {jaxsparse.masks.path_to_str(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    lines = []
    for name, layer in layers.items():
        kernel, bias = to_dense(layer)
        err = float(np.max(np.abs(np.asarray(kernel) - np.asarray(flat[f"{name}/kernel"]))))
        lines.append(f"  {name}: values {tuple(layer.values.shape)}, indices "
                     f"{layer.indices.dtype}, max |dense - condensed| = {err:g}")
    # A safe file (npz + JSON metadata, validated on load): reading it never runs code.
    path = jaxsparse.condensed.save_condensed(out_dir / "condensed.npz", layers)
    reloaded = jaxsparse.condensed.load_condensed(path)
    assert list(reloaded) == list(layers)
    return "\n".join([f"condensed model (padded to the largest fan-in) written to {path} "
                      "(read it back with jaxsparse.condensed.load_condensed):", *lines])


def plot(runs: dict, rows, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.plots import _series, load_jsonl

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, workdir in runs.items():
        steps, acc = _series(load_jsonl(workdir / "metrics.jsonl"), "eval", "test_accuracy")
        a.plot(steps, acc, marker=".", label=label)
    a.set_xlabel("step")
    a.set_ylabel("test accuracy")
    a.set_title("test accuracy during training")
    a.grid(alpha=0.3)
    a.legend()
    kernels = [r for r in rows if r.path.endswith("kernel")]
    b.bar([r.path.replace("/kernel", "") for r in kernels], [1 - r.sparsity for r in kernels])
    b.set_ylabel("density (fraction active)")
    b.set_title("RigL per-layer density (ERK)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="RigL 90% vs dense in a few minutes")
    parser.add_argument("--dataset", default="digits",
                        choices=["digits", "mnist", "fashion_mnist", "cifar10"])
    parser.add_argument("--data_dir", default="", help="folder of the dataset files")
    parser.add_argument("--epochs", type=int, default=0, help="0: a per-dataset default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="quickstart_out", help="output folder")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO

    import jaxsparse
    from experiments import data as data_lib
    from experiments import train as train_lib

    t0 = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = args.epochs or DEFAULT_EPOCHS[args.dataset]
    ds = data_lib.load_dataset(args.dataset, args.data_dir or None)
    print(f"{args.dataset}: {len(ds.x_train)} train / {len(ds.x_test)} test images of "
          f"{ds.image_shape}; LeNet-300-100, {epochs} epochs")
    results, runs = {}, {}
    for algorithm in ("dense", "rigl"):
        c = _config(args.dataset, args.data_dir, algorithm, epochs, args.seed)
        c.progress = args.progress
        workdir = out_dir / args.dataset / algorithm  # rerunning reuses finished runs
        runs[algorithm if algorithm == "dense" else "rigl 90%"] = workdir
        # Resume only a run that exists: a first run prints nothing but its own output.
        results[algorithm] = train_lib.train(c, workdir, dataset=ds,
                                             resume=(workdir / "checkpoints").is_dir())
    dense, rigl = results["dense"], results["rigl"]
    state = rigl["state"]
    jaxsparse.check_sparse(state.params, state.opt_state)  # exactly sparse, or names the leaf
    masks = jaxsparse.get_masks(state.opt_state)
    rows = jaxsparse.sparsity_table(masks, state.params)
    print()
    print(jaxsparse.format_table(rows))
    print()
    print(f"dense      test accuracy {dense['test_accuracy']:.4f}  ({dense['wall_time']:.1f}s)")
    print(f"rigl 90%   test accuracy {rigl['test_accuracy']:.4f}  ({rigl['wall_time']:.1f}s), "
          f"sparsity {rigl['sparsity']:.4f} of all params, ITOP rate {rigl['itop_rate']:.3f}")
    png = plot(runs, rows, out_dir / "quickstart.png")
    print(f"plot written to {png}")
    print(export_condensed(state.params, masks, out_dir))
    total = time.perf_counter() - t0
    print(f"total wall time {total:.1f}s")
    sys.stdout.flush()
    return {"dense": dense["test_accuracy"], "rigl": rigl["test_accuracy"],
            "sparsity": rigl["sparsity"], "mask_sparsity": float(np.mean(
                [r.sparsity for r in rows if r.path.endswith("kernel")])),
            "wall_time": total, "plot": str(png)}


if __name__ == "__main__":
    main()
