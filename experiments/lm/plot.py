"""Learning curves of an LM sweep: train loss (nats/byte) against step, one panel per
sparsity, one line per method (mean over seeds), dense in every panel; a second row of
validation perplexity when the runs evaluated more than once (``eval_every`` > 0).

  python -m experiments.lm.plot --results=results/lm_small/results.jsonl \
      --out=results/lm_small/curves.png

With ``--chosen`` (a sweep over learning rates, ``experiments.lm.sweep --learning_rates``),
each method and sparsity is drawn from its runs at the rate chosen on validation only.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def at_chosen_rates(records: list[dict]) -> list[dict]:
    """The records at the learning rate chosen for their method and sparsity on the
    selection seed (the lowest seed) by :func:`experiments.lm.sweep.chosen_lr`."""
    from experiments.lm.sweep import chosen_lr

    sel = min(r["seed"] for r in records)
    rate = {}
    for r in records:
        cell = (r["algorithm"], r["sparsity_target"])
        if cell not in rate:
            rate[cell] = chosen_lr(records, *cell, sel)
    return [r for r in records if r["learning_rate"] == rate[(r["algorithm"],
                                                                 r["sparsity_target"])]]


def curves(results: Path, event: str = "train", key: str = "train_loss",
           chosen: bool = False) -> dict:
    """``{(algorithm, sparsity_target): (steps, mean over seeds of key)}`` from the
    ``event`` records of each run's ``metrics.jsonl`` (with ``chosen``, only the runs of
    :func:`at_chosen_rates`)."""
    by = collections.defaultdict(list)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    for r in at_chosen_rates(records) if chosen else records:
        path = Path(r["metrics_path"])
        if not path.exists():
            continue
        pts = []
        for x in map(json.loads, path.read_text().splitlines()):
            if x.get("event") == "final":  # a rerun into the same folder appends: keep the first
                break
            if x.get("event") == event:
                pts.append((x["step"], x[key]))
        by[(r["algorithm"], r["sparsity_target"])].append(pts)
    out = {}
    for k, runs in by.items():
        n = min(len(p) for p in runs)
        steps = np.array([s for s, _ in runs[0][:n]])
        out[k] = (steps, np.mean([[v for _, v in p[:n]] for p in runs], axis=0))
    return out


def main(argv=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--chosen", action="store_true",
                   help="only the runs at each cell's learning rate chosen on validation")
    a = p.parse_args(argv)
    rows = [(curves(Path(a.results), chosen=a.chosen), "train loss (nats/byte)")]
    valid = curves(Path(a.results), "eval", "valid_perplexity", chosen=a.chosen)
    if any(len(steps) > 1 for steps, _ in valid.values()):
        rows.append((valid, "validation perplexity"))
    sparsities = sorted({s for (m, s) in rows[0][0] if m != "dense"})
    cols = max(1, len(sparsities))
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.5 * cols, 3.5 * len(rows)),
                             sharey="row", squeeze=False)
    for r, (data, ylabel) in enumerate(rows):
        for ax, sp in zip(axes[r], sparsities):
            for (m, s), (steps, value) in sorted(data.items()):
                if s == sp or m == "dense":
                    ax.plot(steps, value, label=m, linestyle="--" if m == "dense" else "-")
            ax.set_title(f"sparsity {sp:g}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel(ylabel)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)


if __name__ == "__main__":
    main()
