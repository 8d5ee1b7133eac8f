"""How the sparse optimizer step scales with model size and depth (issue 12's benchmark).

Models are stacks of transformer-MLP blocks, ``h + W_down gelu(W_up LN(h) + b_up) + b_down``
with a LayerNorm scale, so every block has two prunable kernels and three dense leaves:

* size series (``--sizes 1M,10M,50M,100M``): blocks of 768x3072 / 3072x768 kernels, the
  number of blocks scaled to the size (10M: 2 blocks, 50M: 11, 100M: 21); sizes below two
  such blocks keep 2 blocks and scale the width ``d`` (``d x 4d`` kernels; 1M: d = 256);
* depth series (``--depths 2,8,32,96``): that many 256x256 kernel leaves (``depth / 2``
  blocks), small, so that what grows is the number of layers (and the compile time).

For every model, inner optimizer (``sgdm``: SGD with momentum 0.9, ``adam``) and algorithm
(``jaxsparse.static/rigl/srigl/snfs/magnitude_pruning`` at 90% sparsity, ERK, one topology
update every ``--update-every`` steps) it measures, in one process with dense and sparse
repetitions alternating:

* optimizer-only step (synthetic gradients; jitted ``tx.update`` + ``optax.apply_updates``,
  params and state donated): sparse / dense time for a plain step and for an update step.
  Each measured call is pinned to one kind by the step counter it gets: the jitted step
  takes the counter as an argument and writes it into the ``SparseState`` before
  ``tx.update`` (so one compiled step serves both kinds; the setup checks that the
  "update" counter changes the masks and the "plain" one does not);
* full step (forward + backward of the stack on a ``--batch`` of random rows, then the
  optimizer): the same two ratios;
* "host plain": the plain step scheduled on the host (``tx.update(...,
  topology_update=False)``, see ``jaxsparse.topology_due``), compiled without the update's
  ``lax.cond``, against the same dense step (algorithms with topology updates);
* update step ms per million parameters (of the whole model);
* compile seconds, dense -> sparse (``jax.jit(f).lower(...).compile()``, timed), of the
  step and of ``tx.init`` (which draws the initial masks);
* state bytes per prunable weight: bytes of the sparse optimizer state minus those of the
  inner optimizer's state, over the number of prunable weights;
* XLA temp memory of the optimizer step (``compiled.memory_analysis()``), dense -> sparse,
  and the sparse step's extra temp memory in bytes per parameter of the largest layer and
  of the whole model;
* fresh pages per call (minor page faults x page size), dense and plain: XLA:CPU allocates
  a program's temporaries on every call, and under glibc's malloc the blocks above its mmap
  threshold are new mappings whose pages the kernel faults in and zeroes each time. A full
  sparse step keeps every gradient alive until the topology ``lax.cond`` (its update branch
  reads them all), so it touches more fresh temporaries than the dense step, whose gradients
  die one by one. Run under an allocator that keeps freed pages (``LD_PRELOAD=...
  libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``) to measure the steps
  without that cost; the header names the allocator.

``--selection sorting`` traces every selection with the sorting reference, the path GPUs and
TPUs take (``jaxsparse.topology.COUNTING_PLATFORMS``), compiled for this CPU: its memory and
compile time as XLA:CPU lays the program out (a GPU's or TPU's compiler lays it out its own
way; its times here mean nothing for an accelerator).

Ratios are given as ratio of medians and ratio of minima over ``--repeats`` repetitions.
``--no-timing`` compiles and reports only what does not depend on the machine's load
(compile seconds aside): state bytes and XLA temp memory, with every time column ``-``.

Usage:
  python -m experiments.benchmarks.scaling [--sizes 1M,10M] [--depths 2,8,32,96] \
      [--algorithms rigl,srigl] [--inner sgdm,adam] [--repeats 7] [--json out.json] \
      [--plot out.png]
  python -m experiments.benchmarks.scaling --sizes 100M --depths '' --no-timing  # memory
  python -m experiments.benchmarks.scaling --selection sorting --no-timing  # GPU/TPU path
  python -m experiments.benchmarks.scaling --quick      # smoke run at a tiny size
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse
from experiments.benchmarks import _timing
from jaxsparse import topology

ALGORITHMS = {
    "static": "static",
    "rigl": "rigl",
    "srigl": "srigl",
    "snfs": "snfs",
    "magnitude": "magnitude_pruning",
    "magnitude-global": "magnitude_pruning",  # ranking="global": one ranking over the layers
    "set": "set",
    "random": "random_pruning",
}
# Keywords of an algorithm beyond the shared ones.
ALGORITHM_KWARGS = {"magnitude-global": {"ranking": "global"}}
INNER = {
    "sgdm": lambda: optax.sgd(1e-3, momentum=0.9),
    "adam": lambda: optax.adam(1e-4),
}
WIDE = (768, 3072)  # d_model, d_ff of the size series' blocks
DEPTH_WIDTH = 256  # the depth series' square kernels
QUICK = dict(sizes="20K", depths="2", algorithms="static,rigl", inner="sgdm", repeats=2,
             batch=8, target_ms=2.0)
DEFAULTS = dict(sizes="1M,10M,50M,100M", depths="2,8,32,96",
                algorithms="static,rigl,srigl,snfs,magnitude", inner="sgdm,adam", repeats=7,
                batch=32, target_ms=50.0)

OPT_COLUMNS = ("model", "params", "kernels", "algorithm", "inner", "dense ms",
               "plain/dense med", "plain/dense min", "plain/dense CPU",
               "host plain/dense med", "host plain/dense CPU",
               "update/dense med", "update/dense min", "update/dense CPU",
               "update ms/M params", "compile s dense->sparse",
               "compile CPU s dense->sparse", "init compile s dense->sparse", "state B/weight",
               "temp MB dense->sparse", "extra temp B/param largest", "extra temp B/param model",
               "page faults MB/call dense / plain")
FULL_COLUMNS = ("model", "params", "kernels", "algorithm", "inner", "batch", "dense ms",
                "plain/dense med", "plain/dense min", "plain/dense CPU",
                "host plain/dense med", "host plain/dense CPU",
                "update/dense med", "update/dense min", "update/dense CPU",
                "compile s dense->sparse", "compile CPU s dense->sparse",
                "page faults MB/call dense / plain")


# ----------------------------------------------------------------------------- models


class StackSpec(NamedTuple):
    """A stack of ``blocks`` MLP blocks with ``d_model x d_ff`` and ``d_ff x d_model``
    kernels. ``series`` is ``"size"`` or ``"depth"``; ``label`` names the row."""

    label: str
    series: str
    d_model: int
    d_ff: int
    blocks: int

    @property
    def n_params(self) -> int:
        return self.blocks * (2 * self.d_model * self.d_ff + self.d_ff + 2 * self.d_model)

    @property
    def n_kernels(self) -> int:
        return 2 * self.blocks

    @property
    def largest_layer(self) -> int:
        return self.d_model * self.d_ff


def parse_count(text: str, name: str) -> int:
    """``"10M"`` -> 10_000_000 (suffixes K, M, G); errors name the option."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    t = text.strip().upper()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"{name}: cannot read {text!r} as a parameter count "
                         "(e.g. 10M, 500K)") from None
    if value < 1:
        raise ValueError(f"{name}: {text!r} must be a positive parameter count")
    return int(value)


