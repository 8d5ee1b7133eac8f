"""Grid sweep: methods x sparsities x seeds of ``experiments.train``, run in-process.

Each finished run appends one record (final test accuracy, sparsity, wall time, machine,
config) to ``<out>/results.jsonl``; runs already in that file are skipped, and a run that an
interruption left unfinished resumes from its newest intact checkpoint (``train(...,
resume=True)``, which refuses a changed config), so an interrupted sweep continues where it
stopped. Each run keeps its metrics and checkpoints in ``<out>/runs/<name>/``.
Dense runs ignore the sparsity axis (one per seed).

  python -m experiments.sweep --config=experiments/configs/digits_mlp.py --out=/tmp/sweep \
      --methods=dense,static,set,rigl --sparsities=0.8,0.9 --seeds=0,1,2
  python -m experiments.plots --results=/tmp/sweep/results.jsonl --out=/tmp/sweep/plots
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from experiments import train as train_lib


def load_config(path: str | os.PathLike):
    """``get_config()`` of a config file."""
    spec = importlib.util.spec_from_file_location("_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config, overrides: list[str]):
    """Applies ``key.sub=value`` strings (values parsed as JSON when possible)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"override {item!r}: the config has no field {key!r}")
        value = _parse_value(value)
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def grid(methods, sparsities, seeds):
    """``(method, sparsity, seed)`` triples; dense once per seed (sparsity 0)."""
    out = []
    for m in methods:
        for seed in seeds:
            for s in [0.0] if m == "dense" else sparsities:
                out.append((m, float(s), int(seed)))
    return out


def run_name(method, sparsity, seed) -> str:
    return f"{method}_s{sparsity:g}_seed{seed}"


def done_runs(results: Path) -> set[str]:
    if not results.exists():
        return set()
    with open(results) as f:
        return {json.loads(line)["run"] for line in f if line.strip()}


def sweep(config, out_dir: str | os.PathLike, methods, sparsities, seeds, progress=False,
          log=print) -> list[dict]:
    """Runs the grid; returns the records appended in this call."""
    registry = train_lib.algorithm_registry()
    unknown = [m for m in methods if m not in registry]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(registry)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    done = done_runs(results)
    dataset = train_lib.load_data(config)
    new = []
    for method, sparsity, seed in grid(methods, sparsities, seeds):
        name = run_name(method, sparsity, seed)
        if name in done:
            log(f"{name}: already in {results}, skipped")
            continue
        c = config.copy_and_resolve_references()
        c.algorithm, c.seed, c.progress, c.print_table = method, seed, progress, False
        if method != "dense":
            c.sparsity = sparsity
        workdir = out_dir / "runs" / name
        resume = workdir.exists()
        if resume:
            log(f"{name}: unfinished run in {workdir}, resuming it")
        out = train_lib.train(c, workdir, resume=resume, dataset=dataset)
        record = {k: v for k, v in out.items() if k not in ("state", "table")}
        record.update(
            run=name, sparsity_target=0.0 if method == "dense" else sparsity,
            metrics_path=str(workdir / "metrics.jsonl"),
            model_config=json.dumps(c.model.to_dict(), default=list),
            image_shape=list(dataset.image_shape), config=c.to_json_best_effort(),
        )
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        new.append(record)
        log(f"{name}: test accuracy {record['test_accuracy']:.4f}, sparsity "
            f"{record['sparsity']:.4f}, {record['wall_time']:.1f}s")
    return new


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def main(argv=None):
    parser = argparse.ArgumentParser(description="methods x sparsities x seeds sweep")
    parser.add_argument("--config", default="experiments/configs/digits_mlp.py")
    parser.add_argument("--out", required=True, help="output folder (results.jsonl, runs/)")
    parser.add_argument("--methods", default="dense,static,set,rigl")
    parser.add_argument("--sparsities", default="0.8,0.9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override key=value (repeatable), e.g. --set epochs=5")
    parser.add_argument("--progress", action="store_true", help="progress bar per run")
    args = parser.parse_args(argv)
    config = apply_overrides(load_config(args.config), args.overrides)
    sweep(config, args.out, [m for m in args.methods.split(",") if m], _floats(args.sparsities),
          [int(s) for s in args.seeds.split(",") if s], progress=args.progress)
    print(f"results: {Path(args.out) / 'results.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
