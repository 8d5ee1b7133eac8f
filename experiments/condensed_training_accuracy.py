"""Accuracy of condensed training vs the masked dense run (issue 18), MNIST-type MLPs
(``--sizes``: LeNet-300-100 by default, or the 784-3000-3000-10 MLP).

For each seed and sparsity, two runs go in lockstep from the same initial params and masks
on the same batches: ``jaxsparse.srigl`` on the masked dense model and ``srigl_condensed``
on values/indices (the same rule, tested equal step by step). Without ``--ablation`` both
run SRigL without neuron ablation (records ``srigl_no_ablation_{masked,condensed}``); with
it, SRigL's neuron ablation (``--gamma_sal``) on the padded condensed layout, each hidden
layer with ``ceil(capacity_factor * k0)`` slots per neuron (at most ``n_in``; records
``srigl_{masked,condensed}``, with the active neurons per layer at the end). Records test
accuracy of each, the fraction of mask entries on which they agree at the end, and the
time per step of each loop, one ``final`` record per run in ``results/<out>/results.jsonl``
(``--out``, default ``condensed_training``), and prints a table. The lockstep loop, mask
agreement and records are :mod:`experiments.condensed_lockstep`'s (shared with the LM study,
:mod:`experiments.condensed_training_lm`).

    python -m experiments.condensed_training_accuracy --seeds 0 1 2 --sparsities 0.9 0.95
    python -m experiments.condensed_training_accuracy --dataset mnist \\
        --data_dir ../shared/data/mnist --ablation --sparsities 0.9 0.95 0.99
    python -m experiments.condensed_training_accuracy --sizes 784 3000 3000 10 --epochs 3 \\
        --sparsities 0.9 0.95 0.99 --out condensed_training_3000
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse
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


def init_params(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"fc{i}": {"kernel": jax.random.truncated_normal(k, -2.0, 2.0, (a, b))
                       * jnp.sqrt(1.0 / a).astype(jnp.float32), "bias": jnp.zeros(b)}
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def dense_apply(p, x):
    names = sorted(p)
    for name in names:
        x = x @ p[name]["kernel"] + p[name]["bias"][None, :]
        if name != names[-1]:
            x = jax.nn.relu(x)
    return x


def condensed_apply(p, idx, x):
    names = sorted(p)
    for name in names:
        x = T.condensed_linear(x, p[name]["values"], idx[name]["indices"], p[name]["bias"])
        if name != names[-1]:
            x = jax.nn.relu(x)
    return x


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def run(ds, sizes, sparsity, seed, args):
    n = len(ds.x_train)
    steps_per_epoch = n // args.batch_size
    steps = steps_per_epoch * args.epochs
    end_step = int(0.75 * steps)
    lr = optax.cosine_decay_schedule(args.learning_rate, steps)
    inner = optax.sgd(lr, momentum=0.9)
    key = jax.random.key(seed)
    kw = dict(key=key, end_step=end_step, update_every=args.update_every,
              drop_fraction=args.drop_fraction)
    tx = jaxsparse.srigl(inner, sparsity, ablation=args.ablation, gamma_sal=args.gamma_sal,
                         distribution="uniform", track_itop=False, **kw)
    mp, ms = jax.jit(lambda p: jaxsparse.init_masked(tx, p))(
        init_params(jax.random.fold_in(key, 1), sizes))
    cp, ci = T.condense_params(mp, jaxsparse.get_masks(ms))
    n_in = {f"fc{i}": a for i, a in enumerate(sizes[:-1])}
    fan = None
    if args.ablation:
        cp, ci, fan = T.pad_condensed(cp, ci, capacities(ci, n_in, args.capacity_factor), n_in)
    ctx = T.srigl_condensed(inner, ablation=args.ablation, gamma_sal=args.gamma_sal, **kw)
    cs = ctx.init(cp, ci, fan)

    @jax.jit
    def masked_step(p, s, x, y):
        g = jax.grad(lambda p: xent(dense_apply(p, x), y))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def condensed_step(p, s, x, y):
        idx = T.get_indices(s)
        g = jax.grad(lambda p: xent(condensed_apply(p, idx, x), y))(p)

        def dense_grads():
            dense, _ = T.expand_params(p, idx, n_in, s.fan)
            full = jax.grad(lambda d: xent(dense_apply(d, x), y))(dense)
            return {name: full[name]["kernel"] for name in sorted(full)}

        return ctx.step(g, s, p, dense_grads=dense_grads)

    x_all = jnp.asarray(ds.x_train.reshape(n, -1), jnp.float32) / 255.0
    y_all = jnp.asarray(ds.y_train, jnp.int32)
    loops = Lockstep({"masked": masked_step, "condensed": condensed_step},
                     {"masked": (mp, ms), "condensed": (cp, cs)})  # 11 steps of compilation
    rng = np.random.default_rng(seed)
    for epoch in range(args.epochs):
        perm = rng.permutation(n)
        loops.run((x_all[sel], y_all[sel]) for sel in (
            jnp.asarray(perm[b * args.batch_size:(b + 1) * args.batch_size])
            for b in range(steps_per_epoch)))
        print(f"  seed {seed} s={sparsity} epoch {epoch + 1}/{args.epochs}", flush=True)
    (mp, ms), (cp, cs) = loops.states["masked"], loops.states["condensed"]
    times = loops.step_ms()

    xt = jnp.asarray(ds.x_test.reshape(len(ds.x_test), -1), jnp.float32) / 255.0
    yt = jnp.asarray(ds.y_test, jnp.int32)
    idx = T.get_indices(cs)
    out = {}
    logits = {"masked": jax.jit(dense_apply)(mp, xt),
              "condensed": jax.jit(condensed_apply)(cp, idx, xt)}
    _, cmasks = T.expand_params(cp, idx, n_in, cs.fan)
    masks = jaxsparse.get_masks(ms)
    active = {name: {k: int((np.asarray(m[k]["kernel"]).sum(0) > 0).sum()) for k in n_in}
              for name, m in (("masked", masks), ("condensed", cmasks))}
    agree = mask_agreement({k: masks[k]["kernel"] for k in n_in},
                           {k: cmasks[k]["kernel"] for k in n_in})
    for name, lg in logits.items():
        out[name] = {
            "test_accuracy": float(jnp.mean(jnp.argmax(lg, -1) == yt)),
            "test_loss": float(xent(lg, yt)),
            "step_ms": times[name],
            "active_neurons": active[name],
        }
    return out, agree, steps


def capacities(indices, n_in, factor: float) -> dict[str, int]:
    """Slots per neuron of each layer for ablation: ``min(n_in, ceil(factor * k0))`` for the
    hidden layers, ``k0`` for the output layer (the last: it keeps all its neurons)."""
    names = sorted(indices)
    k0 = {n: int(np.shape(indices[n]["indices"])[1]) for n in names}
    return {n: k0[n] if n == names[-1] else min(n_in[n], math.ceil(factor * k0[n]))
            for n in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="../shared/data/fashion_mnist")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--sizes", type=int, nargs="+", default=[784, 300, 100, 10])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--learning_rate", type=float, default=0.1)
    ap.add_argument("--update_every", type=int, default=100)
    ap.add_argument("--drop_fraction", type=float, default=0.3)
    ap.add_argument("--validation_size", type=int, default=6000)
    ap.add_argument("--ablation", action="store_true", help="SRigL with neuron ablation")
    ap.add_argument("--gamma_sal", type=float, default=0.3)
    ap.add_argument("--capacity_factor", type=float, default=2.0,
                    help="with --ablation: slots per hidden neuron, times k0")
    ap.add_argument("--out", default="condensed_training")
    args = ap.parse_args(argv)
    ds = load_dataset(args.dataset, args.data_dir, validation_size=args.validation_size)
    sizes = tuple(args.sizes)
    out_dir = ROOT / "results" / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in args.sparsities:
        for seed in args.seeds:
            res, agree, steps = run(ds, sizes, s, seed, args)
            recs = [{"event": "final",
                     "algorithm": f"srigl_{'' if args.ablation else 'no_ablation_'}{name}",
                     "sparsity_target": s, "dataset": args.dataset,
                     "model": "mlp-" + "-".join(map(str, sizes)), "seed": seed,
                     "steps": steps, **r, "mask_agreement": agree, "machine": machine(),
                     "config": json.dumps({k: v for k, v in vars(args).items()})}
                    for name, r in res.items()]
            append_records(out_dir / "results.jsonl", recs)
            rows += recs
    print(summary_table(rows, args.sparsities, "test_accuracy", "acc", scale=100.0, digits=2))

if __name__ == "__main__":
    main()
