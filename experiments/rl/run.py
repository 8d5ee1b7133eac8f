"""Sweep DQN over algorithms x sparsities, all seeds of a setting in one vmapped program.

Each finished setting appends, per seed, one ``final`` record (greedy return of the final
network, training return over the last 10% of training, sparsity, wall time, machine) and
one ``curve`` record (training return per log window) to ``<out>/results.jsonl``; settings
already there are skipped, so an interrupted sweep continues. ``--report`` prints the
final-return table and writes ``<out>/returns.png``.

  python -m experiments.rl.run --config=experiments/configs/rl_cartpole.py \
      --out=results/rl_cartpole [--algorithms=dense,rigl] [--sparsities=0.9] [--seeds=0,1]
  python -m experiments.rl.run --config=experiments/configs/rl_cartpole.py \
      --out=results/rl_cartpole --report
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from experiments.rl import dqn
from experiments.sweep import load_config
from experiments.train import machine_description

LAST_FRACTION = 0.1  # "training return" = mean over the last 10% of log windows


def dqn_config(c, algorithm: str, sparsity: float) -> dqn.DQNConfig:
    """The :class:`dqn.DQNConfig` of one setting of sweep config ``c``."""
    fields = {k: c[k] for k in dqn.DQNConfig._fields if k in c}
    fields["hidden"] = tuple(fields.get("hidden", dqn.DQNConfig().hidden))
    return dqn.DQNConfig(**fields, algorithm=algorithm,
                         sparsity=0.0 if algorithm == "dense" else float(sparsity))


def settings(algorithms: Sequence[str], sparsities: Sequence[float]):
    """``(algorithm, sparsity)`` pairs; dense once (sparsity 0)."""
    out = []
    for a in algorithms:
        for s in ([0.0] if a == "dense" else sparsities):
            out.append((a, float(s)))
    return out


def run_name(algorithm: str, sparsity: float, seed: int) -> str:
    return f"{algorithm}_s{sparsity:g}_seed{seed}"


def run_setting(cfg: dqn.DQNConfig, seeds: Sequence[int]) -> list[dict]:
    """Trains every seed of ``cfg`` in one vmapped program; one final + one curve record per
    seed."""
    start = time.perf_counter()
    result = jax.device_get(dqn.train_seeds(cfg, seeds))
    wall = time.perf_counter() - start
    last = max(1, int(round(LAST_FRACTION * cfg.num_logs)))
    machine = machine_description()
    records = []
    for i, seed in enumerate(seeds):
        curve = np.asarray(result.curve_return[i], np.float64)
        name = run_name(cfg.algorithm, cfg.sparsity, seed)
        common = {"algorithm": cfg.algorithm, "sparsity_target": cfg.sparsity,
                  "distribution": cfg.distribution, "env": cfg.env_name,
                  "model": "mlp" + "x".join(map(str, cfg.hidden)), "seed": int(seed),
                  "run": name}
        records.append({
            "event": "final", **common,
            "env_steps": int(result.curve_steps[i][-1]),
            "gradient_steps": dqn.train_iterations(cfg),
            "final_return": float(result.eval_return[i]),
            "train_return_last": float(np.nanmean(curve[-last:])),
            "sparsity": float(result.sparsity[i]),
            "wall_time": wall, "seeds_in_program": len(seeds), "machine": machine,
            "config": json.dumps(cfg._asdict(), sort_keys=True, default=list),
        })
        records.append({
            "event": "curve", **common,
            "env_steps": [int(x) for x in result.curve_steps[i]],
            "train_return": [None if math.isnan(x) else float(x) for x in curve],
            "td_loss": [float(x) for x in result.curve_loss[i]],
        })
    return records


def done_settings(path: Path) -> set[tuple[str, float]]:
    if not path.exists():
        return set()
    return {(r["algorithm"], float(r["sparsity_target"])) for r in _load(path)
            if r.get("event") == "final"}


def _load(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean_std(values) -> str:
    v = np.asarray(values, np.float64)
    std = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():.1f} +- {std:.1f} (n={len(v)})"


def summary_table(records: list[dict], key: str = "final_return") -> str:
    """Markdown: one row per algorithm, one column per sparsity; mean +- sample std (n)."""
    groups = collections.defaultdict(list)
    for r in records:
        if r.get("event") == "final":
            groups[(r["algorithm"], round(float(r["sparsity_target"]), 4))].append(r[key])
    sparsities = sorted({s for a, s in groups if a != "dense"})
    algorithms = sorted({a for a, _ in groups}, key=lambda a: (a != "dense", a))
    head = ["method"] + [f"{s:.0%}" for s in sparsities]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in algorithms:
        if a == "dense":
            cells = [_mean_std(groups[(a, 0.0)])] + ["(same)"] * (len(sparsities) - 1)
        else:
            cells = [_mean_std(groups[(a, s)]) if groups.get((a, s)) else "-"
                     for s in sparsities]
        lines.append("| " + " | ".join([a] + cells) + " |")
    return "\n".join(lines)


def plot_returns(records: list[dict], out: str | Path, title: str = "") -> Path:
    """Training-return curves, mean +- std over seeds; one panel per sparsity, dense in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = collections.defaultdict(list)
    for r in records:
        if r.get("event") == "curve":
            y = np.array([np.nan if v is None else v for v in r["train_return"]], np.float64)
            curves[(r["algorithm"], round(float(r["sparsity_target"]), 4))].append(
                (np.asarray(r["env_steps"]), y))
    sparsities = sorted({s for a, s in curves if a != "dense"}) or [0.0]
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.5 * len(sparsities), 3.6),
                             sharey=True, squeeze=False)
    for ax, s in zip(axes[0], sparsities):
        for (a, sp), runs in sorted(curves.items()):
            if sp != s and a != "dense":
                continue
            x = runs[0][0]
            ys = np.stack([y for _, y in runs])
            mean, std = np.nanmean(ys, axis=0), np.nanstd(ys, axis=0, ddof=1 if len(ys) > 1 else 0)
            line, = ax.plot(x, mean, label=f"{a} (n={len(ys)})",
                            linestyle="--" if a == "dense" else "-")
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
        ax.set_title(f"{title} {s:.0%} sparsity".strip())
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training episode return")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _csv(text, cast):
    return tuple(cast(x) for x in text.split(",") if x)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--algorithms", type=lambda t: _csv(t, str), default=None)
    p.add_argument("--sparsities", type=lambda t: _csv(t, float), default=None)
    p.add_argument("--seeds", type=lambda t: _csv(t, int), default=None)
    p.add_argument("--report", action="store_true", help="print the table, write the plot")
    a = p.parse_args(argv)
    c = load_config(a.config)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if a.report:
        records = _load(results)
        key_random = [r for r in records if r.get("event") == "random_policy"]
        print(summary_table(records, "final_return"))
        print("\nTraining return, last 10% of training:\n")
        print(summary_table(records, "train_return_last"))
        if key_random:
            print(f"\nRandom policy: {key_random[-1]['return']:.1f} "
                  f"({key_random[-1]['episodes']} episodes)")
        print(plot_returns(records, out / "returns.png", c.env_name))
        return records
    algorithms = a.algorithms or tuple(c.algorithms)
    for alg in algorithms:
        if alg not in dqn.ALGORITHMS:
            raise ValueError(f"--algorithms: unknown algorithm {alg!r}; choose from "
                             f"{dqn.ALGORITHMS}")
    sparsities = a.sparsities or tuple(c.sparsities)
    seeds = a.seeds or tuple(c.seeds)
    done = done_settings(results)
    records = []
    if not results.exists() or not any(r.get("event") == "random_policy"
                                       for r in _load(results)):
        rnd = {"event": "random_policy", "env": c.env_name, "episodes": 1024,
               "return": float(dqn.random_policy_return(c.env_name, jax.random.key(0), 1024))}
        with open(results, "a") as f:
            f.write(json.dumps(rnd) + "\n")
    for alg, sp in settings(algorithms, sparsities):
        if (alg, sp) in done:
            continue
        new = run_setting(dqn_config(c, alg, sp), seeds)
        with open(results, "a") as f:
            for r in new:
                f.write(json.dumps(r) + "\n")
        finals = [r["final_return"] for r in new if r["event"] == "final"]
        print(f"{alg} {sp:.0%}: final return {_mean_std(finals)}, "
              f"{new[0]['wall_time']:.0f} s", flush=True)
        records += new
    return records


if __name__ == "__main__":
    main()
