"""Issue 6 comparisons, one command each: dense-to-sparse methods, retraining a learned mask,
and pruning at initialisation, on an MLP (784-300-100-10, LeNet-300-100).

  python -m experiments.state_of_sparsity --study pruning --dataset fashion_mnist \
      --sparsities 0.5,0.8,0.9,0.95,0.98 --seeds 0,1,2 --epochs 5 --out runs/sos_pruning
  python -m experiments.state_of_sparsity --study retrain --out runs/sos_retrain ...
  python -m experiments.state_of_sparsity --study init --out runs/sos_init ...
  python -m experiments.state_of_sparsity --study pruning --quick --out /tmp/sos   # seconds
  python -m experiments.state_of_sparsity --summarize runs/sos_pruning/results.jsonl \
      --plot runs/sos_pruning/frontier.png

Every run appends one JSON line to ``<out>/results.jsonl``: ``study``, ``method``,
``target_sparsity``, ``sparsity`` (achieved, over the prunable kernels: the fraction of
kernel weights that are zero in the evaluated model), ``test_accuracy``, ``test_loss``,
``wall_time`` (seconds of that method's own training and mask selection), ``seed``,
``epochs``, ``steps``, ``dataset``, ``machine`` and method-specific fields.

Studies (all runs of one study share optimizer, learning-rate schedule, batch size, data
order per seed and the evaluation code; the test model is always the plain LeNet-300-100
with masked kernels, evaluated by ``experiments.train.make_eval``):

``--study pruning`` (Gale, Elsen & Hooker 2019, "The State of Sparsity"):

* ``magnitude``: gradual magnitude pruning (Zhu & Gupta), ``jaxsparse.magnitude_pruning``
  from 10% to 75% of training, ``--ranking`` (default layerwise, uniform per layer).
* ``random``: ``jaxsparse.random_pruning`` on the same schedule.
* ``vd``: sparse variational dropout (``VDDense`` layers), loss ``CE + w(t) * KL / N`` with
  ``w`` ramped 0 -> ``--vd_weight`` by ``penalty_schedule`` over the first half of training.
* ``l0``: hard-concrete L0 gates (``L0Dense``), loss ``CE + w(t) * L0 / N``, ``w`` ramped
  0 -> ``--l0_weight`` the same way.

  **How VD and L0 hit a target sparsity.** After training with the penalty, the weights of
  the three kernels are ranked by log alpha, *globally* or per layer (``--ranking``) (VD: lower is kept, i.e. the
  threshold ``log alpha < t``) or by the deterministic gate (L0: higher is kept, the
  threshold ``gate > t``). Both are clipped (log alpha to [-8, 8], the gate to [0, 1]; after
  a short run most L0 gates sit at exactly 1), so ties of clipped values are broken by the
  weight magnitude ``|w|``. ``jaxsparse.pruning_at_init.one_shot_masks`` keeps exactly
  ``round((1 - target) * n)`` weights (per layer under ``layerwise``); the implied threshold ``t`` (largest kept log alpha /
  smallest kept gate) is recorded as ``threshold``. No fine-tuning after the cut: the model
  evaluated is the deterministic one at that threshold: VD kernel ``theta * mask``, L0
  kernel ``w * gate * mask``. For L0, a kept weight whose gate is exactly 0 is still zero, so the
  achieved sparsity exceeds the target when the penalty alone pruned more than the target.
  The penalty's own sparsity and accuracy (VD ``log alpha < 3``, L0 ``gate > 0``) are
  recorded too (``natural_sparsity``, ``natural_accuracy``). The log-sigma^2 / gate
  parameters use their own learning rate ``--aux_lr`` (Adam), since with a short schedule
  the base rate barely moves them from their initialisation.

  **Penalty tuning, scopes and fine-tuning.** ``--vd_weight`` / ``--l0_weight`` take a comma
  list: each weight is a separate run (records carry ``penalty_weight``); the summary table
  lists each, and ``--plot`` draws the best weight per target sparsity (selected on test
  accuracy; ``sos_report.best_per_target(..., select_on="val_accuracy")`` selects on the
  validation split instead). ``--validation_size V`` holds ``V`` training examples out
  (``experiments.data.with_validation``; default 0: none) and every record then carries
  ``val_accuracy`` / ``val_loss`` next to the test numbers. ``--ranking layerwise,global``
  runs magnitude / random once per scope and cuts each VD / L0 training at both scopes.
  ``--finetune_fraction f`` also trains every method's final masked model (plain MLP, fixed
  masks, a fresh lr schedule of ``round(f * T)`` steps) and writes it as ``<method>_ft``
  (``magnitude_ft``, ``vd_ft``, ...): the same step budget (1 + f) T for every method; the
  default 0 keeps T for all. The penalised training does not depend on the target or scope,
  so VD / L0 train once per (seed, penalty weight) and are cut at every target and scope;
  each record's ``wall_time`` is that shared ``train_time`` plus its own cut (and
  fine-tuning).

``--study retrain`` (Frankle & Carbin 2019; Liu et al. 2019): one dense run per seed
(weights saved at step 0, at the rewind step and at the end), then per sparsity:

* ``magnitude``: joint gradual magnitude pruning during one training run (as above);
  ``--joint_steps_factor k`` (with ``--methods magnitude`` only) stretches that run to
  ``round(k * T)`` steps (records carry ``train_steps``): k = 4 matches IMP's budget.
* ``lottery_rewind0``: IMP (``jaxsparse.lottery.imp``, ``--rounds`` rounds of prune /
  rewind / retrain from the shared dense run) rewinding to the initialisation.
* ``lottery_rewind``: the same rewinding to step ``round(--rewind_fraction * T)``.
* ``scratch_e`` / ``scratch_b``: the final mask of ``magnitude`` trained from a fresh random
  initialisation for T / 2T steps.

  A retraining of ``n < T`` steps runs the last ``n`` steps of the T-step learning-rate
  schedule (so rewinding to step k resumes the schedule at k); a 2T-step run stretches the
  schedule to 2T. The optimizer state is fresh at every (re)training.

``--study init``: masks chosen at initialisation, then trained for T steps with
``jaxsparse.pruning_at_init.fixed_masks``: ``snip`` and ``grasp`` (scores on one batch of
``--score_batch`` training examples), ``synflow`` (iterative, ``--synflow_rounds``
rounds) and ``random`` (uniform random scores), all with global ranking as in their papers.

``--quick``: digits, 2 epochs, one seed, sparsities 0.5 and 0.9, 2 IMP rounds, 10 SynFlow
rounds (explicit flags still win). Data: ``--data_dir`` or ``../shared/data/<dataset>``
relative to the repository root.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import jaxsparse
from experiments import data as data_lib
from experiments import models
from experiments import train as train_lib
from experiments.sos_report import (  # noqa: F401 - re-exported for the CLI and tests
    _label,
    _method,
    best_per_target,
    best_table,
    plot_frontier,
    summary_table,
)
from jaxsparse import lottery
from jaxsparse import nn as jsnn
from jaxsparse import pruning_at_init as pai
from jaxsparse.masks import map_masked

STUDIES = {
    "pruning": ("magnitude", "vd", "l0", "random"),
    # (--finetune_fraction > 0 also writes <method>_ft; not selectable on its own)
    "retrain": ("magnitude", "lottery_rewind0", "lottery_rewind", "scratch_e", "scratch_b"),
    "init": ("snip", "grasp", "synflow", "random"),
}
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- model


class MLP(nn.Module):
    """LeNet-300-100 with plain, variational-dropout or L0 dense layers.

    Layers are named ``Dense_0..2`` like ``experiments.models.LeNet300``, so a masked
    kernel tree drops straight into that model for evaluation.
    """

    hidden: Sequence[int] = (300, 100)
    num_classes: int = 10
    layer: str = "dense"  # dense, vd, l0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = models._as_float(x).reshape(x.shape[0], -1)
        sizes = (*self.hidden, self.num_classes)
        for i, width in enumerate(sizes):
            name = f"Dense_{i}"
            if self.layer == "dense":
                x = nn.Dense(width, name=name)(x)
            elif self.layer == "vd":
                x = jsnn.VDDense(width, name=name)(x, deterministic=not train)
            elif self.layer == "l0":
                x = jsnn.L0Dense(width, name=name)(x, deterministic=not train)
            else:
                raise ValueError(f"unknown layer {self.layer!r}")
            if i < len(sizes) - 1:
                x = nn.relu(x)
        return x


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def kernel_sparsity(params) -> float:
    """Fraction of exact zeros over the ``kernel`` leaves."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = [np.asarray(x) for p, x in flat if jax.tree_util.keystr(p).endswith("['kernel']")]
    nnz = sum(int(np.count_nonzero(k)) for k in kernels)
    return 1.0 - nnz / sum(k.size for k in kernels)


