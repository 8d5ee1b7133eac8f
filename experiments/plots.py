"""Plots for RESULTS.md from the JSONL files the experiments write.

* :func:`plot_frontier`: test accuracy vs sparsity per method, mean +- std over seeds
  (from a sweep's results JSONL; dense runs drawn as a band).
* :func:`plot_layer_sparsity`: per-layer sparsity of ERK vs uniform for a model (computed
  from the distributions, no training needed).
* :func:`plot_itop`: ITOP rate over training (from runs' ``metrics.jsonl``).
* :func:`plot_curves`: test accuracy over training (from runs' ``metrics.jsonl``).

  python -m experiments.plots --results=/tmp/sweep/results.jsonl --out=/tmp/sweep/plots
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def frontier_table(records: list[dict]) -> dict[str, list[tuple[float, float, float, int]]]:
    """``{algorithm: [(sparsity, mean acc, std acc, n seeds), ...]}`` sorted by sparsity,
    from final records (``event == "final"``)."""
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in records:
        if r.get("event", "final") != "final":
            continue
        sparsity = 0.0 if r["algorithm"] == "dense" else float(r["sparsity_target"])
        groups[(r["algorithm"], sparsity)].append(float(r["test_accuracy"]))
    out: dict[str, list] = defaultdict(list)
    for (alg, sp), accs in sorted(groups.items()):
        a = np.asarray(accs)
        out[alg].append((sp, float(a.mean()), float(a.std()), len(a)))
    return dict(out)


def plot_frontier(records: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Sparsity-accuracy frontier: one line per method with a +-std band."""
    plt = _plt()
    table = frontier_table(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    for alg, rows in sorted(table.items()):
        sp, mean, std, _ = map(np.asarray, zip(*rows, strict=True))
        if alg == "dense":
            ax.axhspan(mean[0] - std[0], mean[0] + std[0], color="gray", alpha=0.2)
            ax.axhline(mean[0], color="gray", ls="--", label="dense")
            continue
        ax.errorbar(sp, mean, yerr=std, marker="o", capsize=3, label=alg)
        ax.fill_between(sp, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "sparsity-accuracy frontier (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def layer_sparsities(model_cfg, image_shape, sparsity: float, distribution: str,
                     num_classes: int = 10) -> dict[str, float]:
    """``{layer path: sparsity}`` that ``distribution`` gives each prunable layer."""
    import jax

    import jaxsparse
    from experiments import models

    model = models.create_model(model_cfg, num_classes)
    params = jax.eval_shape(lambda k: models.init_params(model, image_shape, k),
                            jax.random.key(0))
    specs = jaxsparse.layer_specs(params)
    budgets = jaxsparse.layer_budgets(specs, sparsity, distribution)
    return {s.path: 1.0 - budgets[s.path] / s.size for s in specs}


def plot_layer_sparsity(model_cfg, image_shape, out: str | os.PathLike, sparsity: float = 0.9,
                        distributions=("uniform", "erk")) -> Path:
    """Per-layer sparsity of each distribution, as grouped bars."""
    plt = _plt()
    per = {d: layer_sparsities(model_cfg, image_shape, sparsity, d) for d in distributions}
    layers = list(next(iter(per.values())))
    x = np.arange(len(layers))
    width = 0.8 / len(distributions)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(layers)), 4))
    for i, d in enumerate(distributions):
        ax.bar(x + i * width, [per[d][k] for k in layers], width, label=d)
    ax.set_xticks(x + width * (len(distributions) - 1) / 2)
    ax.set_xticklabels([k.replace("/kernel", "") for k in layers], rotation=45, ha="right")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(f"per-layer sparsity at {sparsity:g} overall ({model_cfg['name']})")
    ax.legend()
    return _save(fig, out)


def _series(records, event, key):
    last = {}
    for r in records:  # a resumed run repeats some steps: keep the latest record per step
        if r.get("event") == event and key in r:
            last[r["step"]] = r[key]
    steps = sorted(last)
    return np.asarray(steps), np.asarray([last[s] for s in steps])