def size_spec(text: str) -> StackSpec:
    """The size-series model closest to ``text`` parameters (see the module docstring)."""
    target = parse_count(text, "--sizes")
    d, ff = WIDE
    blocks = round(target / StackSpec("", "", d, ff, 1).n_params)
    if blocks < 2:
        blocks = 2
        d = max(32, 32 * round(math.sqrt(target / 16) / 32))
        ff = 4 * d
    return StackSpec(f"{text} ({blocks}x{d}x{ff})", "size", d, ff, blocks)


def depth_spec(text: str) -> StackSpec:
    """``depth`` kernel leaves of ``DEPTH_WIDTH x DEPTH_WIDTH`` (``depth / 2`` blocks)."""
    try:
        depth = int(text)
    except ValueError:
        raise ValueError(f"--depths: {text!r} is not a number of kernel leaves") from None
    if depth < 2 or depth % 2:
        raise ValueError(f"--depths: {depth} kernel leaves; need an even number >= 2 "
                         "(two kernels per block)")
    return StackSpec(f"depth {depth} ({DEPTH_WIDTH}x{DEPTH_WIDTH})", "depth", DEPTH_WIDTH,
                     DEPTH_WIDTH, depth // 2)


def init_params(spec: StackSpec, key: jax.Array) -> dict:
    """``{"block_00": {"norm": {"scale"}, "up": {"kernel", "bias"}, "down": ...}, ...}``."""
    params = {}
    for i, k in enumerate(jax.random.split(key, spec.blocks)):
        k_up, k_down = jax.random.split(k)
        params[f"block_{i:02d}"] = {
            "norm": {"scale": jnp.ones((spec.d_model,))},
            "up": {"kernel": jax.random.normal(k_up, (spec.d_model, spec.d_ff))
                   / math.sqrt(spec.d_model), "bias": jnp.zeros((spec.d_ff,))},
            "down": {"kernel": jax.random.normal(k_down, (spec.d_ff, spec.d_model))
                     / math.sqrt(spec.d_ff), "bias": jnp.zeros((spec.d_model,))},
        }
    return params


def forward(params: dict, x: jax.Array) -> jax.Array:
    """The residual stack of pre-LayerNorm MLP blocks on ``x: [batch, d_model]``."""
    h = x
    for name in sorted(params):
        block = params[name]
        mu = h.mean(-1, keepdims=True)
        var = jnp.square(h - mu).mean(-1, keepdims=True)
        z = (h - mu) * jax.lax.rsqrt(var + 1e-6) * block["norm"]["scale"][None, :]
        z = jax.nn.gelu(z @ block["up"]["kernel"] + block["up"]["bias"][None, :])
        h = h + z @ block["down"]["kernel"] + block["down"]["bias"][None, :]
    return h


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(forward(params, x) - y))


