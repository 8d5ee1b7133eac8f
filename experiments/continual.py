"""Class-incremental continual learning with per-task sparse subnetworks (SpaceNet-style).

Split-MNIST / split-Fashion-MNIST: five tasks of two classes each, learned one after the other;
at test time the model sees an image from any task and must pick among all classes seen so far
(class-incremental: no task label). Three methods on an MLP 784-400-400-10 (no biases):

* ``finetune``: plain dense sequential training (Adam). Forgets catastrophically.
* ``spacenet``: SpaceNet-style (Sokar et al. 2021, "SpaceNet: Make free space for continual
  learning", Neurocomputing 439). Each task trains a sparse *delta* ``D`` on top of the weights
  earlier tasks reserved, ``W = W_reserved + D``, with the library's DST wrapper unchanged
  (``jaxsparse.rigl``), its inner optimizer ``optax.chain(adam, jaxsparse.freeze.freeze(F))``
  where ``F`` marks the incoming weights of every reserved neuron, so no new connection can
  reach (and change) a neuron an earlier task depends on. After the task, the
  ``neurons_per_task`` strongest free neurons of each hidden layer
  (:func:`jaxsparse.features.output_strength` of ``D``) and the task's output neurons are
  reserved: their incoming weights from reserved neurons are copied into ``W_reserved`` and
  frozen, the rest of ``D`` is released. New tasks still *read* the reserved neurons.
* ``joint``: dense training on all tasks at once (the upper bound), same total steps.

Metrics (Chaudhry et al. 2018): ``R[t, j]`` = accuracy on task ``j``'s test images after
training task ``t``, over the classes seen so far; average accuracy after the last task
``mean_j R[T-1, j]``; forgetting of task ``j < T-1`` is ``max_{t<T-1} R[t, j] - R[T-1, j]``.
SpaceNet records also hold ``pre_reserve_accuracy``: task ``t``'s accuracy with its whole
trained delta, before consolidation (compare ``R[t, t]``, after it).

  python -m experiments.continual --config=experiments/configs/cl_split_mnist.py \
      --out=results/cl_split_mnist
  python -m experiments.continual --config=experiments/configs/cl_split_mnist.py \
      --out=results/cl_split_mnist --report
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse
from experiments import data as data_lib
from experiments.sweep import apply_overrides, load_config
from experiments.train import machine_description
from jaxsparse import features
from jaxsparse import freeze as freeze_lib

METHODS = ("finetune", "spacenet", "joint")
LAYERS = ("dense0", "dense1", "dense2")


class CLConfig(NamedTuple):
    """One continual-learning experiment.

    Attributes:
      dataset, data_dir: passed to ``experiments.data.load_dataset``.
      tasks: the classes of each task, learned in this order.
      hidden: hidden widths of the MLP.
      steps_per_task, batch_size, learning_rate: Adam training of each task (minibatches
        drawn with replacement from the task's training images).
      sparsity: sparsity of each task's delta ``D`` (spacenet).
      algorithm: the DST wrapper training ``D`` (``rigl`` or ``set``).
      update_every, drop_fraction: its topology schedule (updates stop at 75% of a task).
      neurons_per_task: hidden neurons reserved per layer after each task (spacenet).
      task_softmax: spacenet trains each task's loss over that task's classes only (old
        classes' logits are frozen, so they cannot serve as negatives anyway); prediction is
        always over all classes seen so far. Fine-tuning uses the seen classes.
      methods, seeds: the sweep.
    """

    dataset: str = "mnist"
    data_dir: str = ""
    tasks: tuple = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    hidden: tuple = (400, 400)
    steps_per_task: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    sparsity: float = 0.9
    algorithm: str = "rigl"
    update_every: int = 100
    drop_fraction: float = 0.3
    neurons_per_task: int = 80
    task_softmax: bool = True
    methods: tuple = METHODS
    seeds: tuple = (0, 1, 2)


class TaskData(NamedTuple):
    """Each task's images, padded to a common length so one compiled step serves all."""

    x: np.ndarray  # float32[T, N_max, D]
    y: np.ndarray  # int32[T, N_max]
    n: np.ndarray  # int32[T]: real examples per task
    x_test: list  # per task float32[M_t, D]
    y_test: list  # per task int32[M_t]


def split_tasks(ds: data_lib.Dataset, tasks: Sequence[Sequence[int]]) -> TaskData:
    """Splits ``ds`` by class into ``tasks``.

    Raises:
      ValueError: a task with no classes, a class in two tasks, or a task whose classes have
        no training or test images (names the task and its classes).
    """
    if not tasks:
        raise ValueError("tasks: at least one task is needed")
    seen: dict[int, int] = {}
    for t, classes in enumerate(tasks):
        if len(classes) == 0:
            raise ValueError(f"tasks: task {t} has no classes (the split leaves it empty)")
        for c in classes:
            if c in seen:
                raise ValueError(f"tasks: class {c} is in task {seen[c]} and task {t}")
            seen[c] = t
    dim = int(np.prod(ds.image_shape))
    xs, ys, xt, yt = [], [], [], []
    for t, classes in enumerate(tasks):
        tr = np.isin(ds.y_train, classes)
        te = np.isin(ds.y_test, classes)
        if not tr.any() or not te.any():
            raise ValueError(
                f"tasks: task {t} (classes {tuple(classes)}) has {int(tr.sum())} training and "
                f"{int(te.sum())} test images in {ds.name} (labels 0..{ds.num_classes - 1}): "
                "the split leaves it empty")
        xs.append(ds.x_train[tr].reshape(-1, dim).astype(np.float32) / 255.0)
        ys.append(ds.y_train[tr].astype(np.int32))
        xt.append(ds.x_test[te].reshape(-1, dim).astype(np.float32) / 255.0)
        yt.append(ds.y_test[te].astype(np.int32))
    n_max = max(len(x) for x in xs)
    x = np.zeros((len(tasks), n_max, dim), np.float32)
    y = np.zeros((len(tasks), n_max), np.int32)
    for t, (xi, yi) in enumerate(zip(xs, ys)):
        x[t, : len(xi)], y[t, : len(yi)] = xi, yi
    return TaskData(x, y, np.array([len(v) for v in xs], np.int32), xt, yt)


def init_params(key: jax.Array, sizes: Sequence[int]) -> dict:
    """LeCun-normal kernels of an MLP without biases: ``{dense<i>: {kernel}}``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"dense{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a)}
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def mlp(params: dict, x: jax.Array) -> jax.Array:
    n = len(params)
    for i in range(n):
        x = x @ params[f"dense{i}"]["kernel"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


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


def make_task_trainer(cfg: CLConfig, sparse: bool, steps: int, zero_delta: bool = False):
    """``train(key, fixed, frozen, x, y, n, seen) -> (delta, masks, losses)``, compiled once
    for all tasks and seeds.

    Trains ``delta`` for ``steps`` Adam steps on the logits of ``fixed + delta`` over the
    classes in ``seen`` (bool[num_classes]); entries in ``frozen`` never move. ``delta``
    starts from a fresh LeCun init, or from zero with ``zero_delta`` (fine-tuning ``fixed``).
    ``sparse``: ``delta`` is trained by the DST wrapper at ``cfg.sparsity``.
    """

    @jax.jit
    def train(key, fixed, frozen, x, y, n, seen):
        k_init, k_mask, k_steps = jax.random.split(key, 3)
        sizes = [fixed["dense0"]["kernel"].shape[0]] + [
            fixed[f"dense{i}"]["kernel"].shape[1] for i in range(len(fixed))]
        delta = init_params(k_init, sizes)
        if zero_delta:
            delta = jax.tree.map(jnp.zeros_like, delta)
        inner = optax.chain(_standard_promotion_tx(optax.adam(cfg.learning_rate)),
                            freeze_lib.freeze(frozen))
        if sparse:
            factory = {"rigl": jaxsparse.rigl, "set": jaxsparse.set}[cfg.algorithm]
            tx = factory(inner, cfg.sparsity, key=k_mask, distribution="erk",
                         update_every=cfg.update_every, drop_fraction=cfg.drop_fraction,
                         end_step=max(1, int(0.75 * steps)))
        else:
            tx = inner
        state = tx.init(delta)
        if sparse:
            delta = jaxsparse.apply_masks(delta, jaxsparse.get_masks(state))
        delta = jax.tree.map(lambda d, f: jnp.where(f, jnp.zeros((), d.dtype), d), delta, frozen)
        penalty = jnp.where(seen, 0.0, -1e9).astype(jnp.float32)

        def loss_fn(d, xb, yb):
            logits = mlp(jax.tree.map(jnp.add, fixed, d), xb) + penalty[None, :]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        def step(carry, key):
            d, s = carry
            idx = jax.random.randint(key, (cfg.batch_size,), 0, n)
            loss, grads = jax.value_and_grad(loss_fn)(d, x[idx], y[idx])
            updates, s = tx.update(grads, s, d)
            return (optax.apply_updates(d, updates), s), loss

        (delta, state), losses = jax.lax.scan(step, (delta, state),
                                              jax.random.split(k_steps, steps))
        masks = jaxsparse.get_masks(state) if sparse else None
        return delta, masks, losses

    return train


@jax.jit
def _accuracy(params, x, y, seen):
    logits = mlp(params, x) + jnp.where(seen, 0.0, -1e9).astype(jnp.float32)[None, :]
    return jnp.mean((jnp.argmax(logits, axis=1) == y).astype(jnp.float32))


def evaluate(params, data: TaskData, seen: np.ndarray) -> list[float]:
    """Accuracy on every task's test set, predicting among the ``seen`` classes."""
    return [float(_accuracy(params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(seen)))
            for x, y in zip(data.x_test, data.y_test)]


def reserve(fixed, frozen, delta, reserved, task_classes, neurons_per_task):
    """SpaceNet consolidation after one task (host side, numpy).

    Reserves, per hidden layer, the ``neurons_per_task`` free neurons with the strongest
    incoming delta weights, and the task's output neurons; copies their incoming weights from
    reserved neurons of the layer below into ``fixed`` and freezes those columns.

    Returns:
      ``(fixed, frozen, reserved)`` updated; ``reserved`` is a list of bool[width] per layer
      (inputs excluded).
    """
    fixed = jax.tree.map(np.array, fixed)
    frozen = jax.tree.map(np.array, frozen)
    new_reserved = []
    below = None  # the input pixels are always "reserved"
    for i, name in enumerate(LAYERS[: len(fixed)]):
        d = np.asarray(delta[name]["kernel"])
        free = ~reserved[i]
        if i == len(fixed) - 1:
            new = np.zeros_like(free)
            new[list(task_classes)] = True
        else:
            strength = np.asarray(features.output_strength(d))
            strength = np.where(free, strength, -np.inf)
            k = min(neurons_per_task, int(free.sum()))
            new = np.zeros_like(free)
            if k > 0:
                new[np.asarray(features.top_k_features(strength, k))] = True
            new &= free
        rows = np.ones(d.shape[0], bool) if below is None else below
        keep = rows[:, None] & new[None, :]
        fixed[name]["kernel"] = np.where(keep, d, fixed[name]["kernel"])
        frozen[name]["kernel"] = frozen[name]["kernel"] | new[None, :]
        new_reserved.append(reserved[i] | new)
        below = new_reserved[-1]
    return fixed, frozen, new_reserved


def forgetting(r: np.ndarray) -> list[float]:
    """Per task ``j < T-1``: best accuracy after learning it (rows ``j .. T-2``) minus the
    final one."""
    t = r.shape[0]
    return [float(np.nanmax(r[j: t - 1, j]) - r[t - 1, j]) for j in range(t - 1)]


def run_method(method: str, cfg: CLConfig, data: TaskData, seed: int, trainers: dict):
    """Trains one method on the task sequence; returns ``(R, extra)``."""
    num_classes = 1 + max(c for task in cfg.tasks for c in task)
    sizes = [data.x.shape[-1], *cfg.hidden, num_classes]
    key = jax.random.key(seed)
    k_init, key = jax.random.split(key)
    zeros = jax.tree.map(jnp.zeros_like, init_params(k_init, sizes))
    no_freeze = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.bool_), zeros)
    n_tasks = len(cfg.tasks)
    r = np.full((n_tasks, n_tasks), np.nan)
    extra = {}
    if method == "joint":
        x = data.x.reshape(1, -1, data.x.shape[-1])
        y = data.y.reshape(1, -1)
        valid = (np.arange(data.x.shape[1])[None, :] < data.n[:, None]).reshape(-1)
        x, y = x[0][valid], y[0][valid]
        seen = np.ones(num_classes, bool)
        train = trainers[("joint", len(x))]
        params, _, losses = train(key, zeros, no_freeze, jnp.asarray(x), jnp.asarray(y),
                                  jnp.asarray(len(x), jnp.int32), jnp.asarray(seen))
        r[-1] = evaluate(params, data, seen)
        extra["final_loss"] = float(np.mean(np.asarray(losses)[-50:]))
        return r, extra
    train = trainers[(method, data.x.shape[1])]
    fixed, frozen = zeros, no_freeze
    reserved = [np.zeros(s, bool) for s in sizes[1:]]
    params = init_params(k_init, sizes)  # fine-tuning starts from a random init
    seen = np.zeros(num_classes, bool)
    pre_reserve = []
    for t, classes in enumerate(cfg.tasks):
        seen[list(classes)] = True
        task_key = jax.random.fold_in(key, t)
        if method == "finetune":
            # Continue from the current weights: ``fixed`` holds them, the delta starts at 0.
            delta, _, _ = train(task_key, params, no_freeze, jnp.asarray(data.x[t]),
                                jnp.asarray(data.y[t]), jnp.asarray(data.n[t]),
                                jnp.asarray(seen))
            params = jax.tree.map(jnp.add, params, delta)
        else:
            train_classes = seen
            if cfg.task_softmax:
                train_classes = np.zeros(num_classes, bool)
                train_classes[list(classes)] = True
            delta, masks, _ = train(task_key, jax.tree.map(jnp.asarray, fixed),
                                    jax.tree.map(jnp.asarray, frozen),
                                    jnp.asarray(data.x[t]), jnp.asarray(data.y[t]),
                                    jnp.asarray(data.n[t]), jnp.asarray(train_classes))
            # The task's own accuracy before consolidation (all of ``delta``), to tell
            # what reserving only ``neurons_per_task`` neurons costs (compare ``R[t, t]``).
            pre_reserve.append(evaluate(jax.tree.map(jnp.add, fixed, delta), data, seen)[t])
            fixed, frozen, reserved = reserve(fixed, frozen, delta, reserved, classes,
                                              cfg.neurons_per_task)
            params = jax.tree.map(jnp.asarray, fixed)
        r[t] = evaluate(params, data, seen)
    if method == "spacenet":
        used = sum(int((np.asarray(fixed[n]["kernel"]) != 0).sum()) for n in fixed)
        total = sum(np.asarray(fixed[n]["kernel"]).size for n in fixed)
        extra["weights_used"] = used / total
        extra["frozen_fraction"] = float(freeze_lib.frozen_fraction(
            jax.tree.map(jnp.asarray, frozen)))
        extra["reserved_neurons"] = [int(m.sum()) for m in reserved]
        extra["pre_reserve_accuracy"] = pre_reserve
    return r, extra


