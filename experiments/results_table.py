"""Markdown tables (mean +- sample std, ddof=1, over seeds) from a sweep's ``results.jsonl``.

For RESULTS.md (every table and number generated from all records, with intervals and
tests) see :mod:`experiments.results_report`; this prints one sweep's tables.

  python -m experiments.results_table --results runs/mnist_lenet300/results.jsonl \
      [--published lenet300_mnist] [--neurons]

``--published`` adds the numbers quoted in ../shared/REFERENCES.md next to ours;
``--neurons`` adds a table of active (non-ablated) neurons per layer at the end of training.
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np

# Published test accuracies (%) quoted in ../shared/REFERENCES.md (sparse_learning results).
PUBLISHED = {
    "lenet300_mnist": {
        "dense": {0.0: 98.69},
        "snfs": {0.9: 98.67, 0.95: 98.53, 0.98: 98.20, 0.99: 97.53},
        "set": {0.9: 98.39, 0.95: 98.14, 0.98: 97.74, 0.99: 95.80},
    },
}


def load(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("event") == "final"]


def accuracy_table(records, published=None) -> str:
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r["algorithm"], round(float(r["sparsity_target"]), 4))].append(r)
    sparsities = sorted({s for _, s in groups if s > 0})
    methods = sorted({m for m, _ in groups}, key=lambda m: (m != "dense", m))
    head = ["method"] + [f"{s:.0%}" for s in sparsities]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [m]
        for s in sparsities:
            runs = groups.get((m, s)) or (groups.get((m, 0.0)) if m == "dense" else None)
            if not runs:
                cells.append("-")
                continue
            acc = 100 * np.array([r["test_accuracy"] for r in runs])
            sd = f"{acc.std(ddof=1):.2f}" if len(acc) > 1 else "n/a"
            cell = f"{acc.mean():.2f} +- {sd} (n={len(acc)})"
            pub = (published or {}).get(m, {})
            ref = pub.get(s, pub.get(0.0) if m == "dense" else None)
            if ref is not None:
                cell += f" / pub. {ref:.2f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def neurons_table(records) -> str:
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r["algorithm"], round(float(r["sparsity_target"]), 4))].append(r)
    layers = sorted({k.split("/", 1)[1] for r in records for k in r
                     if k.startswith("active_neurons/")})
    head = ["method", "sparsity"] + layers
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (m, s), runs in sorted(groups.items()):
        cells = [m, f"{s:.0%}"]
        for layer in layers:
            vals = [r.get(f"active_neurons/{layer}") for r in runs]
            vals = [v for v in vals if v is not None]
            cells.append(f"{np.mean(vals):.1f}" if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", required=True)
    p.add_argument("--published", default=None, choices=sorted(PUBLISHED))
    p.add_argument("--neurons", action="store_true")
    a = p.parse_args(argv)
    records = load(a.results)
    print(accuracy_table(records, PUBLISHED.get(a.published)))
    wall = [r["wall_time"] for r in records]
    print(f"\n{len(records)} runs, wall time per run {np.median(wall):.0f} s median "
          f"({min(wall):.0f}-{max(wall):.0f} s); machine: {records[0].get('machine', '?')}")
    if a.neurons:
        print("\nActive neurons per layer at the end of training (mean over seeds):\n")
        print(neurons_table(records))


if __name__ == "__main__":
    main()
