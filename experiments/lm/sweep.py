"""LM results grid: methods x sparsities x seeds of :func:`experiments.lm.trainer.train`,
in one process. Each finished run appends a record to ``<out>/results.jsonl`` (the record
format of ``experiments/sweep.py``: ``event="final"``, ``algorithm``, ``sparsity_target``,
``seed``, ... with ``valid_loss`` / ``valid_perplexity`` in place of test accuracy); runs
already in the file are skipped. Each run's learning curve is ``<runs>/<name>/metrics.jsonl``.

  python -m experiments.lm.sweep --config=experiments/configs/lm_small.py \
      --out=results/lm_small --runs=runs/lm_small \
      --methods=dense,static,rigl,srigl,magnitude --sparsities=0.5,0.75,0.9 --seeds=0,1
  python -m experiments.lm.sweep --out=results/lm_small --table    # markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import jax


def _machine() -> str:
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} {jax.devices()[0].platform}")


def table(results: Path) -> str:
    """Markdown table: validation perplexity, mean +- sample std over seeds (n), per method
    and sparsity, from a ``results.jsonl``."""
    import statistics
    rows: dict = {}
    for line in Path(results).read_text().splitlines():
        r = json.loads(line)
        rows.setdefault((r["algorithm"], r["sparsity_target"]), []).append(
            r["valid_perplexity"])
    sparsities = sorted({s for (m, s) in rows if m != "dense"})
    methods = ["dense"] + sorted({m for (m, _) in rows if m != "dense"})
    out = ["| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
           "|---|" + "---|" * len(sparsities)]

    def cell(v):
        if not v:
            return "-"
        sd = f" +- {statistics.stdev(v):.2f}" if len(v) > 1 else ""
        return f"{statistics.mean(v):.2f}{sd} (n={len(v)})"

    for m in methods:
        cells = [cell(rows.get((m, 0.0), [])) if m == "dense" else cell(rows.get((m, s), []))
                 for s in sparsities]
        if m == "dense":
            cells = [cells[0]] + ["" for _ in sparsities[1:]]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    from experiments.lm import trainer
    from experiments.sweep import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", default="")
    p.add_argument("--table", action="store_true", help="print the table of <out> and exit")
    p.add_argument("--methods", default="dense,static,rigl,srigl,magnitude")
    p.add_argument("--sparsities", default="0.5,0.75,0.9")
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args(argv)
    if a.table:
        print(table(Path(a.out) / "results.jsonl"))
        return
    if not a.config or not a.runs:
        p.error("--config and --runs are needed to run the grid")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = set()
    if results.exists():
        done = {json.loads(line)["run"] for line in results.read_text().splitlines() if line}
    seeds = [int(s) for s in a.seeds.split(",")]
    methods = a.methods.split(",")
    # Sparsity outermost: an interrupted sweep leaves whole (methods x seeds) tables.
    grid = [(0.0, seed, "dense") for seed in seeds if "dense" in methods]
    grid += [(float(sp), seed, m) for sp in a.sparsities.split(",") for seed in seeds
             for m in methods if m != "dense"]
    for sparsity, seed, method in grid:
        name = f"{method}_s{sparsity:g}_seed{seed}"
        if name in done:
            continue
        c = load_config(a.config)
        c.algorithm, c.seed = method, seed
        if method != "dense":
            c.sparsity = sparsity
        workdir = Path(a.runs) / name
        _, final = trainer.train(c, str(workdir))
        record = {"event": "final", "algorithm": method, "sparsity_target": sparsity,
                  "distribution": c.distribution, "dataset": c.corpus,
                  "model": "lm", "seed": seed, **{k: v for k, v in final.items()
                                                 if k != "event"},
                  "machine": _machine(), "run": name,
                  "metrics_path": str(workdir / "metrics.jsonl"),
                  "model_config": json.dumps(c.model.to_dict(), sort_keys=True),
                  "config": c.to_json(sort_keys=True)}
        record.setdefault("sparsity", 0.0)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(name, f"valid ppl {final.get('valid_perplexity', float('nan')):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