# ------------------------------------------------------------------------- optimizers


def make_sparse(name: str, inner: optax.GradientTransformation, sparsity: float,
                update_every: int, key: jax.Array) -> optax.GradientTransformation:
    """The public factory ``jaxsparse.<name>`` at ``sparsity`` with ERK, updates every
    ``update_every`` steps until ``100 * update_every``. Keyword names the factory does not
    take are left out (``frequency`` is the older name of ``update_every``)."""
    if name not in ALGORITHMS:
        raise ValueError(f"--algorithms: unknown algorithm {name!r}; "
                         f"choose from {sorted(ALGORITHMS)}")
    factory = getattr(jaxsparse, ALGORITHMS[name])
    accepted = inspect.signature(factory).parameters
    wanted = {"key": key, "distribution": "erk", "end_step": 100 * update_every,
              "update_every": update_every, **ALGORITHM_KWARGS.get(name, {})}
    if "update_every" not in accepted:
        wanted["frequency"] = update_every
    return factory(inner, sparsity, **{k: v for k, v in wanted.items() if k in accepted})


def _is_sparse_state(node) -> bool:
    fields = getattr(node, "_fields", ())
    return "masks" in fields and "count" in fields


def pin_count(state: Any, count: jax.Array) -> Any:
    """``state`` with the step counter of every sparse state inside it set to ``count``."""
    return jax.tree.map(
        lambda n: n._replace(count=count.astype(n.count.dtype)) if _is_sparse_state(n) else n,
        state, is_leaf=_is_sparse_state)


def _update_kwargs(topology_update: bool | None) -> dict:
    # Host-scheduled steps pass the flag; the dense optimizer takes no such argument.
    return {} if topology_update is None else {"topology_update": topology_update}


def opt_step(tx: optax.GradientTransformation, topology_update: bool | None = None
             ) -> Callable:
    """``(params, state, grads, count) -> (params, state)``: the optimizer alone
    (``topology_update``: a host-scheduled sparse step, see ``jaxsparse.topology_due``)."""

    def step(params, state, grads, count):
        updates, state = tx.update(grads, pin_count(state, count), params,
                                   **_update_kwargs(topology_update))
        return optax.apply_updates(params, updates), state

    return step


