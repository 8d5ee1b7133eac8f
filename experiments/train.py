"""Training entry point: any model x dataset x sparse algorithm from a config file.

  python -m experiments.train --config=experiments/configs/digits_mlp.py \
      --config.algorithm=set --config.sparsity=0.95 --workdir=/tmp/run
  python -m experiments.train --config=... --workdir=/tmp/run --resume   # after a crash
  python -m experiments.train --config=... --workdir=/tmp/run --resume \
      --config.epochs=20 --allow_changes=epochs                            # train longer

One jitted train step (batch gather, forward, backward, sparse optimizer update, metric sums)
per iteration; the host only syncs every ``log_every`` steps (progress bar, train metrics),
at each epoch end (validation evaluation; the test split only at the end, or at every
evaluation when the config holds out no validation split: ``validation_size=0``) and when
checkpointing. ``--resume`` continues from the newest intact checkpoint and refuses a config
that differs from the run's ``config.json`` (the error lists the keys).

The function is split along what a reader looks for: :func:`open_run` (workdir, resume,
config check), :func:`run_loop` (the hot loop), :func:`make_evaluation` and
:class:`Logger` (asynchronous metric records). The loss is computed on the
stored, already-masked params and its dense gradient goes to ``tx.update`` (RigL grows by
it); the forward never multiplies kernel * mask.

Outputs in the workdir: ``metrics.jsonl`` (one JSON record per log / eval / final event;
also as TensorBoard scalars under ``tensorboard/`` when ``tensorboard=True`` and tensorboardX
is installed;
``time`` is host seconds since start when the record was queued; a resumed run appends and
repeats the steps after its checkpoint),
``checkpoints/<step>/`` (Orbax: params, optimizer state with masks, step, PRNG key, data
position), ``config.json``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import jaxsparse
from experiments import data as data_lib
from experiments import models
from experiments import steps as steps_lib
from experiments.checkpoint import Checkpointer


class TrainState(NamedTuple):
    """Everything a run needs to continue: checkpointed as one pytree."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32[]
    rng: jax.Array  # typed PRNG key, for stochastic layers (folded with the step)


# ----------------------------------------------------------------------------- algorithms


def _drop_fraction(c) -> dict:
    """``drop_fraction`` for the factory only when the config sets one (``None`` keeps the
    algorithm's own default, e.g. SNFS's 0.5 vs RigL's 0.3)."""
    return {} if c.drop_fraction is None else {"drop_fraction": float(c.drop_fraction)}


def _dst(factory):
    def build(inner, c, key, total_steps):
        return factory(
            inner, c.sparsity, key=key, end_step=max(1, int(c.end_fraction * total_steps)),
            distribution=c.distribution, update_every=c.update_every, **_drop_fraction(c),
            **dict(c.algorithm_kwargs),
        )

    return build


def _nm_pruning(inner, c, key, total_steps):
    del key
    end = max(1, int(c.end_fraction * total_steps))
    return jaxsparse.nm_pruning(
        inner, end_step=end, begin_step=min(int(c.prune_begin_fraction * total_steps), end - 1),
        update_every=c.update_every, **dict(c.algorithm_kwargs))


def _nm_rigl(inner, c, key, total_steps):
    return jaxsparse.nm_rigl(
        inner, key=key, end_step=max(1, int(c.end_fraction * total_steps)),
        update_every=c.update_every, **_drop_fraction(c), **dict(c.algorithm_kwargs))


def _static(inner, c, key, total_steps):
    del total_steps
    return jaxsparse.static(inner, c.sparsity, key=key, distribution=c.distribution,
                            **dict(c.algorithm_kwargs))


def _pruning(factory, needs_key):
    def build(inner, c, key, total_steps):
        end = max(1, int(c.end_fraction * total_steps))
        kwargs = dict(end_step=end, begin_step=min(int(c.prune_begin_fraction * total_steps),
                                                   end - 1),
                      update_every=c.update_every, distribution=c.distribution)
        if needs_key:
            kwargs["key"] = key
        return factory(inner, c.sparsity, **kwargs, **dict(c.algorithm_kwargs))

    return build


def _dense(inner, c, key, total_steps):
    del c, key, total_steps
    return inner


