"""One-shot pruning study: magnitude / Wanda / SparseGPT on trained models.

  python -m experiments.oneshot mnist --out results/oneshot_mnist
  python -m experiments.oneshot lm --out results/oneshot_lm --train_steps 600

``mnist``: trains a dense LeNet-300-100 briefly (Adam), prunes it with every method at
50-90% (per output neuron) and 2:4 / 4:8 from calibration images drawn with several seeds,
and records the test accuracy. ``lm``: trains a dense byte-level transformer LM
(``experiments/lm``), prunes it at 50/60/70% and 2:4 / 4:8 and records the validation
perplexity, before and after a short fine-tune with the masks fixed
(``jaxsparse.fixed_masks``). Every run appends a ``{"event": "final", ...}`` record to
``<out>/results.jsonl`` and the script prints a table of mean +- sample std over the
calibration seeds; RESULTS.md's tables are generated from the records
(``experiments/results_report.py``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse
from jaxsparse import oneshot

# 4:8 does not fit LeNet-300-100 (its second layer has 300 inputs).
MNIST_PATTERNS = ("50%", "60%", "70%", "80%", "90%", "2:4")
LM_PATTERNS = ("50%", "60%", "70%", "2:4", "4:8")


def parse_pattern(p: str) -> dict:
    """``"50%"`` -> ``{"sparsity": 0.5}``, ``"2:4"`` -> ``{"nm": (2, 4)}``."""
    if p.endswith("%"):
        return {"sparsity": float(p[:-1]) / 100.0}
    n, m = p.split(":")
    return {"nm": (int(n), int(m))}


def pattern_sparsity(p: str) -> float:
    kw = parse_pattern(p)
    return kw["sparsity"] if "sparsity" in kw else 1.0 - kw["nm"][0] / kw["nm"][1]


def machine() -> str:
    import os
    import platform
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} {jax.default_backend()}")


def table(records: list[dict], metric: str, patterns, digits: int = 2, scale: float = 1.0
          ) -> str:
    """Markdown: methods x patterns, mean +- sample std (n) of ``metric`` over calibration
    seeds (dense and magnitude use no calibration data: one run each)."""
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r["algorithm"], r["pattern"])].append(scale * r[metric])
    head = ["method"] + list(patterns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in ("dense",) + oneshot.METHODS:
        cells = [method]
        for p in patterns:
            v = np.array(groups.get((method, "dense" if method == "dense" else p), []))
            if not len(v):
                cells.append("-")
            elif len(v) == 1:
                cells.append(f"{v[0]:.{digits}f} (n=1)")
            else:
                cells.append(f"{v.mean():.{digits}f} +- {v.std(ddof=1):.{digits}f} (n={len(v)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _methods(seed: int, seeds) -> tuple[str, ...]:
    """Magnitude reads no calibration data: it runs once (first seed), not once per seed."""
    return oneshot.METHODS if seed == seeds[0] else oneshot.METHODS[1:]


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------- MNIST


def train_lenet(ds, epochs: int, seed: int = 0, batch: int = 128):
    """A dense LeNet-300-100, Adam 1e-3, ``epochs`` passes."""
    from experiments.models import LeNet300

    model = LeNet300()
    variables = model.init(jax.random.key(seed), jnp.zeros((1,) + ds.x_train.shape[1:],
                                                           jnp.uint8))
    tx = optax.adam(1e-3)
    opt = tx.init(variables)

    @jax.jit
    def step(v, opt, x, y):
        def loss(v):
            logits = model.apply(v, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g = jax.grad(loss)(v)
        u, opt = tx.update(g, opt, v)
        return optax.apply_updates(v, u), opt

    rng = np.random.default_rng(seed)
    n = len(ds.x_train) // batch * batch
    for _ in range(epochs):
        perm = rng.permutation(len(ds.x_train))[:n].reshape(-1, batch)
        for idx in perm:
            variables, opt = step(variables, opt, ds.x_train[idx], ds.y_train[idx])
    return model, variables


def accuracy_fn(model, x, y):
    @jax.jit
    def correct(v, xb, yb):
        return jnp.sum(jnp.argmax(model.apply(v, xb), -1) == yb)

    def accuracy(v):
        total = sum(int(correct(v, x[i:i + 1000], y[i:i + 1000]))
                    for i in range(0, len(x), 1000))
        return total / len(x)

    return accuracy


def run_mnist(args) -> None:
    from experiments import data as data_lib

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    ds = data_lib.load_dataset("mnist", args.data_dir)
    t0 = time.perf_counter()
    model, variables = train_lenet(ds, args.epochs)
    train_time = time.perf_counter() - t0
    accuracy = accuracy_fn(model, ds.x_test, ds.y_test)
    dense = accuracy(variables)
    base = dict(event="final", study="oneshot", dataset="mnist", model="lenet300",
                train_epochs=args.epochs, train_time=train_time,
                calibration_samples=args.calib_batches * args.calib_batch, machine=machine())
    records = [dict(base, algorithm="dense", pattern="dense", sparsity_target=0.0, seed=0,
                    test_accuracy=dense)]
    _append(results, records[0])
    print(f"dense test accuracy {dense:.4f} ({train_time:.1f} s training)", flush=True)
    for seed in args.seeds:
        rng = np.random.default_rng(1000 + seed)
        idx = rng.choice(len(ds.x_train), args.calib_batches * args.calib_batch, replace=False)
        batches = [ds.x_train[i] for i in idx.reshape(args.calib_batches, -1)]
        for pattern in args.patterns:
            for method in _methods(seed, args.seeds):
                t = time.perf_counter()
                res = oneshot.prune(model, variables, batches, method=method,
                                    **parse_pattern(pattern))
                seconds = time.perf_counter() - t
                acc = accuracy(res.params)
                sparsity = float(jaxsparse.metrics.global_sparsity(res.masks))
                rec = dict(base, algorithm=method, pattern=pattern,
                           sparsity_target=pattern_sparsity(pattern), sparsity=sparsity,
                           seed=seed, test_accuracy=acc, prune_seconds=seconds)
                records.append(rec)
                _append(results, rec)
                print(f"seed {seed} {pattern:>4} {method:>9}: accuracy {acc:.4f} "
                      f"(sparsity {sparsity:.3f}, {seconds:.1f} s)", flush=True)
    print("Test accuracy (%), LeNet-300-100 / MNIST\n")
    print(table(records, "test_accuracy", args.patterns, scale=100.0))


# ------------------------------------------------------------------------------------ LM


def lm_config(args):
    from experiments.configs import lm_base
    from experiments.lm.model import lm_config as model_config

    c = lm_base.get_config()
    overrides = {"num_layers": args.num_layers} if args.num_layers else {}
    c.model = model_config(args.preset, seq_len=args.seq_len, **overrides)
    c.algorithm = "dense"
    c.mesh_shape = (1, 1)
    c.num_steps = args.train_steps
    c.batch_size = args.batch
    c.eval_every = 0
    c.eval_windows = args.eval_windows
    c.progress = False
    c.checkpoint_every = -1
    c.seed = 0
    return c


def finetune(model, params, masks, data, key, steps: int, batch: int, seq_len: int,
             lr: float):
    """``steps`` AdamW steps with the masks fixed (``jaxsparse.fixed_masks``)."""
    from experiments.lm import data as lm_data
    from experiments.lm.trainer import lm_loss

    tx = jaxsparse.fixed_masks(optax.adamw(optax.cosine_decay_schedule(lr, steps)), masks)
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        tokens = lm_data.get_batch(data, key, i, batch, seq_len)
        grads = jax.grad(lambda p: lm_loss(model, p, tokens))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, jnp.int32(i))
    return params


def run_lm(args) -> None:
    from experiments.lm import data as lm_data
    from experiments.lm import trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    c = lm_config(args)
    devices = jax.devices()[:1]
    t0 = time.perf_counter()
    state, final = trainer.train(c, None, devices)
    train_time = time.perf_counter() - t0
    setup = trainer.make_setup(c, devices)
    corpus = lm_data.load_corpus(c.corpus)
    windows = lm_data.eval_windows(corpus.valid, c.model.seq_len, c.eval_windows)
    evaluate = trainer.make_eval(setup, windows, 16)
    model = setup.model
    params = jax.device_get(state.params)
    dense = math.exp(float(evaluate(params)))
    base = dict(event="final", study="oneshot", dataset="stdlib",
                model=f"lm_{args.preset}_L{c.model.num_layers}_T{c.model.seq_len}",
                train_steps=args.train_steps, train_time=train_time,
                params=sum(int(x.size) for x in jax.tree.leaves(params)),
                calibration_tokens=args.calib_batches * args.calib_batch * c.model.seq_len,
                finetune_steps=args.finetune_steps, machine=machine())
    records = [dict(base, algorithm="dense", pattern="dense", sparsity_target=0.0, seed=0,
                    valid_perplexity=dense, finetuned_perplexity=dense)]
    _append(results, records[0])
    print(f"dense validation perplexity {dense:.3f} ({train_time:.0f} s training)", flush=True)
    data = jnp.asarray(corpus.train)

    def apply_fn(p, tokens):
        return model.apply({"params": p}, tokens)

    for seed in args.seeds:
        key = jax.random.key(1000 + seed)
        batches = [lm_data.get_batch(data, key, i, args.calib_batch, c.model.seq_len)[:, :-1]
                   for i in range(args.calib_batches)]
        for pattern in args.patterns:
            for method in _methods(seed, args.seeds):
                t = time.perf_counter()
                res = oneshot.prune(apply_fn, params, batches, method=method,
                                    **parse_pattern(pattern))
                seconds = time.perf_counter() - t
                ppl = math.exp(float(evaluate(res.params)))
                tuned = None
                if args.finetune_steps and pattern in args.finetune_patterns:
                    tuned_params = finetune(model, res.params, res.masks, data,
                                            jax.random.key(2000 + seed), args.finetune_steps,
                                            args.batch, c.model.seq_len, args.finetune_lr)
                    tuned = math.exp(float(evaluate(tuned_params)))
                rec = dict(base, algorithm=method, pattern=pattern,
                           sparsity_target=pattern_sparsity(pattern), seed=seed,
                           valid_perplexity=ppl, prune_seconds=seconds)
                if tuned is not None:
                    rec["finetuned_perplexity"] = tuned
                records.append(rec)
                _append(results, rec)
                after = "" if tuned is None else f" -> {tuned:.3f} after fine-tuning"
                print(f"seed {seed} {pattern:>4} {method:>9}: perplexity {ppl:.3f}{after} "
                      f"({seconds:.1f} s)", flush=True)
    md = (f"Validation perplexity (bytes), {args.preset} byte LM, one-shot\n\n"
          + table(records, "valid_perplexity", args.patterns, 3)
          + f"\n\nAfter {args.finetune_steps} fine-tuning steps with fixed masks\n\n"
          + table([r for r in records if "finetuned_perplexity" in r], "finetuned_perplexity",
                  args.finetune_patterns, 3) + "\n")
    print(md)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="study", required=True)
    m = sub.add_parser("mnist")
    m.add_argument("--out", default="results/oneshot_mnist")
    m.add_argument("--data_dir", default="../shared/data/mnist")
    m.add_argument("--epochs", type=int, default=3)
    m.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    m.add_argument("--patterns", nargs="+", default=list(MNIST_PATTERNS))
    m.add_argument("--calib_batches", type=int, default=4)
    m.add_argument("--calib_batch", type=int, default=128)
    lm = sub.add_parser("lm")
    lm.add_argument("--out", default="results/oneshot_lm")
    lm.add_argument("--preset", default="1m")
    lm.add_argument("--seq_len", type=int, default=128)
    lm.add_argument("--num_layers", type=int, default=0, help="override the preset's depth")
    lm.add_argument("--train_steps", type=int, default=600)
    lm.add_argument("--batch", type=int, default=32)
    lm.add_argument("--eval_windows", type=int, default=256)
    lm.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    lm.add_argument("--patterns", nargs="+", default=list(LM_PATTERNS))
    lm.add_argument("--calib_batches", type=int, default=8)
    lm.add_argument("--calib_batch", type=int, default=16)
    lm.add_argument("--finetune_steps", type=int, default=100)
    lm.add_argument("--finetune_patterns", nargs="+", default=["50%", "2:4"])
    lm.add_argument("--finetune_lr", type=float, default=3e-4)
    args = parser.parse_args(argv)
    {"mnist": run_mnist, "lm": run_lm}[args.study](args)


if __name__ == "__main__":
    main()
