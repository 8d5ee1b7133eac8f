"""LM results grid: methods x sparsities x seeds of :func:`experiments.lm.trainer.train`,
in one process. Each finished run appends a record to ``<out>/results.jsonl`` (the record
format of ``experiments/sweep.py``: ``event="final"``, ``algorithm``, ``sparsity_target``,
``seed``, ... with ``valid_loss`` / ``valid_perplexity`` and, once after training,
``test_loss`` / ``test_perplexity`` in place of accuracies); runs already in the file are
skipped. With ``--learning_rates`` the grid also spans learning rates (run names end in
``_lr<value>``) for choosing one on the validation split; with ``--select_seed`` as well,
only that seed spans them and every other seed runs each (method, sparsity) at the one
chosen (:func:`chosen_lr`: lowest validation perplexity of the selection seed's records).
Each run's learning curve is ``<runs>/<name>/metrics.jsonl``.

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


def _machine() -> str:
    import jax
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} {jax.devices()[0].platform}")


def chosen_lr(records, method: str, sparsity: float, seed: int) -> float:
    """The learning rate of ``method`` at ``sparsity`` with the lowest validation perplexity
    among the ``records`` of seed ``seed`` (ties: the smaller rate).

    Raises:
      ValueError: naming the cell when the records hold no run of it for that seed.
    """
    tried = sorted((r["valid_perplexity"], r["learning_rate"]) for r in records
                   if r["algorithm"] == method and r["seed"] == seed
                   and r["sparsity_target"] == sparsity and "learning_rate" in r)
    if not tried:
        raise ValueError(f"no selection run of {method} at sparsity {sparsity:g} with seed "
                         f"{seed}: run the learning-rate grid for that seed first")
    return tried[0][1]


def grid(methods: list[str], sparsities: list[float], seeds: list[int],
         lrs: list[float | None], select_seed: int | None = None) -> list[tuple]:
    """The runs of a sweep, in order: ``(sparsity, seed, method, learning rate)``, dense
    first (once per seed, sparsity 0), then sparsity outermost (an interrupted sweep leaves
    whole methods x seeds tables). With ``select_seed`` only that seed spans ``lrs``; every
    other seed has one run per cell with rate ``None`` (chosen with :func:`chosen_lr` when
    it is reached, after the selection seed's runs of the cell, which come first).

    Raises:
      ValueError: ``select_seed`` without a grid of rates, or not among ``seeds``.
    """
    if select_seed is not None:
        if lrs == [None]:
            raise ValueError("--select_seed needs --learning_rates")
        if select_seed not in seeds:
            raise ValueError(f"--select_seed {select_seed} is not among --seeds "
                             f"{','.join(map(str, seeds))}")
        seeds = [select_seed] + [s for s in seeds if s != select_seed]

    def rates(seed):
        return lrs if select_seed is None or seed == select_seed else [None]

    out = [(0.0, seed, "dense", lr) for seed in seeds if "dense" in methods
           for lr in rates(seed)]
    return out + [(float(sp), seed, m, lr) for sp in sparsities for seed in seeds
                  for m in methods if m != "dense" for lr in rates(seed)]


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
    p.add_argument("--learning_rates", default="",
                   help="comma-separated learning rates to span (default: the config's)")
    p.add_argument("--select_seed", type=int, default=None,
                   help="with --learning_rates: only this seed spans them; the other seeds "
                        "run at the rate it chose on validation")
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
    lrs = [float(x) for x in a.learning_rates.split(",")] if a.learning_rates else [None]
    try:
        runs = grid(a.methods.split(","), [float(x) for x in a.sparsities.split(",")], seeds,
                    lrs, a.select_seed)
    except ValueError as e:
        p.error(str(e))
    for sparsity, seed, method, lr in runs:
        if lr is None and a.select_seed is not None:
            recs = ([json.loads(line) for line in results.read_text().splitlines() if line]
                    if results.exists() else [])
            lr = chosen_lr(recs, method, sparsity, a.select_seed)
        name = f"{method}_s{sparsity:g}_seed{seed}" + ("" if lr is None else f"_lr{lr:g}")
        if name in done:
            continue
        c = load_config(a.config)
        c.algorithm, c.seed = method, seed
        if lr is not None:
            c.learning_rate = lr
        if method != "dense":
            c.sparsity = sparsity
        workdir = Path(a.runs) / name
        _, final = trainer.train(c, str(workdir))
        record = {"event": "final", "algorithm": method, "sparsity_target": sparsity,
                  "distribution": c.distribution, "dataset": c.corpus,
                  "model": "lm", "seed": seed, "learning_rate": c.learning_rate,
                  **{k: v for k, v in final.items() if k != "event"},
                  "machine": _machine(), "run": name,
                  "metrics_path": str(workdir / "metrics.jsonl"),
                  "model_config": json.dumps(c.model.to_dict(), sort_keys=True),
                  "config": c.to_json(sort_keys=True)}
        record.setdefault("sparsity", 0.0)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(name, f"valid ppl {final.get('valid_perplexity', float('nan')):.3f}",
              f"test ppl {final.get('test_perplexity', float('nan')):.3f}", flush=True)


if __name__ == "__main__":
    main()