def algorithm_registry() -> dict:
    """``name -> build(inner, config, key, total_steps) -> optax transformation``.

    ``srigl_no_ablation`` is SRigL with ``ablation=False`` (constant fan-in RigL).
    ``nm_pruning`` / ``nm_rigl`` take N and M from ``algorithm_kwargs`` (default 2:4) and
    ignore ``sparsity`` (theirs is ``1 - N/M``).
    """
    registry = {
        "dense": _dense,
        "static": _static,
        "set": _dst(jaxsparse.set),
        "rigl": _dst(jaxsparse.rigl),
        "snfs": _dst(jaxsparse.snfs),
        "magnitude": _pruning(jaxsparse.magnitude_pruning, needs_key=False),
        "random": _pruning(jaxsparse.random_pruning, needs_key=True),
    }
    registry["srigl"] = _dst(jaxsparse.srigl)
    registry["srigl_no_ablation"] = _dst(functools.partial(jaxsparse.srigl, ablation=False))
    registry["granet"] = _dst(jaxsparse.granet)
    registry["nm_pruning"] = _nm_pruning
    registry["nm_rigl"] = _nm_rigl
    return registry


def learning_rate_schedule(c, total_steps: int):
    """Linear warmup then cosine decay to 0, constant, or step decay, as ``count -> lr``.

    ``step``: multiply by ``lr_decay_factor`` at each epoch in ``lr_decay_epochs`` (the rigl
    MNIST recipe: /3 at epochs 75 and 95) and at each step in ``lr_decay_steps``
    (sparse_learning: x0.1 every 25k iterations). Written out rather than with optax's schedules,
    whose int/float mixing fails under ``jax_numpy_dtype_promotion="strict"``.
    """
    if c.lr_schedule not in ("cosine", "constant", "step"):
        raise ValueError(
            f"unknown lr_schedule {c.lr_schedule!r}; choose cosine, constant or step"
        )
    base_lr, warmup = float(c.learning_rate), int(c.warmup_steps)
    decay_steps = float(max(total_steps - warmup, 1))
    boundaries = []
    if c.lr_schedule == "step":
        if not 0.0 < float(c.lr_decay_factor) <= 1.0:
            raise ValueError(f"lr_decay_factor must be in (0, 1], got {c.lr_decay_factor}")
        steps_per_epoch = total_steps / max(float(c.epochs), 1.0) if not c.num_steps else None
        if steps_per_epoch is None:
            raise ValueError("lr_schedule='step' counts epochs; set epochs, not num_steps")
        boundaries = [float(round(e * steps_per_epoch)) for e in c.lr_decay_epochs]
        boundaries += [float(b) for b in c.get("lr_decay_steps", ())]

    def schedule(count):
        t = jnp.asarray(count).astype(jnp.float32)
        lr = jnp.asarray(base_lr, jnp.float32)
        if warmup:
            lr = lr * jnp.minimum((t + 1.0) / float(warmup), 1.0)
        if c.lr_schedule == "cosine":
            progress = jnp.clip((t - float(warmup)) / decay_steps, 0.0, 1.0)
            lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        for b in boundaries:
            lr = jnp.where(t >= b, lr * float(c.lr_decay_factor), lr)
        return lr

    return schedule


def make_optimizer(c, total_steps: int, key: jax.Array):
    """The sparse (or dense) optimizer described by config ``c``."""
    lr = learning_rate_schedule(c, total_steps)
    if c.optimizer == "sgd":
        inner = optax.sgd(lr, momentum=c.momentum or None, nesterov=bool(c.nesterov))
        if c.weight_decay:
            inner = optax.chain(optax.add_decayed_weights(c.weight_decay), inner)
    elif c.optimizer == "adam":
        inner = optax.adam(lr)
    elif c.optimizer == "adamw":
        inner = optax.adamw(lr, weight_decay=c.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {c.optimizer!r}; choose sgd, adam or adamw")
    registry = algorithm_registry()
    if c.algorithm not in registry:
        raise ValueError(f"unknown algorithm {c.algorithm!r}; choose one of {sorted(registry)}")
    return registry[c.algorithm](inner, c, key, total_steps)


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model, tx, batch_size: int, topology_update: bool | None = None):
    """``(state, sums, x_all, y_all, perm, start) -> (state, sums)``, one jitted step.

    ``sums`` accumulates (loss sum, correct, count) on the device between host syncs.
    ``topology_update``: ``None`` decides in the step whether the topology changes; a bool
    compiles a step of that kind only (see :func:`step_chooser`).
    """
    kind = {} if topology_update is None else {"topology_update": topology_update}

    def step(state: TrainState, sums, x_all, y_all, perm, start):
        x, y = data_lib.take_batch(x_all, y_all, perm, start, batch_size)

        def loss_fn(params):
            logits = model.apply({"params": params}, x)
            return cross_entropy(logits, y), logits

        # Dense gradient w.r.t. the stored, already-masked params (what RigL grows by).
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **kind)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y, dtype=jnp.int32)
        sums = (sums[0] + loss * batch_size, sums[1] + correct, sums[2] + batch_size)
        return TrainState(params, opt_state, state.step + 1, state.rng), sums

    return jax.jit(step)