def full_step(tx: optax.GradientTransformation, topology_update: bool | None = None
              ) -> Callable:
    """``(params, state, x, y, count) -> (params, state)``: forward, backward, optimizer."""

    def step(params, state, x, y, count):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, pin_count(state, count), params,
                                   **_update_kwargs(topology_update))
        return optax.apply_updates(params, updates), state

    return step


class Runner:
    """One optimizer's params and state, advanced by compiled steps that donate them."""

    def __init__(self, tx: optax.GradientTransformation, params: dict, sparse: bool):
        params = jax.tree.map(jnp.copy, params)  # donated by every step
        self.state = jax.jit(tx.init)(params)
        if sparse:
            if not any(_is_sparse_state(n) for n in jax.tree.leaves(
                    self.state, is_leaf=_is_sparse_state)):
                raise ValueError("no sparse state (a NamedTuple with `masks` and `count`) in "
                                 f"the state of {tx!r}: cannot pin its step counter")
            params = jaxsparse.apply_masks(params, jaxsparse.get_masks(self.state))
        self.params = params

    def __call__(self, compiled, *args):
        self.params, self.state = compiled(self.params, self.state, *args)
        return self.params


def _host_masks(runner: Runner) -> list[np.ndarray]:
    return [np.asarray(m) for m in jax.tree.leaves(jaxsparse.get_masks(runner.state))]


def topology_changes(runner: Runner, compiled, args, count) -> bool:
    """Whether one call of ``compiled`` at step ``count`` changes the masks."""
    before = _host_masks(runner)
    jax.block_until_ready(runner(compiled, *args, count))
    return any(not np.array_equal(a, b) for a, b in zip(before, _host_masks(runner)))


# ------------------------------------------------------------------------ measurement


class Setup(NamedTuple):
    """What every algorithm of one (model, inner optimizer) pair is compared against."""

    spec: StackSpec
    inner: str
    params: dict
    grads: dict
    batch: tuple[jax.Array, jax.Array]
    dense: Runner
    dense_opt: Any
    dense_full: Any
    dense_compile: dict
    dense_compile_cpu: dict
    dense_temp: int
    dense_init_s: float


def make_setup(spec: StackSpec, inner: str, batch: int, parts: Sequence[str]) -> Setup:
    kp, kg, kx, ky = jax.random.split(jax.random.key(0), 4)
    params = init_params(spec, kp)
    leaves, treedef = jax.tree.flatten(params)
    grads = treedef.unflatten([1e-2 * jax.random.normal(k, x.shape) for k, x in
                               zip(jax.random.split(kg, len(leaves)), leaves)])
    xy = (jax.random.normal(kx, (batch, spec.d_model)),
          jax.random.normal(ky, (batch, spec.d_model)))
    tx = INNER[inner]()
    init_s = _timing.compile_timed(tx.init, params).wall_s
    dense = Runner(tx, params, sparse=False)
    count = jnp.zeros((), jnp.int32)
    d_opt = _timing.compile_timed(opt_step(tx), dense.params, dense.state, grads, count,
                                  donate_argnums=(0, 1))
    d_full = _timing.Compiled(None, 0.0, 0.0)
    if "full" in parts:
        d_full = _timing.compile_timed(full_step(tx), dense.params, dense.state, *xy, count,
                                       donate_argnums=(0, 1))
    return Setup(spec, inner, params, grads, xy, dense, d_opt.executable, d_full.executable,
                 {"opt": d_opt.wall_s, "full": d_full.wall_s},
                 {"opt": d_opt.cpu_s, "full": d_full.cpu_s},
                 _timing.memory_stats(d_opt.executable)["temp"], init_s)