def plot_itop(metrics: dict[str, str | os.PathLike], out: str | os.PathLike) -> Path:
    """ITOP rate (fraction of weights ever active) vs step, one line per run."""
    return _plot_series(metrics, out, "train", "itop_rate", "ITOP rate",
                        "in-time over-parameterisation")


def plot_curves(metrics: dict[str, str | os.PathLike], out: str | os.PathLike) -> Path:
    """Validation accuracy vs step, one line per run (test accuracy for runs without a
    validation split: their per-epoch evaluations used the test split)."""
    with_val = any(r.get("event") == "eval" and "val_accuracy" in r
                   for path in metrics.values() for r in load_jsonl(path))
    key, name = ("val_accuracy", "validation") if with_val else ("test_accuracy", "test")
    return _plot_series(metrics, out, "eval", key, f"{name} accuracy",
                        f"{name} accuracy during training")


def plot_active_neurons(metrics: dict[str, str | os.PathLike], out: str | os.PathLike,
                        layer: str) -> Path:
    """Active (non-ablated) neurons of ``layer`` over training, one line per run."""
    return _plot_series(metrics, out, "eval", f"active_neurons/{layer}", "active neurons",
                        f"active neurons of {layer} over training")


def _plot_series(metrics, out, event, key, ylabel, title):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, path in metrics.items():
        steps, values = _series(load_jsonl(path), event, key)
        if len(steps):
            ax.plot(steps, values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _plt().close(fig)
    return out


def plot_sweep(results: str | os.PathLike, out_dir: str | os.PathLike,
               itop_sparsity: float | None = None, neuron_layer: str | None = None) -> list[Path]:
    """All RESULTS.md plots for one sweep results file; returns the PNG paths."""
    records = [r for r in load_jsonl(results) if r.get("event", "final") == "final"]
    if not records:
        raise ValueError(f"{results} holds no final records")
    out_dir = Path(out_dir)
    paths = [plot_frontier(records, out_dir / "frontier.png")]
    sparse = [r for r in records if r["algorithm"] != "dense"]
    if sparse:
        first = sparse[0]
        target = itop_sparsity if itop_sparsity is not None else first["sparsity_target"]
        runs = {f"{r['algorithm']} seed {r['seed']}": r["metrics_path"] for r in sparse
                if r.get("metrics_path") and r["sparsity_target"] == target
                and Path(r["metrics_path"]).exists()}
        if runs:
            paths.append(plot_itop(runs, out_dir / "itop.png"))
            paths.append(plot_curves(runs, out_dir / "curves.png"))
            layers = sorted({k.split("/", 1)[1] for r in sparse for k in r
                             if k.startswith("active_neurons/")})
            if neuron_layer is not None and neuron_layer not in layers:
                raise ValueError(f"no active-neuron records for layer {neuron_layer!r}; "
                                 f"layers: {layers}")
            if layers:
                paths.append(plot_active_neurons(runs, out_dir / "active_neurons.png",
                                                 neuron_layer or layers[0]))
    if records[0].get("model_config") and records[0].get("image_shape"):
        paths.append(plot_layer_sparsity(json.loads(records[0]["model_config"]),
                                         tuple(records[0]["image_shape"]),
                                         out_dir / "layer_sparsity.png",
                                         sparsity=max(r["sparsity_target"] for r in records)))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plots from a sweep's results JSONL.")
    parser.add_argument("--results", required=True, help="results.jsonl written by sweep.py")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--itop_sparsity", type=float, default=None,
                        help="sparsity whose runs go in the ITOP plot (default: first)")
    parser.add_argument("--neuron_layer", default=None,
                        help="layer of the active-neurons plot, e.g. Dense_1/kernel "
                             "(default: the first)")
    args = parser.parse_args(argv)
    for p in plot_sweep(args.results, args.out, args.itop_sparsity, args.neuron_layer):
        print(p)


if __name__ == "__main__":
    main()
