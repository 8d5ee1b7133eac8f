"""Sharded training of the byte-level transformer LM with any jaxsparse algorithm.

  python -m experiments.lm.trainer --config=experiments/configs/lm_base.py --workdir=/tmp/lm
  python -m experiments.lm.trainer --config=experiments/configs/lm_tiny.py \
      --config.algorithm=srigl --config.sparsity=0.9 --workdir=/tmp/lm

A small loop of its own (the image harness ``experiments/train.py`` feeds labelled examples
from the host; here batches are cut from the corpus on the device and everything is laid
out on a ``(data, model)`` mesh). It reuses the harness's optimizer factory
(``experiments.train.make_optimizer``), so every algorithm and schedule there works here.

Layout: params are sharded by the model's logical axis names and the config's rules
(:func:`jaxsparse.sharding.logical_shardings`); every param-shaped leaf of the optimizer
state (moments, masks, ``ever_active``, SNFS momentum) gets its param's sharding
(:func:`jaxsparse.sharding.state_shardings`); the batch is split over ``data`` and the
gradients are pinned to their params' shardings. One jitted step (batch cut, forward,
backward, sparse update) with fixed in/out shardings and donated state. The same program runs in one process or many (``jax.distributed``; see
``experiments/lm/launch.py``): only process 0 prints and writes files, checkpoints are
written by all (Orbax, sharded).

Outputs in the workdir: ``metrics.jsonl`` (train loss, tokens/s, validation loss and
perplexity; the final record adds the test split's, evaluated once),
``checkpoints/<step>/`` (:mod:`jaxsparse.checkpoint`, masks bit-packed).
"""

from __future__ import annotations

import collections
import json
import math
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse
from experiments import steps as steps_lib
from experiments.lm import data as data_lib
from experiments.lm import model as model_lib
from jaxsparse import sharding as sharding_lib


class LMState(NamedTuple):
    """Everything a run needs to continue (one checkpointed pytree)."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32[]


class LMSetup(NamedTuple):
    """A run's static parts: model, mesh, optimizer, shardings, data keys."""

    config: ml_collections.ConfigDict
    model: model_lib.TransformerLM
    mesh: jax.sharding.Mesh
    rules: tuple
    tx: optax.GradientTransformation
    state_shardings: LMState
    replicated: NamedSharding
    data_key: jax.Array


def lm_loss(model, params, tokens) -> jax.Array:
    """Mean next-byte cross-entropy (nats) of ``tokens int32[B, T + 1]``."""
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()


def make_setup(c: ml_collections.ConfigDict, devices=None) -> LMSetup:
    """Model, mesh, optimizer and the shardings of the whole state for config ``c``.

    Raises:
      ValueError: a condensed MLP (``model.mlp``); from
        :func:`jaxsparse.sharding.make_mesh` (mesh vs devices) or
        :func:`jaxsparse.sharding.check_divisible` (a mesh axis that does not divide a
        param, naming the leaf); or when ``batch_size`` does not divide over ``data``.
    """
    from experiments.train import make_optimizer  # the image harness's optimizer factory

    model = model_lib.make_model(c.model)
    if model.mlp != "dense":
        raise ValueError(f"model.mlp={model.mlp!r}: this trainer shards dense params only; "
                         "the condensed MLP trains with experiments.condensed_training_lm "
                         "(one device)")
    mesh = sharding_lib.make_mesh(c.mesh_shape, c.mesh_axes, devices)
    rules = tuple(tuple(r) for r in c.logical_axis_rules)
    data_axis = dict(rules).get("batch")
    n_data = mesh.shape[data_axis] if data_axis else 1
    if c.batch_size % n_data:
        raise ValueError(f"batch_size={c.batch_size} is not divisible by the {n_data} "
                         f"devices of mesh axis {data_axis!r}")
    k_init, k_tx, k_data = jax.random.split(jax.random.key(c.seed), 3)
    abstract_params = jax.eval_shape(
        lambda k: model_lib.init_params(model, k), k_init)
    param_shardings = sharding_lib.logical_shardings(
        model_lib.logical_axes(model), mesh, rules, shapes=abstract_params)
    tx = make_optimizer(c, int(c.num_steps), k_tx)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = sharding_lib.state_shardings(
        abstract_opt, abstract_params, param_shardings, replicated)
    shardings = LMState(param_shardings, opt_shardings, replicated)
    return LMSetup(c, model, mesh, rules, tx, shardings, replicated, k_data)


