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
import ast
import json
import time
from pathlib import Path

import jax
import numpy as np

from experiments.rl import dqn, run
from experiments.sweep import load_config
from experiments.train import machine_description


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or key not in dqn.DQNConfig._fields:
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE with FIELD one of "
                         f"{dqn.DQNConfig._fields}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


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
    overrides = dict(parse_override(t) for t in a.overrides)
    cfg = run.dqn_config(c, "dense", 0.0)._replace(**overrides)
    if "hidden" in overrides:
        cfg = cfg._replace(hidden=tuple(cfg.hidden))
    start = time.perf_counter()
    result = jax.device_get(dqn.train_seeds(cfg, a.seeds))
    wall = time.perf_counter() - start
    last = max(1, int(round(run.LAST_FRACTION * cfg.num_logs)))
    train_last = [float(np.nanmean(np.asarray(c_, np.float64)[-last:]))
                  for c_ in result.curve_return]
    rec = {"event": "tuning", "algorithm": "dense", "overrides": overrides,
           "seeds": list(a.seeds), "final_return": [float(x) for x in result.eval_return],
           "train_return_last": train_last, "env_steps": int(result.curve_steps[0][-1]),
           "gradient_steps": dqn.train_iterations(cfg), "wall_time": wall,
           "machine": machine_description(),
           "config": json.dumps(cfg._asdict(), sort_keys=True, default=list)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tuning.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    fr = np.array(rec["final_return"])
    print(f"{overrides}: greedy {fr.mean():.1f} +- {fr.std(ddof=1):.1f} {np.round(fr, 1)}, "
          f"train-last {np.round(train_last, 1)}, {wall:.0f} s", flush=True)
    return rec


if __name__ == "__main__":
    main()
