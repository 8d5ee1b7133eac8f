"""LM results grid: methods x sparsities x seeds of :func:`experiments.lm.trainer.train`,
in one process. Each finished run appends a record to ``<out>/results.jsonl`` (the record
format of ``experiments/sweep.py``: ``event="final"``, ``algorithm``, ``sparsity_target``,
``seed``, ... with ``valid_loss`` / ``valid_perplexity`` in place of test accuracy); runs
already in the file are skipped. Each run's learning curve is ``<runs>/<name>/metrics.jsonl``.

  python -m experiments.lm.sweep --config=experiments/configs/lm_small.py \
      --out=results/lm_small --runs=runs/lm_small \
      --methods=dense,static,rigl,srigl,magnitude --sparsities=0.5,0.75,0.9 --seeds=0,1
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


def main(argv=None) -> None:
    from experiments.lm import trainer
    from experiments.sweep import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", required=True)
    p.add_argument("--methods", default="dense,static,rigl,srigl,magnitude")
    p.add_argument("--sparsities", default="0.5,0.75,0.9")
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args(argv)
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