def init_state(setup: LMSetup) -> LMState:
    """The initial state, created in place on the mesh (params masked by the initial
    masks)."""
    k_init = jax.random.split(jax.random.key(setup.config.seed), 3)[0]
    return jax.jit(init_state_fn(setup), out_shardings=setup.state_shardings)(k_init)


def init_state_fn(setup: LMSetup):
    """``key -> LMState``: the (unjitted) initial state."""
    c = setup.config

    def init(key):
        params = nn.unbox(model_lib._init_boxed(setup.model, key))
        opt_state = setup.tx.init(params)
        if c.algorithm != "dense":
            params = jaxsparse.apply_masks(params, jaxsparse.get_masks(opt_state))
        return LMState(params, opt_state, jnp.zeros((), jnp.int32))

    return init


def make_train_step(setup: LMSetup, topology_update: bool | None = None):
    """``(state, data) -> (state, loss)``: one jitted step on the mesh; ``data`` is the
    corpus (``uint8[n]``, replicated). ``topology_update``: ``None`` decides in the step
    whether the topology changes; a bool compiles a step of that kind only (host-scheduled,
    ``jaxsparse.topology_due``; see :func:`step_chooser`)."""
    c, model, tx = setup.config, setup.model, setup.tx
    kind = {} if topology_update is None else {"topology_update": topology_update}
    batch_sharding = NamedSharding(setup.mesh, P(dict(setup.rules).get("batch"), None))
    param_shardings = setup.state_shardings.params

    def step(state: LMState, data):
        tokens = data_lib.get_batch(data, setup.data_key, state.step, c.batch_size,
                                    c.model.seq_len)
        tokens = jax.lax.with_sharding_constraint(tokens, batch_sharding)
        with nn.logical_axis_rules(setup.rules):
            loss, grads = jax.value_and_grad(lambda p: lm_loss(model, p, tokens))(state.params)
        # Gradients laid out like their params. The topology update maps one function over
        # all layers of a shape (jaxsparse.layermap), so XLA gives those layers one sharding
        # there; unpinned, that sharding flowed back into the gradients and the backward
        # pass (all-gathers of activations and dense leaves in every step).
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **kind)
        params = optax.apply_updates(state.params, updates)
        return LMState(params, opt_state, state.step + 1), loss

    return jax.jit(step, out_shardings=(setup.state_shardings, setup.replicated),
                   donate_argnums=(0,))


def step_chooser(setup: LMSetup):
    """``t -> step``: one train step for every ``t``, or with ``config.host_topology`` a
    plain and an update step picked on the host (:func:`experiments.steps.step_chooser`)."""
    return steps_lib.step_chooser(
        setup.tx, lambda kind: make_train_step(setup, kind),
        host=setup.config.get("host_topology", False), algorithm=setup.config.algorithm)


