"""Condensed training of ViT-tiny's MLP blocks vs the masked dense ViT (issue 18).

For each seed and MLP sparsity, two loops go in lockstep on the same batches (ViT-tiny of
:mod:`experiments.models`, MNIST or Fashion-MNIST with ``--validation_size`` training images
held out and unused, Adam with a cosine learning rate, topology updates every
``update_every`` steps until 75% of training, drop fraction 0.3):

* ``srigl_no_ablation_masked``: the dense ViT under ``jaxsparse.srigl(..., ablation=False,
  distribution="uniform", prunable=MLP kernels)``: only the MLP kernels are sparse;
* ``srigl_no_ablation_condensed``: the ViT with ``mlp="condensed"`` from the same initial
  weights and masks (``condense_params`` of the masked init) under ``srigl_condensed(<the
  same Adam>)``, growing from each MLP layer's ``GrowthInputs`` in blocks of neurons
  (``growth_inputs``).

Records (``results/<out>/results.jsonl``, ``--out`` default ``condensed_training_vit``): one
``final`` record per loop and run: test accuracy and loss, mask agreement of the two runs at
the end (MLP kernels), mean time per step after compilation.

    python -m experiments.condensed_training_vit --data_dir ../shared/data/mnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse
from experiments import models
from experiments.condensed_lockstep import (
    Lockstep,
    append_records,
    machine,
    mask_agreement,
    summary_table,
)
from experiments.data import load_dataset
from jaxsparse.condensed import training as T

ROOT = Path(__file__).resolve().parents[1]
MLP_KERNELS = r"/MlpBlock_0/Dense_[01]/kernel$"


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def run(ds, sparsity: float, seed: int, args):
    n = len(ds.x_train)
    steps_per_epoch = n // args.batch_size
    steps = steps_per_epoch * args.epochs
    shape = ds.x_train.shape[1:]
    dense = models.create_model(models.model_config("vit"))
    cond = models.create_model(models.model_config("vit", mlp="condensed",
                                                   mlp_sparsity=sparsity))
    inner = optax.adam(optax.cosine_decay_schedule(args.learning_rate, steps))
    k_init, k_tx = jax.random.split(jax.random.key(seed))
    kw = dict(key=k_tx, end_step=int(0.75 * steps), update_every=args.update_every,
              drop_fraction=args.drop_fraction)
    tx = jaxsparse.srigl(inner, sparsity, ablation=False, distribution="uniform",
                         prunable=MLP_KERNELS, track_itop=False, **kw)
    mp, ms = jax.jit(lambda p: jaxsparse.init_masked(tx, p))(
        models.init_params(dense, shape, k_init))
    cp, ci = T.condense_params(mp, jaxsparse.get_masks(ms))
    want = jax.tree.map(lambda s: s.shape, jax.eval_shape(
        lambda: models.init_variables(cond, shape, k_init)))
    got = jax.tree.map(jnp.shape, {"params": cp, "sparsity": ci})
    if got != want:
        raise ValueError(f"condensed masked init {got} does not match the condensed ViT {want}")
    ctx = T.srigl_condensed(inner, growth_block=args.growth_block, **kw)
    cs = ctx.init(cp, ci)

    @jax.jit
    def masked_step(p, s, x, y):
        g = jax.grad(lambda p: xent(dense.apply({"params": p}, x), y))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def condensed_step(p, s, x, y):
        v = {"params": p, "sparsity": T.get_indices(s)}
        g = jax.grad(lambda p: xent(cond.apply({**v, "params": p}, x), y))(p)
        return ctx.step(g, s, p, dense_grads=lambda: T.growth_inputs(cond.apply, v, xent, x, y))

    x_all, y_all = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train, jnp.int32)
    loops = Lockstep({"masked": masked_step, "condensed": condensed_step},
                     {"masked": (mp, ms), "condensed": (cp, cs)}, warmup=args.warmup)
    rng = np.random.default_rng(seed)
    for _ in range(args.epochs):
        perm = rng.permutation(n)
        for b in range(steps_per_epoch):
            sel = jnp.asarray(perm[b * args.batch_size:(b + 1) * args.batch_size])
            loops.step(x_all[sel], y_all[sel])
            if (loops.count % 100) == 0:
                print(f"  seed {seed} s={sparsity} step {loops.count}/{steps}", flush=True)
    (mp, ms), (cp, cs) = loops.states["masked"], loops.states["condensed"]
    times = loops.step_ms()

    idx = T.get_indices(cs)
    xt = jnp.asarray(ds.x_test).reshape(-1, args.eval_batch, *shape)
    yt = jnp.asarray(ds.y_test, jnp.int32).reshape(-1, args.eval_batch)

    def evaluate(apply, variables):
        logits = jax.jit(lambda v: jax.lax.map(lambda x: apply(v, x), xt))(variables)
        logits = logits.reshape(-1, logits.shape[-1])
        y = yt.reshape(-1)
        return float(jnp.mean(jnp.argmax(logits, -1) == y)), float(xent(logits, y))

    results = {"masked": evaluate(dense.apply, {"params": mp}),
               "condensed": evaluate(cond.apply, {"params": cp, "sparsity": idx})}
    _, cmasks = T.expand_params(cp, idx, models.condensed_n_in(cond))
    masks = jaxsparse.get_masks(ms)
    flat_m = T._flat_paths(masks, is_leaf=lambda m: m is None)
    flat_c = T._flat_paths(cmasks, is_leaf=lambda m: m is None)
    paths = sorted(p for p, m in flat_c.items() if m is not None)
    agree = mask_agreement([flat_m[p] for p in paths], [flat_c[p] for p in paths])
    out = {name: {"test_accuracy": acc, "test_loss": loss, "step_ms": times[name],
                  "timed_steps": loops.timed_steps}
           for name, (acc, loss) in results.items()}
    return out, agree, steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="../shared/data/mnist")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--learning_rate", type=float, default=1e-3)
    ap.add_argument("--update_every", type=int, default=50)
    ap.add_argument("--drop_fraction", type=float, default=0.3)
    ap.add_argument("--growth_block", type=int, default=256)
    ap.add_argument("--validation_size", type=int, default=6000)
    ap.add_argument("--warmup", type=int, default=11, help="steps left out of the timing")
    ap.add_argument("--eval_batch", type=int, default=500)
    ap.add_argument("--out", default="condensed_training_vit")
    args = ap.parse_args(argv)
    ds = load_dataset(args.dataset, args.data_dir, validation_size=args.validation_size)
    if len(ds.x_test) % args.eval_batch:
        raise ValueError(f"--eval_batch {args.eval_batch} does not divide the "
                         f"{len(ds.x_test)} test images")
    out_dir = ROOT / "results" / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in args.sparsities:
        for seed in args.seeds:
            res, agree, steps = run(ds, s, seed, args)
            recs = [{"event": "final", "algorithm": f"srigl_no_ablation_{name}",
                     "sparsity_target": s, "dataset": args.dataset, "model": "vit",
                     "seed": seed, "steps": steps, **r, "mask_agreement": agree,
                     "machine": machine(), "config": json.dumps(vars(args))}
                    for name, r in res.items()]
            append_records(out_dir / "results.jsonl", recs)
            rows += recs
            print(f"  seed {seed} s={s}: " + ", ".join(
                f"{r['algorithm']} acc {r['test_accuracy']:.4f} {r['step_ms']:.1f} ms"
                for r in recs) + f", mask agreement {agree:.6f}", flush=True)
    print(summary_table(rows, args.sparsities, "test_accuracy", "acc", scale=100.0, digits=2))


if __name__ == "__main__":
    main()