def build_trainers(cfg: CLConfig, data: TaskData) -> dict:
    n_all = int(data.n.sum())
    out = {}
    for m in cfg.methods:
        if m == "joint":
            out[("joint", n_all)] = make_task_trainer(
                cfg, False, cfg.steps_per_task * len(cfg.tasks))
        elif m == "finetune":
            out[("finetune", data.x.shape[1])] = make_task_trainer(
                cfg, False, cfg.steps_per_task, zero_delta=True)
        else:
            out[("spacenet", data.x.shape[1])] = make_task_trainer(
                cfg, True, cfg.steps_per_task)
    return out


def check_config(cfg: CLConfig) -> None:
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; choose from {METHODS}")
    if cfg.algorithm not in ("rigl", "set"):
        raise ValueError(f"algorithm: {cfg.algorithm!r} is not 'rigl' or 'set'")


def run(cfg: CLConfig, done: set | None = None, write=None) -> list[dict]:
    """Every method x seed; ``write(record)`` as each finishes."""
    check_config(cfg)
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir or None)
    data = split_tasks(ds, cfg.tasks)
    trainers = build_trainers(cfg, data)
    machine = machine_description()
    records = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            if done and (method, seed) in done:
                continue
            start = time.perf_counter()
            r, extra = run_method(method, cfg, data, seed, trainers)
            final = r[-1]
            rec = {"event": "final", "method": method, "dataset": cfg.dataset, "seed": seed,
                   "avg_accuracy": float(np.mean(final)),
                   "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row]
                                       for row in r],
                   "wall_time": time.perf_counter() - start, "machine": machine,
                   "config": json.dumps(cfg._asdict(), sort_keys=True, default=list), **extra}
            if method != "joint":
                f = forgetting(r)
                rec["forgetting"] = f
                rec["avg_forgetting"] = float(np.mean(f))
            records.append(rec)
            if write is not None:
                write(rec)
    return records


