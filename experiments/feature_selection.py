"""QuickSelection: feature selection with a SET-trained sparse denoising autoencoder.

Atashgahi et al. 2022 ("Quick and robust feature selection: the strength of energy-efficient
sparse training for autoencoders", Machine Learning 111): train a sparse denoising
autoencoder (one sigmoid hidden layer, ER sparsity, SET topology updates), then rank the input
features by the strength of their input neuron (sum of |w| over its active connections,
:func:`jaxsparse.features.input_strength`) and keep the K strongest. The selection is judged by
a downstream classifier (ExtraTrees, as in the LassoNet paper's benchmark) trained on the K
selected features only, against all features, K random features and the K highest-variance
features.

  python -m experiments.feature_selection --config=experiments/configs/fs_mnist.py \
      --out=results/fs_mnist
  python -m experiments.feature_selection --config=experiments/configs/fs_mnist.py \
      --out=results/fs_mnist --report

Each (method, K, seed) appends one ``final`` record to ``<out>/results.jsonl``; seeds already
recorded are skipped.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse
from experiments import data as data_lib
from experiments.sweep import load_config
from experiments.train import machine_description
from jaxsparse import features

METHODS = ("quickselection", "variance", "random", "all")


class FSConfig(NamedTuple):
    """One QuickSelection experiment.

    Attributes:
      dataset, data_dir: passed to ``experiments.data.load_dataset``.
      hidden: hidden neurons of the autoencoder (the paper: 1000).
      sparsity, distribution: the autoencoder's sparsity (ER with epsilon 13 in the paper is
        ~97% on 784-1000-784).
      epochs, batch_size, learning_rate: autoencoder training (Adam).
      noise: std of the additive Gaussian input noise of the denoising autoencoder.
      update_every, drop_fraction: SET topology update period (steps) and fraction (constant,
        the paper's zeta = 0.2).
      ks: numbers of features to select.
      seeds: one autoencoder, random selection and classifier per seed.
      n_estimators: ExtraTrees size.
      classifier_train_size: training examples for the classifier (0: all).
    """

    dataset: str = "mnist"
    data_dir: str = ""
    hidden: int = 1000
    sparsity: float = 0.97
    distribution: str = "er"
    epochs: int = 5
    batch_size: int = 100
    learning_rate: float = 1e-3
    noise: float = 0.2
    update_every: int = 100
    drop_fraction: float = 0.2
    ks: tuple = (50, 100)
    seeds: tuple = (0, 1, 2)
    n_estimators: int = 50
    classifier_train_size: int = 0


class Autoencoder(nn.Module):
    """Input -> sigmoid hidden layer -> linear reconstruction."""

    hidden: int
    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.sigmoid(nn.Dense(self.hidden, name="encoder")(x))
        return nn.Dense(self.features, name="decoder")(h)


def flat_data(ds: data_lib.Dataset):
    """``(x_train, y_train, x_test, y_test)`` with images flattened to float32 in [0, 1]."""
    def flat(x):
        return x.reshape(x.shape[0], -1).astype(np.float32) / 255.0

    return flat(ds.x_train), ds.y_train, flat(ds.x_test), ds.y_test


def check_ks(ks: Sequence[int], dim: int, where: str) -> None:
    """Every K must be in ``[1, dim]``; names the offending K and the dataset."""
    for k in ks:
        if not 1 <= int(k) <= dim:
            raise ValueError(f"ks: K={k} is larger than the input dimension {dim} of {where}"
                             if int(k) > dim else f"ks: K={k} must be >= 1")


def _standard_promotion_tx(tx):
    # optax's Adam computes ``decay ** count`` with an int32 count (rejected under strict
    # promotion); the inner optimizer runs under standard rules, the sparse wrapper does not.
    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def train_autoencoder(x: np.ndarray, cfg: FSConfig, key: jax.Array):
    """Trains the sparse denoising autoencoder with SET on ``x`` (float32[N, D]).

    Returns:
      ``(params, masks, losses)``: final (masked) params, the SET masks, and the mean
      reconstruction loss of every epoch (float[epochs]).
    """
    n, dim = x.shape
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    model = Autoencoder(cfg.hidden, dim)
    k_init, k_mask, k_train = jax.random.split(key, 3)
    params = model.init(k_init, jnp.zeros((1, dim), jnp.float32))["params"]
    tx = jaxsparse.set(
        _standard_promotion_tx(optax.adam(cfg.learning_rate)), cfg.sparsity, key=k_mask,
        distribution=cfg.distribution, update_every=cfg.update_every, end_step=total + 1,
        drop_fraction=cfg.drop_fraction, drop_fraction_decay="constant")
    opt_state = tx.init(params)
    params = jaxsparse.apply_masks(params, jaxsparse.get_masks(opt_state))
    data = jnp.asarray(x[: steps_per_epoch * cfg.batch_size])

    def loss_fn(p, clean, key):
        noisy = clean + cfg.noise * jax.random.normal(key, clean.shape)
        return jnp.mean(jnp.square(model.apply({"params": p}, noisy) - clean))

    def step(state, xs):
        p, s = state
        idx, key = xs
        loss, grads = jax.value_and_grad(loss_fn)(p, data[idx], key)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    @jax.jit
    def epoch(p, s, key):
        k_perm, k_noise = jax.random.split(key)
        perm = jax.random.permutation(k_perm, data.shape[0])
        batches = perm.reshape(steps_per_epoch, cfg.batch_size)
        (p, s), losses = jax.lax.scan(
            step, (p, s), (batches, jax.random.split(k_noise, steps_per_epoch)))
        return p, s, jnp.mean(losses)

    losses = []
    for e in range(cfg.epochs):
        params, opt_state, loss = epoch(params, opt_state, jax.random.fold_in(k_train, e))
        losses.append(float(loss))
    return params, jaxsparse.get_masks(opt_state), np.asarray(losses)


def quickselection_scores(params, masks) -> np.ndarray:
    """Input-neuron strength of the encoder (float[D])."""
    return np.asarray(features.input_strength(params["encoder"]["kernel"],
                                              masks["encoder"]["kernel"]))


def variance_scores(x: np.ndarray) -> np.ndarray:
    """Per-feature variance over the training set (the unsupervised baseline)."""
    return x.var(axis=0)


def random_scores(dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(dim).astype(np.float32)


def extra_trees_accuracy(x_train, y_train, x_test, y_test, idx, seed: int,
                         n_estimators: int) -> float:
    """Test accuracy of ExtraTrees trained on the columns ``idx``."""
    from sklearn.ensemble import ExtraTreesClassifier

    clf = ExtraTreesClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    clf.fit(x_train[:, idx], y_train)
    return float(clf.score(x_test[:, idx], y_test))


def run(cfg: FSConfig, done: set | None = None, write=None) -> list[dict]:
    """All methods x K for every seed; ``write(record)`` is called as each one finishes."""
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir or None)
    x_train, y_train, x_test, y_test = flat_data(ds)
    dim = x_train.shape[1]
    check_ks(cfg.ks, dim, f"{cfg.dataset} ({ds.image_shape})")
    n_clf = cfg.classifier_train_size or len(x_train)
    xc, yc = x_train[:n_clf], y_train[:n_clf]
    machine = machine_description()
    done = done or set()
    records = []

    def emit(record):
        record.update(dataset=cfg.dataset, machine=machine,
                      config=json.dumps(cfg._asdict(), sort_keys=True, default=list))
        records.append(record)
        if write is not None:
            write(record)

    var_scores = variance_scores(x_train)
    for seed in cfg.seeds:
        if ("all", dim, seed) not in done:
            start = time.perf_counter()
            acc = extra_trees_accuracy(xc, yc, x_test, y_test, np.arange(dim), seed,
                                       cfg.n_estimators)
            emit({"event": "final", "method": "all", "k": dim, "seed": seed,
                  "test_accuracy": acc, "wall_time": time.perf_counter() - start})
        pending = [(m, k) for m in ("quickselection", "variance", "random") for k in cfg.ks
                   if (m, k, seed) not in done]
        if not pending:
            continue
        start = time.perf_counter()
        dae_info = {}
        if any(m == "quickselection" for m, _ in pending):
            params, masks, losses = train_autoencoder(x_train, cfg, jax.random.key(seed))
            qs_scores = quickselection_scores(params, masks)
            dae_info = {"dae_loss_first_epoch": float(losses[0]),
                        "dae_loss_last_epoch": float(losses[-1]),
                        "dae_sparsity": float(jaxsparse.metrics.global_sparsity(masks)),
                        "dae_time": time.perf_counter() - start}
        for method, k in pending:
            if method == "quickselection":
                scores = qs_scores
            elif method == "variance":
                scores = var_scores
            else:
                scores = random_scores(dim, seed)
            idx = np.asarray(features.top_k_features(scores, int(k)))
            t0 = time.perf_counter()
            acc = extra_trees_accuracy(xc, yc, x_test, y_test, idx, seed, cfg.n_estimators)
            emit({"event": "final", "method": method, "k": int(k), "seed": seed,
                  "test_accuracy": acc, "selected": idx.tolist(),
                  "wall_time": time.perf_counter() - t0,
                  **(dae_info if method == "quickselection" else {})})
    return records


def fs_config(c) -> FSConfig:
    fields = {k: c[k] for k in FSConfig._fields if k in c}
    for name in ("ks", "seeds"):
        if name in fields:
            fields[name] = tuple(int(v) for v in fields[name])
    return FSConfig(**fields)


def summary_table(records: list[dict]) -> str:
    """Markdown: rows method, columns K; ExtraTrees test accuracy % mean +- sample std (n)."""
    groups = collections.defaultdict(list)
    for r in records:
        if r.get("event") == "final":
            groups[(r["method"], r["k"])].append(100 * r["test_accuracy"])
    ks = sorted({k for m, k in groups if m != "all"})
    head = ["method"] + [f"K={k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        if m == "all":
            runs = [v for (mm, _), vs in groups.items() if mm == "all" for v in vs]
            dims = sorted({k for mm, k in groups if mm == "all"})
            cells = [_mean_std(runs) + (f" (all {dims[0]})" if dims else "")] * len(ks)
        else:
            cells = [_mean_std(groups[(m, k)]) if groups.get((m, k)) else "-" for k in ks]
        if any(c != "-" for c in cells):
            lines.append("| " + " | ".join([m] + cells) + " |")
    return "\n".join(lines)


def _mean_std(values) -> str:
    if not values:
        return "-"
    v = np.asarray(values, np.float64)
    std = f"{v.std(ddof=1):.2f}" if len(v) > 1 else "n/a"
    return f"{v.mean():.2f} +- {std} (n={len(v)})"


def plot_selection(records: list[dict], image_shape, out: str | Path, title: str = "") -> Path:
    """Selected pixels per method at the largest K (seed 0), and the accuracy per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = [r for r in records if r.get("event") == "final"]
    ks = sorted({r["k"] for r in finals if r["method"] != "all"})
    shown = ("quickselection", "variance", "random")
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(4 * (len(shown) + 1), 3.6))
    hw = int(np.prod(image_shape[:2]))
    for ax, m in zip(axes, shown):
        picks = [r for r in finals if r["method"] == m and r["k"] == ks[-1]]
        img = np.zeros(hw)
        for r in picks:
            img[np.asarray(r["selected"]) % hw] += 1.0 / len(picks)
        ax.imshow(img.reshape(image_shape[:2]), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{m}, K={ks[-1]} (share of {len(picks)} seeds)", fontsize=9)
        ax.axis("off")
    ax = axes[-1]
    for m in shown:
        means = [np.mean([r["test_accuracy"] for r in finals if r["method"] == m
                          and r["k"] == k] or [np.nan]) for k in ks]
        stds = [np.std([r["test_accuracy"] for r in finals if r["method"] == m
                        and r["k"] == k] or [np.nan]) for k in ks]
        ax.errorbar(ks, 100 * np.asarray(means), yerr=100 * np.asarray(stds), marker="o",
                    label=m, capsize=3)
    all_acc = [r["test_accuracy"] for r in finals if r["method"] == "all"]
    if all_acc:
        ax.axhline(100 * np.mean(all_acc), color="k", linestyle="--", label="all features")
    ax.set_xlabel("K selected features")
    ax.set_ylabel("ExtraTrees test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--report", action="store_true", help="print the table, write the plot")
    a = p.parse_args(argv)
    cfg = fs_config(load_config(a.config))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if a.report:
        records = _load(results)
        print(summary_table(records))
        ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir or None)
        print(plot_selection(records, ds.image_shape, out / "selection.png", cfg.dataset))
        return records
    done = {(r["method"], r["k"], r["seed"]) for r in _load(results)
            if r.get("event") == "final" and r.get("dataset") == cfg.dataset}

    def write(record):
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{record['method']} K={record['k']} seed {record['seed']}: "
              f"{100 * record['test_accuracy']:.2f}%", flush=True)

    return run(cfg, done, write)


if __name__ == "__main__":
    main()