def step_chooser(c, model, tx, batch_size: int):
    """``t -> step``: one train step for every ``t``, or with ``c.host_topology`` a plain
    and an update step picked on the host (:func:`experiments.steps.step_chooser`)."""
    return steps_lib.step_chooser(
        tx, lambda kind: make_train_step(model, tx, batch_size, kind),
        host=c.get("host_topology", False), algorithm=c.algorithm)


def zero_sums():
    """Metric accumulators (loss sum, correct, count), committed to the default device."""
    return jax.device_put(
        (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)),
        jax.devices()[0],
    )


def make_eval(model, x_test: np.ndarray, y_test: np.ndarray, batch_size: int,
              prefix: str = "test"):
    """``params -> {"<prefix>_loss", "<prefix>_accuracy"}`` (device scalars) over the whole
    split ``(x_test, y_test)`` in one jitted call."""
    n = len(x_test)
    batch_size = min(batch_size, n)
    n_chunks = -(-n // batch_size)
    pad = n_chunks * batch_size - n
    x = jax.device_put(np.concatenate([x_test, np.zeros((pad, *x_test.shape[1:]),
                                                        x_test.dtype)]))
    y = jax.device_put(np.concatenate([y_test, np.zeros((pad,), y_test.dtype)]).astype(np.int32))
    valid = jax.device_put(np.arange(n + pad) < n)

    @jax.jit
    def evaluate(params, x, y, valid):
        def body(i, acc):
            xb = jax.lax.dynamic_slice_in_dim(x, i * batch_size, batch_size)
            yb = jax.lax.dynamic_slice_in_dim(y, i * batch_size, batch_size)
            vb = jax.lax.dynamic_slice_in_dim(valid, i * batch_size, batch_size)
            logits = model.apply({"params": params}, xb)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            loss = jnp.sum(jnp.where(vb, losses, 0.0))
            correct = jnp.sum((jnp.argmax(logits, -1) == yb) & vb, dtype=jnp.int32)
            return acc[0] + loss, acc[1] + correct

        loss, correct = jax.lax.fori_loop(
            0, n_chunks, body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)))
        return {f"{prefix}_loss": loss / n,
                f"{prefix}_accuracy": correct.astype(jnp.float32) / n}

    return lambda params: evaluate(params, x, y, valid)


def make_sparsity_stats(algorithm: str):
    """``(opt_state, params) -> {"sparsity", "itop_rate"}`` as device scalars (one jitted
    call). Sparsity is over all params (dense leaves count as active)."""
    if algorithm == "dense":
        return lambda opt_state, params: {"sparsity": jnp.zeros((), jnp.float32)}

    @jax.jit
    def stats(opt_state, params):
        masks = jaxsparse.get_masks(opt_state)
        out = {"sparsity": jaxsparse.metrics.global_sparsity(masks, params)}
        if jaxsparse.get_sparse_state(opt_state).ever_active is not None:
            out["itop_rate"] = jaxsparse.itop_rate(jaxsparse.get_ever_active(opt_state))
        # Effective width of every sparse layer (neurons with at least one active input).
        flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=jaxsparse.masks.is_none)
        for path, m in flat:
            if m is not None:
                name = jaxsparse.masks.path_to_str(path)
                out[f"active_neurons/{name}"] = jaxsparse.metrics.active_neurons(m)
        return out

    return stats


def _finish(values: dict) -> dict:
    """Host floats from fetched device values; train sums become mean loss / accuracy."""
    out = {}
    for k, v in values.items():
        if k == "sums":
            loss_sum, correct, count = (float(x) for x in v)
            out["train_loss"] = loss_sum / max(count, 1)
            out["train_accuracy"] = correct / max(count, 1)
        else:
            out[k] = float(v)
    return out