def measure(setup: Setup, algorithm: str, *, sparsity: float, update_every: int,
            repeats: int, target_s: float, parts: Sequence[str],
            timing: bool = True) -> list[dict]:
    """The optimizer-only row (and the full-step row) of one algorithm; without
    ``timing``, the compiled steps are not timed (time columns ``None``)."""
    spec, dense = setup.spec, setup.dense
    tx = make_sparse(algorithm, INNER[setup.inner](), sparsity, update_every,
                     jax.random.key(1))
    # ``tx.init`` compiled under jit (it draws the initial masks), as a training job does.
    init_s = _timing.compile_timed(tx.init, setup.params).wall_s
    sparse = Runner(tx, setup.params, sparse=True)
    prunable = sum(m.size for m in jax.tree.leaves(jaxsparse.get_masks(sparse.state)))
    state_bytes = (_timing.tree_nbytes(sparse.state) - _timing.tree_nbytes(dense.state))
    at_update = jnp.asarray(update_every, jnp.int32)
    at_plain = jnp.asarray(update_every + 1, jnp.int32)
    rows = []
    common = dict(model=spec.label, series=spec.series, params=spec.n_params,
                  kernels=spec.n_kernels, largest_layer=spec.largest_layer,
                  algorithm=algorithm, inner=setup.inner)
    for part in parts:
        if part == "opt":
            args, d_compiled, make = (setup.grads,), setup.dense_opt, opt_step
        else:
            args, d_compiled, make = setup.batch, setup.dense_full, full_step
        compiled = _timing.compile_timed(make(tx), sparse.params, sparse.state, *args,
                                         at_plain, donate_argnums=(0, 1))
        s_compiled = compiled.executable
        if topology_changes(sparse, s_compiled, args, at_plain):
            raise RuntimeError(f"{algorithm}: a step pinned to count {update_every + 1} "
                               "changed the masks; the counter pinning does not work")
        has_update = topology_changes(sparse, s_compiled, args, at_update)
        variants = {
            "dense": lambda c=d_compiled, a=args: dense(c, *a, at_plain),
            "plain": lambda c=s_compiled, a=args: sparse(c, *a, at_plain),
        }
        if has_update:
            variants["update"] = lambda c=s_compiled, a=args: sparse(c, *a, at_update)
        if has_update and timing:
            # The plain step scheduled on the host: compiled without the update's cond.
            host = _timing.compile_timed(make(tx, False), sparse.params, sparse.state, *args,
                                         at_plain, donate_argnums=(0, 1)).executable
            variants["host"] = lambda c=host, a=args: sparse(c, *a, at_plain)
        timed = (_timed(variants, repeats, target_s) if timing
                 else dict.fromkeys(_TIME_FIELDS))
        row = dict(common, part=part, **timed,
                   compile_dense_s=setup.dense_compile[part], compile_sparse_s=compiled.wall_s,
                   compile_dense_cpu_s=setup.dense_compile_cpu[part],
                   compile_sparse_cpu_s=compiled.cpu_s,
                   compile_init_dense_s=setup.dense_init_s, compile_init_sparse_s=init_s,
                   repeats=repeats if timing else 0, load=_timing.load_average())
        if part == "opt":
            temp = _timing.memory_stats(s_compiled)["temp"]
            extra = temp - setup.dense_temp
            row.update(
                update_ms_per_mparam=(row["update_ms"] / (spec.n_params / 1e6)
                                      if row["update_ms"] is not None else None),
                prunable=int(prunable), state_bytes_per_weight=state_bytes / prunable,
                temp_dense_bytes=setup.dense_temp, temp_sparse_bytes=temp,
                extra_temp_per_param_largest=extra / spec.largest_layer,
                extra_temp_per_param_model=extra / spec.n_params)
        else:
            row["batch"] = int(setup.batch[0].shape[0])
        rows.append(row)
        del s_compiled
    return rows


_TIME_FIELDS = ("dense_ms", "plain_ms", "update_ms", "plain_ratio_median", "plain_ratio_best",
                "update_ratio_median", "update_ratio_best", "plain_cpu_ratio",
                "update_cpu_ratio", "host_ratio_median", "host_cpu_ratio", "calls", "times",
                "fault_mb_per_call")


