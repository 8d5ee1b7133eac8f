"""Hyperparameter selection for the DQN sweep: dense agent only, on tuning seeds.

Trains the dense agent of a sweep config with some fields overridden, on seeds that must not
be the sweep's reported seeds, and appends one record (overrides, per-seed greedy and training
returns, wall time) to ``<out>/tuning.jsonl``. The choice is then written into the sweep
config by hand; the reported seeds are never looked at while choosing.

  python -m experiments.rl.tune --config=experiments/configs/rl_cartpole.py \
      --out=results/rl_cartpole_tuning --seeds=100,101,102 --set learning_rate=5e-4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.rl import dqn, run
from experiments.sweep import apply_overrides, load_config


def dqn_overrides(c, items: list[str]) -> dict:
    """Applies ``FIELD=VALUE`` items (JSON values, as ``experiments.sweep --set``) to sweep
    config ``c``; returns ``{field: new value}``. Only :class:`dqn.DQNConfig` fields."""
    fields = [item.partition("=")[0] for item in items]
    for f in fields:
        if f not in dqn.DQNConfig._fields:
            raise ValueError(f"--set {f}=...: not a DQNConfig field {dqn.DQNConfig._fields}")
    apply_overrides(c, items)
    return {f: c[f] for f in fields}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", required=True, type=lambda t: tuple(int(x) for x in t.split(",")))
    p.add_argument("--set", action="append", default=[], dest="overrides")
    a = p.parse_args(argv)
    c = load_config(a.config)
    reported = set(c.seeds)
    if reported & set(a.seeds):
        raise ValueError(f"--seeds {a.seeds} overlap the reported seeds {sorted(reported)}")
    overrides = dqn_overrides(c, a.overrides)
    cfg = run.dqn_config(c, "dense", 0.0)
    finals = [r for r in run.run_setting(cfg, a.seeds) if r["event"] == "final"]
    rec = {"event": "tuning", "algorithm": "dense", "overrides": overrides,
           "seeds": list(a.seeds), "final_return": [r["final_return"] for r in finals],
           "train_return_last": [r["train_return_last"] for r in finals],
           **{k: finals[0][k] for k in ("env_steps", "gradient_steps", "wall_time",
                                        "machine", "config")}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tuning.jsonl", "a") as f:
        f.write(json.dumps(rec, default=list) + "\n")
    fr = np.array(rec["final_return"])
    print(f"{overrides}: greedy {fr.mean():.1f} +- {fr.std(ddof=1):.1f} {np.round(fr, 1)}, "
          f"train-last {np.round(rec['train_return_last'], 1)}, {rec['wall_time']:.0f} s",
          flush=True)
    return rec


if __name__ == "__main__":
    main()
