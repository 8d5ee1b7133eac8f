"""Condensed training of the byte LM's MLP blocks vs the masked dense LM (issue 18).

For each seed and MLP sparsity, three loops go in lockstep on the same batches (the
settings of the LM table, ``experiments/configs/lm_small.py``: the ``tiny`` preset, 64-byte
windows of the stdlib corpus, AdamW with warmup and cosine decay, 16 sequences per step,
topology updates every ``update_every`` steps until 75% of training, drop fraction 0.3):

* ``srigl_no_ablation_masked``: the dense LM under ``jaxsparse.srigl(..., ablation=False,
  distribution="uniform", prunable=MLP kernels)``: only the MLP kernels are sparse, the
  attention kernels, embeddings, biases and LayerNorms dense;
* ``srigl_no_ablation_condensed``: the LM with ``mlp="condensed"`` from the same initial
  weights and masks (``condense_params`` of the masked init) under
  ``srigl_condensed(<the same AdamW>)``, which updates the MLP values by the same rule and
  every other leaf with the inner AdamW alone (as the masked run's dense leaves);
* ``dense``: the dense LM with the same AdamW (the wall-clock and memory reference).

Records (``results/<out>/results.jsonl``, ``--out`` default ``condensed_training_lm``), one
``final`` record per loop and run: validation loss and perplexity (bytes) on the first
``eval_windows`` validation windows, mask agreement of the two sparse runs at the end
(MLP kernels), mean time per step of each loop after compilation, bytes of params plus
optimizer state (``state_bytes``; of the MLP layers alone: ``mlp_state_bytes``: values or
kernels, biases, masks or indices, AdamW moments) and XLA's temporary buffer size of the
compiled step (``step_temp_bytes``).

    python -m experiments.condensed_training_lm --sparsities 0.9 0.95 0.99 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jaxsparse
from experiments.condensed_lockstep import (
    Lockstep,
    append_records,
    machine,
    mask_agreement,
    summary_table,
    tree_bytes,
)
from experiments.configs import lm_small
from experiments.lm import data as data_lib
from experiments.lm import model as model_lib
from experiments.train import learning_rate_schedule
from jaxsparse.condensed import training as T

ROOT = Path(__file__).resolve().parents[1]
MLP_KERNELS = r"/(fc|proj)/kernel$"
MLP_LEAVES = r"(^|/)(fc|proj)/"  # the MLP layers' params and their optimizer state


def xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()


def mlp_n_in(model) -> dict[str, int]:
    """Input width of each MLP layer, by layer path (for ``expand_params``)."""
    out = {}
    for i in range(model.num_layers):
        out[f"block_{i}/fc"], out[f"block_{i}/proj"] = model.d_model, model.d_ff
    return out


def _compile(fn, *args):
    """``(compiled fn, temporary bytes of its program or None)``."""
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        temp = None
    return compiled, temp


def run(c, sparsity: float, seed: int, corpus, args):
    steps = int(c.num_steps)
    end_step = int(c.end_fraction * steps)
    dense = model_lib.make_model(c.model)
    cond = model_lib.make_model(_condensed_config(c.model, sparsity))
    lr = learning_rate_schedule(c, steps)
    inner = optax.adamw(lr, weight_decay=float(c.weight_decay))
    k_init, k_tx, k_data = jax.random.split(jax.random.key(seed), 3)
    kw = dict(key=k_tx, end_step=end_step, update_every=int(c.update_every),
              drop_fraction=float(c.drop_fraction))
    tx = jaxsparse.srigl(inner, sparsity, ablation=False, distribution="uniform",
                         prunable=MLP_KERNELS, track_itop=False, **kw)
    params0 = model_lib.init_params(dense, k_init)
    mp, ms = jax.jit(lambda p: jaxsparse.init_masked(tx, p))(params0)
    cp, ci = T.condense_params(mp, jaxsparse.get_masks(ms))
    shapes = jax.eval_shape(lambda: model_lib.init_variables(cond, k_init))
    got = jax.tree.map(jnp.shape, {"params": cp, "sparsity": ci})
    want = jax.tree.map(lambda s: s.shape, shapes)
    if got != want:
        raise ValueError(f"condensed masked init {got} does not match the condensed LM {want}")
    ctx = T.srigl_condensed(inner, **kw)
    cs = ctx.init(cp, ci)
    dp, ds = params0, inner.init(params0)

    def dense_step(p, s, tok):
        g = jax.grad(lambda p: xent(dense.apply({"params": p}, tok[:, :-1]), tok[:, 1:]))(p)
        u, s = inner.update(g, s, p)
        return optax.apply_updates(p, u), s

    def masked_step(p, s, tok):
        g = jax.grad(lambda p: xent(dense.apply({"params": p}, tok[:, :-1]), tok[:, 1:]))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def condensed_step(p, s, tok):
        v = {"params": p, "sparsity": T.get_indices(s)}
        x, y = tok[:, :-1], tok[:, 1:]
        g = jax.grad(lambda p: xent(cond.apply({**v, "params": p}, x), y))(p)
        return ctx.step(g, s, p, dense_grads=lambda: T.dense_weight_grads(
            cond.apply, v, xent, x, y))

    data = jnp.asarray(corpus.train)
    batch = jax.jit(lambda t: data_lib.get_batch(data, k_data, t, int(c.batch_size),
                                                 int(c.model.seq_len)))
    tok0 = batch(0)
    compiled, temp = {}, {}
    for name, fn, state in (("dense", dense_step, (dp, ds)), ("masked", masked_step, (mp, ms)),
                            ("condensed", condensed_step, (cp, cs))):
        compiled[name], temp[name] = _compile(fn, *state, tok0)
    states = {"dense": (dp, ds), "masked": (mp, ms), "condensed": (cp, cs)}
    state_bytes = {k: tree_bytes(v) for k, v in states.items()}
    mlp_bytes = {k: tree_bytes(v, MLP_LEAVES) for k, v in states.items()}
    loops = Lockstep(compiled, {"dense": (dp, ds), "masked": (mp, ms),
                                "condensed": (cp, cs)}, warmup=args.warmup)
    for t in range(steps):
        loops.step(batch(t))
        if (t + 1) % 100 == 0:
            print(f"  seed {seed} s={sparsity} step {t + 1}/{steps}", flush=True)
    (dp, _), (mp, ms), (cp, cs) = (loops.states[k] for k in ("dense", "masked", "condensed"))
    idx = T.get_indices(cs)

    windows = data_lib.eval_windows(corpus.valid, int(c.model.seq_len), int(c.eval_windows))
    n = (len(windows) // args.eval_batch) * args.eval_batch
    win = jnp.asarray(windows[:n].reshape(n // args.eval_batch, args.eval_batch, -1))

    def evaluate(apply, variables):
        return float(jax.jit(lambda v: jax.lax.map(
            lambda t: xent(apply(v, t[:, :-1]), t[:, 1:]), win).mean())(variables))

    losses = {"dense": evaluate(dense.apply, {"params": dp}),
              "masked": evaluate(dense.apply, {"params": mp}),
              "condensed": evaluate(cond.apply, {"params": cp, "sparsity": idx})}
    _, cmasks = T.expand_params(cp, idx, mlp_n_in(cond))
    agree = mask_agreement(jaxsparse.get_masks(ms), cmasks)
    times = loops.step_ms()
    out = {}
    for name, loss in losses.items():
        out[name] = {"valid_loss": loss, "valid_perplexity": math.exp(loss),
                     "step_ms": times[name], "timed_steps": loops.timed_steps,
                     "state_bytes": state_bytes[name], "mlp_state_bytes": mlp_bytes[name],
                     "step_temp_bytes": temp[name]}
    return out, agree, steps


def _condensed_config(model_cfg, sparsity):
    cfg = model_cfg.copy_and_resolve_references()
    cfg.mlp, cfg.mlp_sparsity = "condensed", float(sparsity)
    return cfg


def config(args):
    c = lm_small.get_config()
    c.model = model_lib.lm_config(args.preset, seq_len=args.seq_len)
    if args.steps:
        c.num_steps = args.steps
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=0, help="default: the LM table's 300")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warmup", type=int, default=11, help="steps left out of the timing")
    ap.add_argument("--eval_batch", type=int, default=64)
    ap.add_argument("--out", default="condensed_training_lm")
    args = ap.parse_args(argv)
    c = config(args)
    corpus = data_lib.load_corpus(c.corpus, c.data_dir or None)
    out_dir = ROOT / "results" / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: c[k] for k in ("num_steps", "batch_size", "learning_rate", "warmup_steps",
                                  "lr_schedule", "weight_decay", "update_every",
                                  "drop_fraction", "end_fraction", "eval_windows")}
    rows = []
    for s in args.sparsities:
        for seed in args.seeds:
            res, agree, steps = run(c, s, seed, corpus, args)
            recs = [{"event": "final",
                     "algorithm": "dense" if name == "dense" else f"srigl_no_ablation_{name}",
                     "sparsity_target": s, "dataset": "stdlib", "model": f"lm-{args.preset}",
                     "seed": seed, "steps": steps, **r, "mask_agreement": agree,
                     "machine": machine(),
                     "config": json.dumps({**vars(args), **settings,
                                           "model": c.model.to_dict()})}
                    for name, r in res.items()]
            append_records(out_dir / "results.jsonl", recs)
            rows += recs
            print(f"  seed {seed} s={s}: " + ", ".join(
                f"{r['algorithm']} ppl {r['valid_perplexity']:.3f} {r['step_ms']:.2f} ms"
                for r in recs) + f", mask agreement {agree:.6f}", flush=True)
    print(summary_table(rows, args.sparsities, "valid_perplexity", "ppl",
                        loops=("dense", "masked", "condensed")))

if __name__ == "__main__":
    main()