def _timed(variants: dict, repeats: int, target_s: float) -> dict:
    """The time fields of a row: ``variants`` ("dense", "plain", maybe "update" and
    "host", the plain step scheduled on the host), each timed interleaved with dense in a
    rotation of its own, ``repeats`` repetitions of ~``target_s`` each; ``None`` for an
    absent variant (no topology update in this algorithm)."""
    # One warm call each, then enough calls per repetition to last ~target_s.
    n = {k: _timing.calls_for(_timing.mean_seconds(f, 1).wall, target_s)
         for k, f in variants.items()}
    n["plain"] = n["dense"]
    if "host" in n:
        n["host"] = n["dense"]
    # Each variant alternates with dense in a rotation of its own: a step with large
    # temporaries disturbs the calls after it (under glibc the heap is grown and faulted in
    # again), so in one rotation of all variants the host-scheduled plain step at 100M
    # looked 1.20x dense after the plain and update steps, and 1.03x beside dense alone.
    times: dict = {"wall": {}, "cpu": {}}
    for k in variants:
        if k == "dense":
            continue
        pair = _timing.interleaved({d: (variants[d], n[d]) for d in ("dense", k)}, repeats)
        for clock in ("wall", "cpu"):
            times[clock][k] = pair[clock][k]
            times[clock]["dense" if k == "plain" else f"dense ({k} rotation)"] = (
                pair[clock]["dense"])
    has_update = "update" in variants
    faults = {k: _timing.fault_mb_per_call(variants[k], 3) for k in ("dense", "plain")}
    wall = times["wall"]

    def against_dense(k, clock="wall"):
        t = times[clock]
        return _timing.ratio(t[k], t["dense" if k == "plain" else f"dense ({k} rotation)"])

    plain = against_dense("plain")
    update = against_dense("update") if has_update else None
    return dict(dense_ms=1e3 * float(np.median(wall["dense"])),
                plain_ms=1e3 * float(np.median(wall["plain"])),
                update_ms=1e3 * float(np.median(wall["update"])) if has_update else None,
                plain_ratio_median=plain.median, plain_ratio_best=plain.best,
                update_ratio_median=update.median if update else None,
                update_ratio_best=update.best if update else None,
                plain_cpu_ratio=against_dense("plain", "cpu").median,
                update_cpu_ratio=against_dense("update", "cpu").median if has_update else None,
                host_ratio_median=against_dense("host").median if "host" in wall else None,
                host_cpu_ratio=against_dense("host", "cpu").median if "host" in wall else None,
                calls=n, times=times, fault_mb_per_call=faults)


# ---------------------------------------------------------------------------- output


def _fmt(x, spec=".2f", suffix="") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10**5 else f"{n / 1e3:.1f}K"