def final_masks(opt_state, params, algorithm: str):
    if algorithm == "dense":
        return jaxsparse.ones_masks(params)
    return jaxsparse.get_masks(opt_state)


def machine_description() -> str:
    dev = jax.devices()[0]
    return (f"{platform.machine()} {platform.processor() or platform.system()}, "
            f"{os.cpu_count()} cores, jax {jax.__version__} {dev.platform} "
            f"({getattr(dev, 'device_kind', '')})")


# ----------------------------------------------------------------------------- setup


class Setup(NamedTuple):
    model: Any
    tx: Any
    state: TrainState
    total_steps: int
    steps_per_epoch: int


def total_steps_of(c, n_train: int) -> tuple[int, int]:
    steps_per_epoch = n_train // c.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {c.batch_size} exceeds the {n_train} training examples")
    total = c.num_steps if c.num_steps > 0 else c.epochs * steps_per_epoch
    if total < 1:
        raise ValueError("nothing to train: set epochs > 0 or num_steps > 0")
    return total, steps_per_epoch


def create_setup(c, ds: data_lib.Dataset) -> Setup:
    """Model, optimizer and initial state for config ``c`` on dataset ``ds``."""
    total, steps_per_epoch = total_steps_of(c, len(ds.x_train))
    model = models.create_model(c.model, ds.num_classes)
    k_init, k_tx, k_rng = jax.random.split(jax.random.key(c.seed), 3)
    params = models.init_params(model, ds.image_shape, k_init)
    tx = make_optimizer(c, total, k_tx)
    opt_state = tx.init(params)
    if c.algorithm != "dense":
        masks = jaxsparse.get_masks(opt_state)
        if c.sparse_init:
            params = jaxsparse.sparse_init(params, masks)
        else:
            params = jaxsparse.apply_masks(params, masks)
    state = TrainState(params, opt_state, jnp.zeros((), jnp.int32), k_rng)
    # Committed to one device like the step's outputs, so the step compiles once (jit's cache
    # tells committed and uncommitted inputs apart).
    state = jax.device_put(state, jax.devices()[0])
    return Setup(model, tx, state, total, steps_per_epoch)


def load_data(c) -> data_lib.Dataset:
    """The dataset of config ``c``, with its validation split (``c.validation_size``)."""
    return data_lib.load_dataset(c.dataset, c.data_dir or None,
                                 validation_size=c.get("validation_size", 0),
                                 validation_seed=c.get("validation_seed", 0))


def _meta(c, position, step) -> dict:
    return {
        "data_position": [int(position[0]), int(position[1])],
        "step": int(step),
        "model": json.dumps(c.model.to_dict(), sort_keys=True, default=list),
        "algorithm": c.algorithm,
        "dataset": c.dataset,
    }


def restore_state(c, workdir: str | os.PathLike, ds: data_lib.Dataset | None = None,
                  step: int | None = None) -> tuple[TrainState, dict]:
    """The checkpointed state of a run in ``workdir`` (default: its newest intact step)."""
    ds = load_data(c) if ds is None else ds
    setup = create_setup(c, ds)
    ckpt = Checkpointer(Path(workdir) / "checkpoints", async_save=False)
    try:
        return ckpt.restore(setup.state, step)
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- outputs