# ----------------------------------------------------------------------------- training


class Context:
    """What every run of a study shares: data, model, evaluation, optimizer settings."""

    def __init__(self, args, ds: data_lib.Dataset):
        self.args = args
        self.ds = ds
        self.model = models.LeNet300(num_classes=ds.num_classes)
        self.steps_per_epoch = len(ds.x_train) // args.batch_size
        self.total = max(1, args.epochs * self.steps_per_epoch)
        self.evaluate = train_lib.make_eval(self.model, ds.x_test, ds.y_test, 1000)
        self.evaluate_val = (None if ds.x_val is None else train_lib.make_eval(
            self.model, ds.x_val, ds.y_val, 1000, prefix="val"))
        self.machine = train_lib.machine_description()
        self._steps = {}

    def init_params(self, key, layer: str = "dense"):
        model = MLP(num_classes=self.ds.num_classes, layer=layer)
        return models.init_params(model, self.ds.image_shape, key), model

    def inner(self, total: int | None = None, offset: int = 0):
        """Base optimizer; ``offset`` shifts the lr schedule (resume at a rewound step)."""
        a = self.args
        total = self.total if total is None else total
        c = ml_collections.ConfigDict({"learning_rate": a.lr, "warmup_steps": 0,
                                       "lr_schedule": a.lr_schedule})
        base = train_lib.learning_rate_schedule(c, total)

        def lr(count):
            return base(jnp.asarray(count) + offset)

        if a.optimizer == "adam":
            return optax.adam(lr)
        return optax.sgd(lr, momentum=0.9)

    def dense_loss(self, model):
        def loss(params, x, y, step, key):
            del step, key
            return cross_entropy(model.apply({"params": params}, x), y)

        return loss

    def fit(self, loss_fn: Callable, params, tx, steps: int, seed: int, key,
            save_at: Sequence[int] = (), cache_key=None):
        """``steps`` jitted steps of ``tx`` on ``loss_fn(params, x, y, step, key)``.

        ``cache_key``: reuse the step compiled by an earlier call with the same key (the
        caller guarantees that loss and ``tx.update`` then compute the same function).
        Returns ``(params, opt_state, {step: params})`` for the steps in ``save_at``.
        """
        bs = self.args.batch_size
        it = data_lib.BatchIterator(self.ds.x_train, self.ds.y_train, bs, seed=seed)
        # Committed to one device like the step's outputs, so the step compiles once.
        params, opt_state = jax.device_put((params, tx.init(params)), jax.devices()[0])

        def step(params, opt_state, x_all, y_all, perm, start, i, key):
            x, y = data_lib.take_batch(x_all, y_all, perm, start, bs)
            grads = jax.grad(loss_fn)(params, x, y, i, jax.random.fold_in(key, i))
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        if cache_key is None:
            step = jax.jit(step)
        else:
            step = self._steps.setdefault(cache_key, jax.jit(step))
        saved = {}
        for i in range(steps):
            if i in save_at:
                saved[i] = params
            perm, start = it.next_indices()
            params, opt_state = step(params, opt_state, it.x, it.y, perm, start,
                                     jnp.asarray(i, jnp.int32), key)
        jax.block_until_ready(params)
        return params, opt_state, saved

    def record(self, study, method, target, seed, params, masks, wall, **extra) -> dict:
        kept = jaxsparse.apply_masks(params, masks)
        ev = {k: float(v) for k, v in self.evaluate(kept).items()}
        if self.evaluate_val is not None:
            ev.update({k: float(v) for k, v in self.evaluate_val(kept).items()})
        a = self.args
        return {
            "study": study, "method": method, "target_sparsity": float(target),
            "sparsity": kernel_sparsity(kept), **ev, "wall_time": wall, "seed": seed,
            "epochs": a.epochs, "steps": self.total, "dataset": self.ds.name,
            "optimizer": a.optimizer, "lr": a.lr, "batch_size": a.batch_size,
            "validation_size": 0 if self.ds.x_val is None else len(self.ds.x_val),
            "train_size": len(self.ds.x_train), "machine": self.machine, **extra,
        }

    def gradual(self, factory, sparsity, ranking=None, total=None, **kw):
        """``factory`` (gradual pruning) over a ``total``-step run (default T): pruning from
        10% to 75% of it, 20 mask updates, the lr schedule stretched to ``total``."""
        total = self.total if total is None else total
        end = max(1, int(0.75 * total))
        begin = min(int(0.1 * total), end - 1)
        freq = max(1, (end - begin) // 20)
        return factory(self.inner(total), sparsity, end_step=end, begin_step=begin,
                       update_every=freq, ranking=ranking or self.args.ranking, **kw)

    def train_gradual(self, method, sparsity, seed, ranking=None, total=None):
        """Magnitude or random gradual pruning over ``total`` steps (default T) with
        ``ranking`` (default ``--ranking``); returns ``(params, masks, seconds)``."""
        t0 = time.perf_counter()
        total = self.total if total is None else total
        k_init, k_tx = jax.random.split(jax.random.key(seed))
        params, model = self.init_params(k_init)
        if method == "magnitude":
            tx = self.gradual(jaxsparse.magnitude_pruning, sparsity, ranking, total)
        else:
            tx = self.gradual(jaxsparse.random_pruning, sparsity, ranking, total, key=k_tx)
        params, opt_state, _ = self.fit(self.dense_loss(model), params, tx, total, seed,
                                        k_tx)
        masks = jaxsparse.get_masks(opt_state)
        return params, masks, time.perf_counter() - t0

    def masked_train_fn(self, seed, key):
        """``train_fn(params, masks, n)`` for the lottery functions (fixed masks)."""
        model = MLP(num_classes=self.ds.num_classes)
        loss = self.dense_loss(model)

        def train_fn(params, masks, n):
            schedule = (max(n, self.total), max(self.total - n, 0))
            tx = pai.fixed_masks(self.inner(*schedule), masks)
            # fixed_masks keeps its masks in the optimizer state, so one compiled step
            # serves every mask with this lr schedule (checked below).
            params, _, _ = self.fit(loss, jaxsparse.apply_masks(params, masks), tx, n, seed,
                                    key, cache_key=("fixed", schedule))
            outside = map_masked(lambda m, w: int(jnp.count_nonzero(jnp.where(m, 0.0, w))),
                                 masks, params, dense=lambda w: 0)
            if sum(jax.tree.leaves(outside)):
                raise RuntimeError(f"weights outside the fixed masks were trained: {outside}")
            return params, None

        return train_fn


# ----------------------------------------------------------------------------- VD / L0


def _layers(params):
    return sorted(k for k in params if k.startswith("Dense_"))


def penalized_train(ctx: Context, method: str, seed: int, penalty_weight: float):
    """Trains VD or L0 with a ramped penalty (peak ``penalty_weight / N_train``); the
    training does not depend on the target sparsity, so one run serves every target (see
    :func:`cut_to_target`). Returns ``(params, seconds)``."""
    a = ctx.args
    t0 = time.perf_counter()
    k_init, k_noise = jax.random.split(jax.random.key(seed))
    params, model = ctx.init_params(k_init, method)
    n_train = len(ctx.ds.x_train)
    aux_name = "log_sigma2" if method == "vd" else "log_alpha"
    peak = penalty_weight / n_train
    weight = jsnn.penalty_schedule(peak, max(1, ctx.total // 2))
    penalty = jsnn.kl_divergence if method == "vd" else jsnn.l0_penalty

    def loss_fn(p, x, y, step, key):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
        return cross_entropy(logits, y) + weight(step) * penalty(p)

    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "aux" if jax.tree_util.keystr(path).endswith(f"['{aux_name}']")
        else "main", params)
    tx = optax.multi_transform({"main": ctx.inner(), "aux": optax.adam(a.aux_lr)}, labels)
    params, _, _ = ctx.fit(loss_fn, params, tx, ctx.total, seed, k_noise)
    return params, time.perf_counter() - t0


def cut_to_target(ctx: Context, method: str, params, sparsity: float, penalty_weight: float,
                  ranking: str = "global"):
    """Masks trained VD / L0 ``params`` to ``sparsity`` by a ``ranking`` ("global" or
    "layerwise": every layer at ``sparsity``) of log alpha / the gate (see the module
    docstring). Returns ``(eval params, masks, seconds, extra fields)``."""
    a = ctx.args
    t0 = time.perf_counter()
    layers = _layers(params)
    # Ranking on log alpha (VD, low kept) / gate (L0, high kept); ties of clipped
    # values (log alpha at -8 or 8, gate at 1 or 0) are broken by |weight|.
    wmax = max(float(jnp.max(jnp.abs(params[n]["kernel"]))) for n in layers) or 1.0

    def magnitude(n):
        return jnp.abs(params[n]["kernel"]) / wmax  # in [0, 1], same order in every layer

    if method == "vd":
        rank = {n: jsnn.log_alpha(params[n]["kernel"], params[n]["log_sigma2"]) for n in layers}
        scores = {n: {"kernel": jnp.where(
            rank[n] <= jsnn.variational_dropout.LOG_ALPHA_MIN, 17.0 + magnitude(n),
            jnp.where(rank[n] >= jsnn.variational_dropout.LOG_ALPHA_MAX, -9.0 + magnitude(n),
                      -rank[n]))} for n in layers}
        effective = {n: params[n]["kernel"] for n in layers}
        natural = jsnn.vd_masks(params)
    else:
        rank = {n: jsnn.deterministic_gate(params[n]["log_alpha"]) for n in layers}
        scores = {n: {"kernel": jnp.where(
            rank[n] >= 1.0, 2.0 + magnitude(n),
            jnp.where(rank[n] <= 0.0, -2.0 + magnitude(n), rank[n]))} for n in layers}
        effective = {n: params[n]["kernel"] * rank[n] for n in layers}
        natural = jsnn.l0_masks(params)
    masks = pai.one_shot_masks(scores, sparsity, ranking=ranking)
    kept = np.concatenate([np.asarray(rank[n])[np.asarray(masks[n]["kernel"])] for n in layers])
    if not kept.size:
        threshold = None
    else:
        threshold = float(kept.max()) if method == "vd" else float(kept.min())
    plain = {n: {"kernel": effective[n], "bias": params[n]["bias"]} for n in layers}
    full = {n: {"kernel": masks[n]["kernel"], "bias": None} for n in layers}
    nat = {n: {"kernel": natural[n]["kernel"], "bias": None} for n in layers}
    nat_params = jaxsparse.apply_masks(plain, nat)
    extra = {
        "threshold": threshold,
        "natural_sparsity": kernel_sparsity(nat_params),
        "natural_accuracy": float(ctx.evaluate(nat_params)["test_accuracy"]),
        "penalty_weight": penalty_weight, "aux_lr": a.aux_lr, "ranking": ranking,
    }
    return plain, full, time.perf_counter() - t0, extra


# ----------------------------------------------------------------------------- studies


def finetune(ctx: Context, params, masks, steps: int, seed: int):
    """``steps`` steps of the plain MLP with fixed ``masks`` (a fresh lr schedule of that
    length), starting from the pruned ``params``."""
    model = MLP(num_classes=ctx.ds.num_classes)
    tx = pai.fixed_masks(ctx.inner(steps), masks)
    params, _, _ = ctx.fit(ctx.dense_loss(model), jaxsparse.apply_masks(params, masks), tx,
                           steps, seed, jax.random.key(seed), cache_key=("finetune", steps))
    return params


def run_pruning(ctx: Context, methods, sparsities, seeds, write):
    a = ctx.args
    ft_steps = max(1, int(round(a.finetune_fraction * ctx.total))) \
        if a.finetune_fraction > 0 else 0

    def emit(m, s, seed, params, masks, wall, **extra):
        write(ctx.record("pruning", m, s, seed, params, masks, wall, **extra))
        if ft_steps:  # the same fine-tuning budget for every method (--finetune_fraction)
            t0 = time.perf_counter()
            tuned = finetune(ctx, params, masks, ft_steps, seed)
            write(ctx.record("pruning", f"{m}_ft", s, seed, tuned, masks,
                             wall + time.perf_counter() - t0, finetune_steps=ft_steps,
                             **extra))

    for seed in seeds:
        for m in methods:
            if m in ("magnitude", "random"):
                for ranking in a.rankings:
                    for s in sparsities:
                        params, masks, wall = ctx.train_gradual(m, s, seed, ranking)
                        emit(m, s, seed, params, masks, wall, ranking=ranking)
                continue
            for w in (a.vd_weight if m == "vd" else a.l0_weight):
                trained, train_time = penalized_train(ctx, m, seed, w)
                for ranking in a.rankings:
                    for s in sparsities:
                        params, masks, cut_time, extra = cut_to_target(ctx, m, trained, s, w,
                                                                       ranking)
                        emit(m, s, seed, params, masks, train_time + cut_time,
                             train_time=train_time, **extra)


def run_retrain(ctx: Context, methods, sparsities, seeds, write):
    a = ctx.args
    T = ctx.total
    k_step = min(max(1, int(round(a.rewind_fraction * T))), T - 1)
    for seed in seeds:
        key = jax.random.key(seed)
        k_init, k_fresh, k_train = jax.random.split(key, 3)
        init, model = ctx.init_params(k_init)
        fresh, _ = ctx.init_params(k_fresh)
        train_fn = ctx.masked_train_fn(seed, k_train)
        dense_time = None
        ckpts = None
        if any(m.startswith("lottery") for m in methods):
            t0 = time.perf_counter()
            trained, _, saved = ctx.fit(ctx.dense_loss(model), init, ctx.inner(), T, seed,
                                        k_train, save_at=(0, k_step))
            ckpts = {0: init, k_step: saved[k_step], T: trained}
            dense_time = time.perf_counter() - t0
            ones = jaxsparse.ones_masks(trained)
            write(ctx.record("retrain", "dense", 0.0, seed, trained, ones, dense_time))
        joint_steps = max(1, int(round(a.joint_steps_factor * T)))
        for s in sparsities:
            mag_masks = None
            if any(m in ("magnitude", "scratch_e", "scratch_b") for m in methods):
                params, mag_masks, wall = ctx.train_gradual("magnitude", s, seed,
                                                            total=joint_steps)
                if "magnitude" in methods:
                    write(ctx.record("retrain", "magnitude", s, seed, params, mag_masks, wall,
                                     ranking=a.ranking, train_steps=joint_steps))
            for m in methods:
                if m in ("lottery_rewind0", "lottery_rewind"):
                    rw = 0 if m == "lottery_rewind0" else k_step
                    t0 = time.perf_counter()
                    res = lottery.imp(train_fn, init, num_steps=T, rounds=a.rounds, sparsity=s,
                                      rewind_step=rw, checkpoints=ckpts, ranking=a.ranking)
                    wall = time.perf_counter() - t0
                    write(ctx.record("retrain", m, s, seed, res.params, res.masks, wall,
                                     rounds=a.rounds, rewind_step=rw, ranking=a.ranking,
                                     dense_pretrain_time=dense_time))
                elif m in ("scratch_e", "scratch_b"):
                    fn = lottery.scratch_e if m == "scratch_e" else lottery.scratch_b
                    t0 = time.perf_counter()
                    params, _ = fn(train_fn, mag_masks, fresh, num_steps=T)
                    wall = time.perf_counter() - t0
                    write(ctx.record("retrain", m, s, seed, params, mag_masks, wall,
                                     mask_from="magnitude",
                                     train_steps=T * (1 if m == "scratch_e" else 2)))


def init_masks(ctx: Context, method, params, model, sparsity, batch, key):
    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    if method == "synflow":
        return pai.synflow_masks(apply_fn, params, (1, *ctx.ds.image_shape), sparsity,
                                 rounds=ctx.args.synflow_rounds, ranking="global")
    if method == "snip":
        def loss_fn(p, b):
            return cross_entropy(apply_fn(p, b[0]), b[1])

        scores = pai.snip_scores(loss_fn, params, batch)
    elif method == "grasp":
        scores = pai.grasp_scores(apply_fn, params, batch)
    elif method == "random":
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        scores = jax.tree.unflatten(
            treedef, [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves,
                                                                            strict=True)])
    else:
        raise ValueError(f"unknown init method {method!r}")
    return pai.one_shot_masks(scores, sparsity, ranking="global")


def run_init(ctx: Context, methods, sparsities, seeds, write):
    a = ctx.args
    for s in sparsities:
        for seed in seeds:
            k_init, k_train, k_rand = jax.random.split(jax.random.key(seed), 3)
            init, model = ctx.init_params(k_init)
            n = len(ctx.ds.x_train)
            idx = np.random.default_rng(seed).choice(n, min(a.score_batch, n), replace=False)
            batch = (jnp.asarray(ctx.ds.x_train[idx]), jnp.asarray(ctx.ds.y_train[idx]))
            train_fn = ctx.masked_train_fn(seed, k_train)
            for m in methods:
                t0 = time.perf_counter()
                masks = init_masks(ctx, m, init, model, s, batch, k_rand)
                jax.block_until_ready(masks)
                t_mask = time.perf_counter() - t0
                params, _ = train_fn(init, masks, ctx.total)
                wall = time.perf_counter() - t0
                write(ctx.record("init", m, s, seed, params, masks, wall, mask_time=t_mask,
                                 ranking="global"))


RUNNERS = {"pruning": run_pruning, "retrain": run_retrain, "init": run_init}


# ----------------------------------------------------------------------------- CLI


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=sorted(STUDIES))
    p.add_argument("--out", help="folder; results go to <out>/results.jsonl")
    p.add_argument("--summarize", default=None, nargs="+",
                   help="print a markdown table of these results.jsonl files and exit")
    p.add_argument("--best", action="store_true",
                   help="with --summarize: one row per method, one column per target, the "
                        "best penalty weight per cell")
    p.add_argument("--plot", default=None,
                   help="with --summarize: also write the sparsity-accuracy frontier PNG here")
    p.add_argument("--methods", default=None, help="comma list; default: all of the study")
    p.add_argument("--dataset", default=None, choices=["digits", "mnist", "fashion_mnist"],
                   help="default fashion_mnist (digits with --quick)")
    p.add_argument("--data_dir", default=None,
                   help="default ../shared/data/<dataset> relative to the repository root")
    p.add_argument("--sparsities", default=None, help="default 0.5,0.8,0.9,0.95,0.98")
    p.add_argument("--seeds", default=None, help="default 0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="default 5 (2 with --quick)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr_schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--ranking", default="layerwise",
                   help="layerwise or global: magnitude / random pruning, VD / L0 cut and IMP "
                        "ranking; --study pruning takes a comma list (each scope is run; VD / "
                        "L0 are trained once and cut with each)")
    p.add_argument("--validation_size", type=float, default=0,
                   help="training examples held out as the validation split (a count, or a "
                        "fraction below 1); records then carry val_accuracy / val_loss. "
                        "Default 0: none")
    p.add_argument("--validation_seed", type=int, default=0,
                   help="which training examples are held out")
    p.add_argument("--vd_weight", default="1.0",
                   help="KL weight x N_train; a comma list runs each (penalty tuning)")
    p.add_argument("--l0_weight", default="0.1",
                   help="L0 weight x N_train; a comma list runs each (penalty tuning)")
    p.add_argument("--finetune_fraction", type=float, default=0.0,
                   help="--study pruning, every method: after training (and the VD / L0 "
                        "cut), also fine-tune the masked model for this fraction of the "
                        "training steps (written as <method>_ft)")
    p.add_argument("--aux_lr", type=float, default=1e-2,
                   help="Adam lr of log_sigma2 (VD) and gate log_alpha (L0)")
    p.add_argument("--rounds", type=int, default=None, help="IMP rounds (default 3)")
    p.add_argument("--rewind_fraction", type=float, default=0.05)
    p.add_argument("--joint_steps_factor", type=float, default=1.0,
                   help="--study retrain: the joint gradual-magnitude run trains for this "
                        "many times T steps (e.g. 4: IMP's budget, the step-matched baseline); "
                        "only with --methods magnitude")
    p.add_argument("--score_batch", type=int, default=256)
    p.add_argument("--synflow_rounds", type=int, default=None, help="default 100")
    p.add_argument("--quick", action="store_true", help="tiny settings (digits, 2 epochs)")
    args = p.parse_args(argv)
    if args.summarize:
        return args
    if args.study is None or args.out is None:
        p.error("--study and --out are required (unless --summarize)")
    q = args.quick
    defaults = {
        "dataset": "digits" if q else "fashion_mnist",
        "sparsities": "0.5,0.9" if q else "0.5,0.8,0.9,0.95,0.98",
        "seeds": "0" if q else "0,1,2",
        "epochs": 2 if q else 5,
        "rounds": 2 if q else 3,
        "synflow_rounds": 10 if q else 100,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.methods = (list(STUDIES[args.study]) if args.methods is None
                    else [m for m in args.methods.split(",") if m])
    bad = [m for m in args.methods if m not in STUDIES[args.study]]
    if bad:
        p.error(f"unknown methods {bad} for --study {args.study}; "
                f"choose from {STUDIES[args.study]}")
    args.sparsities = _floats(args.sparsities)
    args.rankings = [r for r in args.ranking.split(",") if r]
    bad = [r for r in args.rankings if r not in ("layerwise", "global")]
    if bad or not args.rankings or len(set(args.rankings)) != len(args.rankings):
        p.error(f"--ranking takes layerwise and/or global (no repeats), got {args.ranking!r}")
    if len(args.rankings) > 1 and args.study != "pruning":
        p.error(f"--ranking {args.ranking!r}: a list is for --study pruning only")
    args.ranking = args.rankings[0]
    if args.validation_size < 0 or (args.validation_size >= 1
                                    and args.validation_size != int(args.validation_size)):
        p.error(f"--validation_size must be 0, a fraction in (0, 1) or a count, got "
                f"{args.validation_size}")
    if args.validation_size >= 1:
        args.validation_size = int(args.validation_size)
    args.seeds = _ints(args.seeds)
    args.vd_weight, args.l0_weight = _floats(args.vd_weight), _floats(args.l0_weight)
    for name in ("vd_weight", "l0_weight"):
        bad = [w for w in getattr(args, name) if not w > 0]
        if bad or not getattr(args, name):
            p.error(f"--{name} needs positive weights, got {getattr(args, name)}")
    if args.joint_steps_factor != 1.0 and (
            args.study != "retrain" or args.methods != ["magnitude"]
            or not args.joint_steps_factor > 0):
        p.error(f"--joint_steps_factor {args.joint_steps_factor} needs a positive factor, "
                "--study retrain and --methods magnitude (scratch-e/b reuse that run's mask "
                "and are defined on a T-step joint run)")
    if not 0.0 <= args.finetune_fraction <= 1.0:
        p.error(f"--finetune_fraction must be in [0, 1], got {args.finetune_fraction}")
    return args


def load(args) -> data_lib.Dataset:
    """The dataset, with ``--validation_size`` training examples held out."""
    folder = None
    if args.dataset != "digits":
        folder = args.data_dir or str(REPO_ROOT / ".." / "shared" / "data" / args.dataset)
    return data_lib.load_dataset(args.dataset, folder, validation_size=args.validation_size,
                                 validation_seed=args.validation_seed)


def main(argv=None) -> list[dict]:
    """Runs the study; returns the records it wrote."""
    args = parse_args(argv)
    if args.summarize:
        records = [json.loads(line) for path in args.summarize
                   for line in Path(path).read_text().splitlines() if line.strip()]
        print(best_table(records) if args.best else summary_table(records))
        if args.plot:
            print(f"wrote {plot_frontier(records, args.plot)}")
        return []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with jax.numpy_dtype_promotion("standard"):
        ds = load(args)
        ctx = Context(args, ds)

        def write(record):
            records.append(record)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{record['method']:>16} s={record['target_sparsity']:.3f} "
                  f"seed={record['seed']} acc={record['test_accuracy']:.4f} "
                  f"achieved={record['sparsity']:.4f} {record['wall_time']:.1f}s", flush=True)

        RUNNERS[args.study](ctx, args.methods, args.sparsities, args.seeds, write)
    return records


if __name__ == "__main__":
    main()