def table(rows: Sequence[dict], part: str) -> str:
    """The markdown table of the ``part`` (``"opt"`` or ``"full"``) rows."""
    columns = OPT_COLUMNS if part == "opt" else FULL_COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r["part"] != part:
            continue
        cells = [r["model"], _params(r["params"]), str(r["kernels"]), r["algorithm"],
                 r["inner"]]
        if part == "full":
            cells.append(str(r["batch"]))
        cells += [_fmt(r["dense_ms"], ".3f"),
                  _fmt(r["plain_ratio_median"], ".2f", "x"),
                  _fmt(r["plain_ratio_best"], ".2f", "x"),
                  _fmt(r.get("plain_cpu_ratio"), ".2f", "x"),
                  _fmt(r.get("host_ratio_median"), ".2f", "x"),
                  _fmt(r.get("host_cpu_ratio"), ".2f", "x"),
                  _fmt(r["update_ratio_median"], ".1f", "x"),
                  _fmt(r["update_ratio_best"], ".1f", "x"),
                  _fmt(r.get("update_cpu_ratio"), ".1f", "x")]
        if part == "opt":
            cells.append(_fmt(r["update_ms_per_mparam"], ".2f"))
        cells.append(f"{r['compile_dense_s']:.2f} -> {r['compile_sparse_s']:.2f}")
        cpu = (r.get("compile_dense_cpu_s"), r.get("compile_sparse_cpu_s"))
        cells.append("-" if None in cpu else f"{cpu[0]:.2f} -> {cpu[1]:.2f}")
        if part == "opt":
            init = (r.get("compile_init_dense_s"), r.get("compile_init_sparse_s"))
            cells.append("-" if None in init else f"{init[0]:.2f} -> {init[1]:.2f}")
            cells += [f"{r['state_bytes_per_weight']:.2f}",
                      f"{r['temp_dense_bytes'] / 1e6:.1f} -> {r['temp_sparse_bytes'] / 1e6:.1f}",
                      f"{r['extra_temp_per_param_largest']:.1f}",
                      f"{r['extra_temp_per_param_model']:.2f}"]
        faults = r.get("fault_mb_per_call") or {}
        cells.append("-" if not faults else
                     f"{faults['dense']:.1f} / {faults['plain']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str) -> None:
    """Optimizer-step ratios and compile seconds against size and against depth.

    Uses CPU-time ratios and compile CPU seconds where every row of a series has them (they
    vary less on a shared machine), wall-clock medians otherwise; the axis labels say which.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (series, xkey, xlabel) in enumerate(
            [("size", "params", "parameters"), ("depth", "kernels", "kernel leaves")]):
        opt = [r for r in rows if r["series"] == series and r["part"] == "opt"]
        cpu = bool(opt) and all(r.get("plain_cpu_ratio") is not None for r in opt)
        plain_key, update_key = (("plain_cpu_ratio", "update_cpu_ratio") if cpu else
                                 ("plain_ratio_median", "update_ratio_median"))
        dense_key, sparse_key = (("compile_dense_cpu_s", "compile_sparse_cpu_s") if cpu else
                                 ("compile_dense_s", "compile_sparse_s"))
        clock = "CPU time" if cpu else "wall clock, median"
        for algo, inner in sorted({(r["algorithm"], r["inner"]) for r in opt}):
            rs = sorted((r for r in opt if (r["algorithm"], r["inner"]) == (algo, inner)),
                        key=lambda r: r[xkey])
            x = [r[xkey] for r in rs]
            line, = axes[0, col].plot(x, [r[plain_key] for r in rs], "o-",
                                      label=f"{algo}/{inner} plain")
            if any(r[update_key] for r in rs):
                axes[0, col].plot(x, [r[update_key] or np.nan for r in rs], "s--",
                                  color=line.get_color(), label=f"{algo}/{inner} update")
            axes[1, col].plot(x, [r[sparse_key] for r in rs], "o-",
                              color=line.get_color(), label=f"{algo}/{inner}")
        if opt:
            dense = sorted({(r[xkey], r[dense_key]) for r in opt})
            axes[1, col].plot([d[0] for d in dense], [d[1] for d in dense], "k.:",
                              label="dense")
        for row, ylabel in enumerate([f"optimizer step / dense ({clock})",
                                      f"compile s, optimizer step ({clock.split(',')[0]})"]):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        axes[0, col].set_title(f"{series} series")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help=f"parameter counts (default {DEFAULTS['sizes']}; "
                        "'' for none)")
    parser.add_argument("--depths", help=f"kernel leaves (default {DEFAULTS['depths']}; "
                        "'' for none)")
    parser.add_argument("--algorithms", help=f"default {DEFAULTS['algorithms']}")
    parser.add_argument("--inner", help=f"inner optimizers, of {sorted(INNER)} "
                        f"(default {DEFAULTS['inner']})")
    parser.add_argument("--repeats", type=int, help="timed repetitions per variant (7)")
    parser.add_argument("--batch", type=int, help="rows per full step (32)")
    parser.add_argument("--target-ms", type=float,
                        help="length of one timed repetition, ms (50)")
    parser.add_argument("--parts", default="opt,full",
                        help="opt (optimizer only), full (forward+backward+optimizer)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--update-every", type=int, default=1000)
    parser.add_argument("--no-timing", action="store_true",
                        help="compile and measure memory only: no timed calls")
    parser.add_argument("--selection", choices=("platform", "sorting"), default="platform",
                        help="platform: each selection as this machine runs it (counting "
                        "on CPU); sorting: the sorting reference everywhere, as GPUs and "
                        "TPUs run it (its memory and compile time, lowered for this CPU)")
    parser.add_argument("--json", help="write rows and run details to this file")
    parser.add_argument("--plot", help="write ratio and compile-time plots to this PNG")
    parser.add_argument("--load", help="comma-separated JSON records of earlier runs: print "
                        "their tables (and --plot) without measuring")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = parser.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    split = lambda s: [x for x in s.split(",") if x.strip()]  # noqa: E731
    args.sizes, args.depths = split(args.sizes), split(args.depths)
    args.algorithms, args.inner, args.parts = (split(args.algorithms), split(args.inner),
                                               split(args.parts))
    for name, values, allowed in [("--algorithms", args.algorithms, ALGORITHMS),
                                  ("--inner", args.inner, INNER),
                                  ("--parts", args.parts, ("opt", "full"))]:
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {sorted(allowed)}")
    if args.load:
        args.load = split(args.load)
        return args
    if "opt" not in args.parts:
        parser.error("--parts: must include opt (the full step is compared beside it)")
    if args.repeats < 1:
        parser.error(f"--repeats: {args.repeats}; need at least 1")
    try:
        args.specs = ([size_spec(s) for s in args.sizes]
                      + [depth_spec(d) for d in args.depths])
    except ValueError as e:
        parser.error(str(e))
    if not args.specs:
        parser.error("--sizes and --depths are both empty: nothing to measure")
    return args


def jaxsparse_revision() -> str:
    """``git describe --always --dirty`` of the checkout ``jaxsparse`` was imported from."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
            check=True, cwd=os.path.dirname(os.path.abspath(jaxsparse.__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"


def report(rows: Sequence[dict], plot_path: str | None) -> None:
    """Prints the optimizer-step and full-step tables of ``rows``; writes the plot."""
    print("\nOptimizer step only (synthetic gradients), sparse / dense:\n")
    print(table(rows, "opt"))
    if any(r["part"] == "full" for r in rows):
        print("\nFull step (forward + backward + optimizer), sparse / dense:\n")
        print(table(rows, "full"))
    if plot_path:
        plot(rows, plot_path)


def load_rows(paths: Sequence[str]) -> list[dict]:
    """The rows of earlier runs' JSON records, printing each run's header line."""
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                record = json.load(f)
            rows += record["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--load: cannot read a scaling record from {path}: {e}") from e
        print(f"{path}: {record.get('header', '')}")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.load:
        rows = load_rows(args.load)
        report(rows, args.plot)
        return rows
    header = (f"{_timing.machine_line()}; jaxsparse {jaxsparse_revision()}; "
              f"sparsity {args.sparsity} ERK, update every {args.update_every} steps, "
              f"selections: {args.selection}, "
              + ("no timing (compile and memory only)" if args.no_timing
                 else f"{args.repeats} repeats"))
    print(header, flush=True)
    with selections(args.selection):
        rows = _measure_all(args, header)
    report(rows, args.plot)
    print(f"\nload at the end: {_timing.load_average()}", flush=True)
    return rows


def selections(kind: str):
    """While in force, selections are traced as on this platform (``"platform"``) or with
    the sorting reference on every platform (``"sorting"``: what GPUs and TPUs run,
    ``jaxsparse.topology.COUNTING_PLATFORMS`` emptied)."""
    if kind == "platform":
        return contextlib.nullcontext()
    return mock.patch.object(topology, "COUNTING_PLATFORMS", ())


def _measure_all(args, header: str) -> list[dict]:
    rows = []
    for spec in args.specs:
        for inner in args.inner:
            setup = make_setup(spec, inner, args.batch, args.parts)
            for algorithm in args.algorithms:
                new = measure(setup, algorithm, sparsity=args.sparsity,
                              update_every=args.update_every, repeats=args.repeats,
                              target_s=args.target_ms / 1e3, parts=args.parts,
                              timing=not args.no_timing)
                for r in new:
                    r["selection"] = args.selection
                rows += new
                for r in new:
                    print(f"  {r['model']} {algorithm}/{inner} {r['part']}: plain "
                          f"{_fmt(r['plain_ratio_median'], '.2f', 'x')} (host "
                          f"{_fmt(r.get('host_ratio_median'), '.2f', 'x')}), update "
                          f"{_fmt(r['update_ratio_median'], '.1f', 'x')}, compile "
                          f"{r['compile_dense_s']:.2f} -> {r['compile_sparse_s']:.2f} s, "
                          f"load {r['load']}", file=sys.stderr, flush=True)
                if args.json:
                    _write_json(args, header, rows)
            del setup
    return rows


def _write_json(args, header, rows) -> None:
    # Output paths stay out of the record (they name this machine's directories).
    run = {k: v for k, v in vars(args).items() if k not in ("specs", "json", "plot")}
    with open(args.json, "w") as f:
        json.dump({"header": header, "args": run, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