class JsonlWriter:
    """Appends each record as one JSON line; with ``tensorboard=True`` and ``tensorboardX``
    installed, also writes every numeric field as a scalar ``<event>/<field>`` at its step
    (event files next to ``metrics.jsonl``)."""

    _SKIP = ("step", "epoch", "time")

    def __init__(self, path: Path | None, tensorboard: bool = False):
        self._f = open(path, "a") if path is not None else None  # noqa: SIM115
        self._tb = None
        if path is not None and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("tensorboard=True but tensorboardX is not installed "
                      "(pip install tensorboardX); writing metrics.jsonl only", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(Path(path).parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k not in self._SKIP and isinstance(v, (int, float)) and \
                        not isinstance(v, bool):
                    self._tb.add_scalar(f"{record.get('event', 'metrics')}/{k}", v,
                                        global_step=int(record["step"]))
            self._tb.flush()  # like the JSONL: nothing lost if the process is killed

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


# ----------------------------------------------------------------------------- resume

# Fields that do not change what a run computes: ignored when a run is resumed.
BOOKKEEPING_FIELDS = frozenset({
    "data_dir", "progress", "print_table", "tensorboard", "log_every", "checkpoint_every",
    "max_to_keep", "eval_batch_size",
    # How the steps are scheduled, not what they compute (runs started before it existed
    # resume with it).
    "host_topology",
})
# Fields a resumed run may change when the caller says so (``allow_changes``): they extend
# or shorten the run without making its past steps wrong for it.
RESUMABLE_CHANGES = frozenset({"epochs", "num_steps", "eval_every_epochs"})


class ConfigChangedError(ValueError):
    """``--resume`` with a config that differs from the one the run was started with."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: dict, current: dict) -> dict:
    """``key -> (saved value, current value)`` for every differing non-bookkeeping field."""
    a = _flatten(json.loads(json.dumps(saved, default=list)))
    b = _flatten(json.loads(json.dumps(current, default=list)))
    keys = sorted((set(a) | set(b)) - BOOKKEEPING_FIELDS)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in keys
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


def check_resume_config(saved: dict, c, where: str, allow_changes=()) -> None:
    """Raises :class:`ConfigChangedError` listing the fields that differ from ``saved``.

    Bookkeeping fields (:data:`BOOKKEEPING_FIELDS`) may always change; the fields named in
    ``allow_changes`` (only those in :data:`RESUMABLE_CHANGES`, e.g. more ``epochs``) may
    change when the caller allows them.
    """
    bad_allow = sorted(set(allow_changes) - RESUMABLE_CHANGES)
    if bad_allow:
        raise ValueError(f"allow_changes={bad_allow} cannot change on resume; only "
                         f"{sorted(RESUMABLE_CHANGES)} can")
    changes = config_changes(saved, c.to_dict())
    refused = {k: v for k, v in changes.items() if k not in set(allow_changes)}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        hint = ""
        if set(refused) <= RESUMABLE_CHANGES:
            hint = f" Pass --allow_changes={','.join(refused)} to resume with the new value."
        raise ConfigChangedError(
            f"{where} was started with another config; differing keys: {listed}. Resume with "
            f"the run's own config or use a fresh workdir.{hint}")


class Run(NamedTuple):
    """An opened run: the state to continue from and where its outputs go."""

    state: TrainState
    position: data_lib.Position
    ckpt: Checkpointer | None
    log: JsonlWriter


def open_run(c, setup: Setup, workdir, resume: bool, allow_changes=()) -> Run:
    """Prepares ``workdir`` (or nothing when ``None``) and restores the newest intact
    checkpoint when resuming; refuses existing checkpoints without ``resume`` and a changed
    config with it (:func:`check_resume_config`)."""
    state, position = setup.state, data_lib.Position(0, 0)
    if workdir is None:
        return Run(state, position, None, JsonlWriter(None))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=c.max_to_keep)
    latest = ckpt.latest_step()
    try:
        if latest is not None and not resume:
            raise FileExistsError(
                f"{workdir} already holds checkpoints (latest step {latest}); pass --resume "
                "to continue that run or use a fresh --workdir")
        if latest is not None:
            config_file = workdir / "config.json"
            if config_file.exists():
                saved = _read_config(config_file)
                check_resume_config(saved, c, str(config_file), allow_changes)
            state, meta = ckpt.restore(state)
            position = data_lib.Position(*meta["data_position"])
            print(f"resumed from step {int(state.step)} (epoch {position.epoch}, batch "
                  f"{position.index})", file=sys.stderr)
        elif resume:
            print(f"no checkpoint in {workdir}; starting from scratch", file=sys.stderr)
    except BaseException:
        ckpt.close()
        raise
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    return Run(state, position, ckpt, JsonlWriter(workdir / "metrics.jsonl",
                                                   tensorboard=c.tensorboard))


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigChangedError(f"{path} is not valid JSON ({e}); cannot check that the "
                                 "resumed run uses its own config") from e


# ----------------------------------------------------------------------------- evaluation


def make_evaluation(c, setup: Setup, ds: data_lib.Dataset):
    """``(state, final) -> {metric: device scalar}``: validation metrics (``val_*``) when
    ``ds`` has a validation split, the test metrics (``test_*``) only at the final
    evaluation (or at every evaluation without a validation split), plus sparsity stats."""
    stats = make_sparsity_stats(c.algorithm)
    test = make_eval(setup.model, ds.x_test, ds.y_test, c.eval_batch_size)
    val = None
    if ds.x_val is not None:
        val = make_eval(setup.model, ds.x_val, ds.y_val, c.eval_batch_size, prefix="val")

    def evaluate(state: TrainState, final: bool) -> dict:
        out = {}
        if val is not None:
            out.update(val(state.params))
        if val is None or final:
            out.update(test(state.params))
        return {**out, **stats(state.opt_state, state.params)}

    return evaluate


# ----------------------------------------------------------------------------- logging


class Logger:
    """Queues records with device values and writes them at the next :meth:`flush`, so
    logging never stalls the device queue (the values are long computed by then)."""

    def __init__(self, log: JsonlWriter, pbar, t_start: float):
        self._log, self._pbar, self._t_start = log, pbar, t_start
        self._pending: list[tuple[dict, dict]] = []
        self.latest: dict[str, dict] = {}

    def queue(self, event: str, step: int, epoch: int, values: dict) -> None:
        host = {"event": event, "step": step, "epoch": epoch,
                "time": time.perf_counter() - self._t_start}
        self._pending.append((host, values))

    def flush(self) -> None:
        for host, dev in self._pending:
            record = {**host, **_finish(jax.device_get(dev))}
            self._log.write(record)
            self.latest[record["event"]] = record
        self._pending.clear()
        if "train" in self.latest:
            r = self.latest["train"]
            self._pbar.set_postfix(loss=f"{r['train_loss']:.3f}",
                                   acc=f"{r['train_accuracy']:.3f}",
                                   sparsity=f"{r['sparsity']:.3f}", refresh=False)


# ----------------------------------------------------------------------------- loop


class LoopResult(NamedTuple):
    state: TrainState
    step: int
    first_step_time: float | None  # the first call of each step kind (its compilation)
    loop_time: float  # the other steps
    loop_steps: int


def run_loop(c, setup: Setup, run: Run, it: data_lib.BatchIterator, evaluate, logger: Logger,
             pbar) -> LoopResult:
    """Trains from ``run.state`` to ``setup.total_steps``: one jitted step per iteration,
    host syncs only at log points, evaluations at epoch ends, periodic checkpoints."""
    step_for = step_chooser(c, setup.model, setup.tx, c.batch_size)
    state, total = run.state, setup.total_steps
    start_step = step = int(state.step)
    zeros = zero_sums()
    sums, since_log = zeros, 0
    # ConfigDict attribute access costs microseconds: read the loop's settings once.
    log_every, ckpt_every, eval_every = c.log_every, c.checkpoint_every, c.eval_every_epochs
    stats_fn = make_sparsity_stats(c.algorithm)
    t_loop = time.perf_counter()
    first_step_time, compiled = None, set()
    while step < total:
        perm, start = it.next_indices()
        step_fn = step_for(step)
        fresh = step_fn not in compiled
        if fresh and compiled:
            # A second step kind (host_topology's update step) compiles at its first call:
            # that call is timed apart, not in the loop.
            jax.block_until_ready(state)
            t_fresh = time.perf_counter()
        state, sums = step_fn(state, sums, it.x, it.y, perm, start)
        step += 1
        since_log += 1
        if step == start_step + 1:
            # The first step includes compilation: time the loop from after it.
            jax.block_until_ready(state)
            first_step_time = time.perf_counter() - t_loop
            t_loop = time.perf_counter()
        elif fresh:
            jax.block_until_ready(state)
            first_step_time += time.perf_counter() - t_fresh
            t_loop += time.perf_counter() - t_fresh
        compiled.add(step_fn)
        if (eval_every > 0 and it.position.index == 0 and it.position.epoch % eval_every == 0
                and step < total):
            logger.queue("eval", step, it.position.epoch, evaluate(state, final=False))
        if step % log_every == 0 or step == total:
            logger.flush()
            logger.queue("train", step, it.position.epoch,
                         {"sums": sums, **stats_fn(state.opt_state, state.params)})
            pbar.update(since_log)
            sums, since_log = zeros, 0
        if run.ckpt is not None and ckpt_every and step % ckpt_every == 0:
            run.ckpt.save(step, state, _meta(c, it.position, step))
    jax.block_until_ready(state)
    return LoopResult(state, step, first_step_time, time.perf_counter() - t_loop,
                      max(step - start_step - len(compiled), 0))


def train(c: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
          resume: bool = False, dataset: data_lib.Dataset | None = None,
          allow_changes=()) -> dict:
    """Trains per config ``c``; returns the final record (accuracy, sparsity, wall time...).

    Args:
      c: a config (see ``experiments/configs/base.py``).
      workdir: where metrics, checkpoints and config go; ``None`` keeps nothing on disk.
      resume: continue from the newest intact checkpoint in ``workdir`` (starts fresh if
        none); refused when ``c`` differs from the run's ``config.json``
        (:class:`ConfigChangedError` listing the keys).
      dataset: an already loaded dataset (sweeps reuse one); default: load per ``c``.
      allow_changes: config fields a resumed run may change (see :data:`RESUMABLE_CHANGES`).
    """
    t_start = time.perf_counter()
    ds = load_data(c) if dataset is None else dataset
    setup = create_setup(c, ds)
    run = open_run(c, setup, workdir, resume, allow_changes)
    try:
        return _train_opened(c, ds, setup, run, t_start)
    finally:
        run.log.close()
        if run.ckpt is not None:
            run.ckpt.close()


def _train_opened(c, ds, setup: Setup, run: Run, t_start: float) -> dict:
    from tqdm.auto import tqdm

    it = data_lib.BatchIterator(ds.x_train, ds.y_train, c.batch_size, seed=c.seed,
                                position=run.position)
    evaluate = make_evaluation(c, setup, ds)
    start_step, total = int(run.state.step), setup.total_steps
    pbar = tqdm(total=total, initial=start_step, disable=not c.progress, dynamic_ncols=True,
                desc=f"{c.algorithm} {c.sparsity:g}" if c.algorithm != "dense" else "dense")
    logger = Logger(run.log, pbar, t_start)
    logger.queue("eval", start_step, it.position.epoch, evaluate(run.state, final=False))
    logger.flush()  # also compiles the evaluation before the loop
    out = run_loop(c, setup, run, it, evaluate, logger, pbar)
    if out.step > start_step or "test_accuracy" not in logger.latest["eval"]:
        logger.queue("eval", out.step, it.position.epoch, evaluate(out.state, final=True))
    logger.flush()
    pbar.close()
    if run.ckpt is not None and run.ckpt.latest_step() != out.step:
        run.ckpt.save(out.step, out.state, _meta(c, it.position, out.step))

    masks = final_masks(out.state.opt_state, out.state.params, c.algorithm)
    table = jaxsparse.format_table(jaxsparse.sparsity_table(masks, out.state.params))
    if c.print_table:
        print(table)
    final = {
        "event": "final", "algorithm": c.algorithm, "sparsity_target": c.sparsity,
        "distribution": c.distribution, "dataset": c.dataset, "model": c.model.name,
        "seed": c.seed, "steps": total, "steps_run": total - start_step,
        "validation_size": len(ds.x_val) if ds.x_val is not None else 0,
        **{k: v for k, v in logger.latest["eval"].items()
           if k not in ("event", "step", "epoch", "time")},
        "wall_time": time.perf_counter() - t_start, "first_step_time": out.first_step_time,
        "loop_time": out.loop_time, "loop_steps": out.loop_steps,
        "machine": machine_description(),
    }
    run.log.write(final)
    final["table"] = table
    final["state"] = out.state
    return final


# ----------------------------------------------------------------------------- CLI


def main(argv):
    from absl import flags, logging

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    cfg = flags.FLAGS.config
    result = train(cfg, flags.FLAGS.workdir or None, resume=flags.FLAGS.resume,
                   allow_changes=[k for k in flags.FLAGS.allow_changes.split(",") if k])
    if "val_accuracy" in result:
        print(f"final validation accuracy {result['val_accuracy']:.4f}")
    print(f"final test accuracy {result['test_accuracy']:.4f}, sparsity "
          f"{result['sparsity']:.4f}, wall time {result['wall_time']:.1f}s")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "experiments/configs/base.py",
                                    "Path to a config file (get_config()).")
    flags.DEFINE_string("workdir", "", "Where metrics, checkpoints and config are written.")
    flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
    flags.DEFINE_string("allow_changes", "", "Comma list of config fields a --resume may "
                        "change (epochs, num_steps, eval_every_epochs).")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