def setting(cfg: CLConfig | dict) -> str:
    """The config of a run less its sweep fields (``methods``, ``seeds``), as canonical JSON:
    records with equal settings come from the same experiment."""
    d = dict(cfg._asdict() if isinstance(cfg, CLConfig) else cfg)
    d.pop("methods", None)
    d.pop("seeds", None)
    return json.dumps(d, sort_keys=True, default=list)


def cl_config(c) -> CLConfig:
    fields = {k: c[k] for k in CLConfig._fields if k in c}
    fields["tasks"] = tuple(tuple(int(v) for v in t) for t in fields.get("tasks", ()))
    for name in ("hidden", "methods", "seeds"):
        if name in fields:
            fields[name] = tuple(fields[name])
    return CLConfig(**fields)


def _ms(values, scale=100.0) -> str:
    v = scale * np.asarray(values, np.float64)
    std = f"{v.std(ddof=1):.1f}" if len(v) > 1 else "n/a"
    return f"{v.mean():.1f} +- {std}"


def summary_table(records: list[dict]) -> str:
    """Markdown: average accuracy after the last task, average forgetting, and per-task
    forgetting (%, mean +- sample std over seeds, n)."""
    groups = collections.defaultdict(list)
    for r in records:
        if r.get("event") == "final":
            groups[r["method"]].append(r)
    n_tasks = max(len(r["accuracy_matrix"]) for rs in groups.values() for r in rs)
    head = (["method", "n", "avg. accuracy", "avg. forgetting"]
            + [f"forget T{j + 1}" for j in range(n_tasks - 1)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        rs = groups.get(m)
        if not rs:
            continue
        cells = [m, str(len(rs)), _ms([r["avg_accuracy"] for r in rs])]
        if m == "joint":
            cells += ["-"] * (n_tasks)
        else:
            cells.append(_ms([r["avg_forgetting"] for r in rs]))
            cells += [_ms([r["forgetting"][j] for r in rs]) for j in range(n_tasks - 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(records: list[dict], out: str | Path, title: str = "") -> Path:
    """Average accuracy over the tasks seen so far, after each task (mean +- std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in METHODS:
        rs = [r for r in records if r.get("event") == "final" and r["method"] == m]
        if not rs:
            continue
        if m == "joint":
            acc = 100 * np.asarray([r["avg_accuracy"] for r in rs])
            n_tasks = len(rs[0]["accuracy_matrix"])
            ax.errorbar([n_tasks], [acc.mean()], yerr=[acc.std()], marker="*", markersize=10,
                        label=f"{m} (n={len(rs)})", linestyle="none")
            continue
        curves = []
        for r in rs:
            a = np.asarray(r["accuracy_matrix"], np.float64)
            curves.append([a[t, : t + 1].mean() for t in range(len(a))])
        c = 100 * np.asarray(curves)
        x = np.arange(1, c.shape[1] + 1)
        mean, std = c.mean(0), c.std(0)
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"{m} (n={len(rs)})")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("avg. accuracy on tasks so far (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (JSON value), e.g. neurons_per_task=40")
    a = p.parse_args(argv)
    cfg = cl_config(apply_overrides(load_config(a.config), a.set))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if a.report:
        records = [r for r in _load(results) if r.get("dataset") == cfg.dataset]
        print(summary_table(records))
        print(plot_accuracy(records, out / "accuracy.png", f"split {cfg.dataset}"))
        return records
    # A (method, seed) is done when a record of the same setting (the config less its sweep
    # fields) has it, so that several settings (e.g. ``--set neurons_per_task=...``) can
    # share one results file.
    done = {(r["method"], r["seed"]) for r in _load(results)
            if r.get("event") == "final" and setting(json.loads(r["config"])) == setting(cfg)}

    def write(record):
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{record['method']} seed {record['seed']}: avg accuracy "
              f"{100 * record['avg_accuracy']:.1f}%", flush=True)

    return run(cfg, done, write)


if __name__ == "__main__":
    main()