def make_eval(setup: LMSetup, windows: np.ndarray, batch_size: int):
    """``params -> mean validation loss`` (nats/byte) over ``windows`` (the first
    multiple of ``batch_size`` of them), one jitted pass."""
    n = (len(windows) // batch_size) * batch_size
    if n == 0:
        raise ValueError(f"{len(windows)} validation windows < eval batch {batch_size}")
    win = windows[:n].reshape(n // batch_size, batch_size, -1)
    sharding = NamedSharding(setup.mesh, P(None, dict(setup.rules).get("batch"), None))
    win = jax.make_array_from_callback(win.shape, sharding, lambda idx: win[idx])

    def evaluate(params, win):
        with nn.logical_axis_rules(setup.rules):
            losses = jax.lax.map(lambda t: lm_loss(setup.model, params, t), win)
        return losses.mean()

    fn = jax.jit(evaluate, out_shardings=setup.replicated)
    return lambda params: fn(params, win)


def replicated_array(x: np.ndarray, setup: LMSetup) -> jax.Array:
    """A host array as a global array replicated over the mesh (any process count)."""
    return jax.make_array_from_callback(x.shape, setup.replicated, lambda idx: x[idx])


def _write(path: epath.Path | None, record: dict) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def abstract_state(setup: LMSetup) -> LMState:
    """The state's shapes, dtypes and shardings on ``setup``'s mesh (a restore target)."""
    k_init = jax.random.split(jax.random.key(setup.config.seed), 3)[0]
    shapes = jax.eval_shape(lambda: init_state_fn(setup)(k_init))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, setup.state_shardings)


def restore_state(setup: LMSetup, directory, step: int | None = None,
                  allow_reshard: bool = True) -> LMState:
    """A checkpoint from ``directory`` (a run's ``checkpoints/``) laid out on ``setup``'s
    mesh, whatever mesh and process count wrote it (``allow_reshard=False`` refuses a
    different one, naming the manifest file)."""
    from jaxsparse.checkpoint import Checkpointer
    ck = Checkpointer(directory, max_to_keep=None)
    try:
        return ck.restore(abstract_state(setup), step, allow_reshard=allow_reshard)
    finally:
        ck.close()


def steps_ahead(c: ml_collections.ConfigDict) -> int:
    """How many dispatched steps the training loop lets run ahead of the host before it
    waits: ``c.steps_ahead``, or by platform when negative: 0 on CPU (simulated CPU devices
    with a queue of steps deadlocked in their collectives on 2 cores: every pool thread
    blocked in a rendezvous), 2 on GPU and TPU (the host prepares the next step while the
    devices run; it still waits at logging, evaluation and checkpoint steps)."""
    n = c.get("steps_ahead", -1)
    if n >= 0:
        return int(n)
    return 0 if jax.default_backend() == "cpu" else 2


def train(c: ml_collections.ConfigDict, workdir: str | None = None, devices=None,
          state: LMState | None = None, num_steps: int | None = None,
          resume: bool = False) -> tuple[LMState, dict]:
    """Trains config ``c``; returns the final state and the final record.

    Args:
      c: an LM config (``experiments/configs/lm_*.py``).
      workdir: where ``metrics.jsonl`` and checkpoints go (process 0 writes the JSONL);
        ``None`` writes nothing.
      devices: the devices of the mesh (default: all).
      state: continue from this state (e.g. a restored checkpoint) instead of a fresh one.
      num_steps: stop after this step (default ``c.num_steps``; the schedules still follow
        ``c.num_steps``).
      resume: continue from the newest checkpoint in ``workdir/checkpoints`` (written on
        any mesh / process count) when there is one.
    """
    setup = make_setup(c, devices)
    if resume and state is None and workdir is not None:
        from jaxsparse.checkpoint import Checkpointer
        ck = Checkpointer(epath.Path(workdir) / "checkpoints")
        has = ck.latest_step() is not None
        ck.close()
        if has:
            state = restore_state(setup, epath.Path(workdir) / "checkpoints")
    corpus = data_lib.load_corpus(c.corpus, c.data_dir or None,
                                  test_fraction=c.get("test_fraction", 0.0))
    data = replicated_array(corpus.train, setup)
    n_data = setup.mesh.shape[dict(setup.rules).get("batch")]
    # Evaluation batches: a multiple of the data-parallel devices, up to 4 windows each.
    eval_batch = lambda n: max(n_data, min(n, 4 * n_data))  # noqa: E731
    windows = data_lib.eval_windows(corpus.valid, c.model.seq_len, c.eval_windows)
    evaluate = make_eval(setup, windows, eval_batch(len(windows)))
    n_test = int(c.get("test_windows", 0)) if corpus.test.size else 0
    step_for = step_chooser(setup)
    state = init_state(setup) if state is None else state
    end = int(c.num_steps if num_steps is None else num_steps)
    lead = jax.process_index() == 0
    out = epath.Path(workdir) if workdir is not None else None
    if out is not None and lead:
        out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl" if out is not None and lead else None
    tokens_per_step = c.batch_size * c.model.seq_len
    bar = None
    if c.progress and lead:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=int(state.step), unit="step", dynamic_ncols=True)
    ckpt = None
    if out is not None and c.checkpoint_every >= 0:
        from jaxsparse.checkpoint import Checkpointer
        ckpt = Checkpointer(out / "checkpoints", max_to_keep=c.max_to_keep)
    t = int(state.step)
    t_log, s_log, first = time.perf_counter(), t, None
    t0 = time.perf_counter()
    record: dict = {}
    loss = None
    ahead = steps_ahead(c)
    pending: collections.deque = collections.deque()
    compiled = set()
    while t < end:
        step_fn = step_for(t)
        fresh = step_fn not in compiled and first is not None
        if fresh:
            # A second step kind (host_topology's update step) compiles at its first call:
            # that call counts with the first step, not in the tokens/s of its interval.
            jax.block_until_ready(state)
            t_fresh = time.perf_counter()
        state, loss = step_fn(state, data)
        compiled.add(step_fn)
        t += 1  # the host's count: reading state.step would wait for the step
        pending.append(loss)
        while len(pending) > ahead:
            jax.block_until_ready(pending.popleft())
        if first is None:
            jax.block_until_ready(loss)
            first = time.perf_counter() - t0
            t_log, s_log = time.perf_counter(), t
        elif fresh:
            jax.block_until_ready(loss)
            spent = time.perf_counter() - t_fresh
            first += spent
            t_log, s_log = t_log + spent, s_log + 1
        if t % c.log_every == 0 or t == end:
            loss_v = float(loss)
            now = time.perf_counter()
            tps = tokens_per_step * (t - s_log) / max(now - t_log, 1e-9)
            t_log, s_log = now, t
            record = {"event": "train", "step": t, "train_loss": loss_v, "tokens_per_s": tps}
            _write(metrics, record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tps:,.0f}")
        if (c.eval_every and t % c.eval_every == 0) or t == end:
            v = float(evaluate(state.params))
            _write(metrics, {"event": "eval", "step": t, "valid_loss": v,
                             "valid_perplexity": math.exp(v)})
            record.update(valid_loss=v, valid_perplexity=math.exp(v))
        if ckpt is not None and ((c.checkpoint_every > 0 and t % c.checkpoint_every == 0)
                                 or t == end):
            ckpt.save(t, state, setup.state_shardings)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if ckpt is not None:
        ckpt.close()
    final = {"event": "final", "steps": int(state.step), "first_step_time": first,
             "wall_time": time.perf_counter() - t0, **{k: v for k, v in record.items()
                                                       if k not in ("event", "step")}}
    if n_test:  # once, after training: the number to report for a setting chosen on valid
        test = data_lib.eval_windows(corpus.test, c.model.seq_len, n_test)
        b = eval_batch(len(test))
        v = float(make_eval(setup, test, b)(state.params))
        final.update(test_loss=v, test_perplexity=math.exp(v), test_windows=len(test) // b * b)
    if c.algorithm != "dense":
        masks = jaxsparse.get_masks(state.opt_state)
        active = sum(int(np.asarray(jax.device_get(_count(m)))) for m in jax.tree.leaves(masks))
        total = sum(int(m.size) for m in jax.tree.leaves(masks))
        final["sparsity"] = 1.0 - active / max(total, 1)
    _write(metrics, final)
    return state, final


@jax.jit
def _count(m):
    return jnp.sum(m, dtype=jnp.int32)


def main(argv):
    del argv
    from absl import flags, logging
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    c = flags.FLAGS.config
    if flags.FLAGS.coordinator:  # local processes (experiments/lm/launch.py), CPU devices
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes,
                                   flags.FLAGS.process_id)
    elif c.get("distributed", "") == "auto":  # TPU pod slice / cluster: found by JAX
        jax.distributed.initialize()
    _, final = train(c, flags.FLAGS.workdir, resume=flags.FLAGS.resume)
    if jax.process_index() == 0:
        print(json.dumps(final))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "LM config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "output folder")
    flags.DEFINE_string("coordinator", "", "host:port of jax.distributed's coordinator "
                        "(multi-process runs; see experiments/lm/launch.py)")
    flags.DEFINE_integer("num_processes", 1, "number of processes")
    flags.DEFINE_integer("process_id", 0, "this process's index")
    flags.DEFINE_bool("resume", False, "continue from the newest checkpoint in the workdir "
                      "(any mesh or process count wrote it)")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
