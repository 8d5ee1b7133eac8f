"""Full training step on the condensed form vs dense (issue 18).

MLP 784-3000-3000-10 (ReLU), cross-entropy, Adam, float32. Every layer has a constant fan-in
``k = round((1 - sparsity) * n_in)``. Variants, compiled once each and timed interleaved in
one process (``_timing.interleaved``: alternating, rotating order, ratios of medians and of
minima):

* ``dense``: forward + backward + Adam on the dense params;
* ``masked``: the same model trained by ``jaxsparse.srigl(..., ablation=False)`` (masks over
  dense arrays: dense cost plus the wrapper; its amortized update is not timed);
* ``condensed``: ``srigl_condensed`` on values/indices with :func:`condensed_linear`
  (``--impl``: the C++ kernels on CPU by default), a plain step and a topology-update step
  (growth scores, SRigL selection per layer, slot moves of values and Adam moments) timed
  separately; ``amortized = plain + (update - plain) / update_every``. The growth scores
  come from each layer's ``GrowthInputs(x, dy)`` in blocks of ``--growth-block`` neurons
  (``0``: the whole dense gradients, one dense forward + backward).

``--update-table B1 B2 ...`` prints, instead, the topology-update program alone
(``topology="update"``) with whole-layer growth and with each growth block: its XLA
temporaries, those of the one-program step built the same way, and the update's time.
``--ablation`` makes every variant SRigL with neuron ablation on the padded layout
(``capacity = 2 k`` slots per neuron): the whole-layer update then runs ``srigl_layer`` on
each layer's dense view, the blocked one ``srigl_ablation_condensed_layer_blocked``.

Memory: bytes of params + optimizer state (the condensed side includes its indices), next to
the weights' density ``nnz / total``; and XLA's temporary buffers of each compiled step:
dense, the condensed one-program step (``lax.cond`` over the update: XLA reserves the update
branch's temporaries for every step) and the condensed ``topology="skip"`` program a host loop runs
between updates.

    python -m experiments.benchmarks.condensed_training
    python -m experiments.benchmarks.condensed_training --batches 128 --sparsities 0.95 0.99
    python -m experiments.benchmarks.condensed_training --batches 128 --sparsities 0.95 --repeats 3 --update-table 64 256 1024
    python -m experiments.benchmarks.condensed_training --batches 128 --sparsities 0.95 --repeats 3 --update-table 64 256 1024 --ablation
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse
from experiments.benchmarks import _timing
from jaxsparse import topology
from jaxsparse.condensed import training as T

SIZES = (784, 3000, 3000, 10)


def layer_names(sizes):
    return [f"fc{i}" for i in range(len(sizes) - 1)]


def dense_params(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return {name: {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
            for name, k, a, b in zip(layer_names(sizes), keys, sizes[:-1], sizes[1:])}


def dense_apply(params, x):
    names = sorted(params)
    for name in names:
        x = x @ params[name]["kernel"] + params[name]["bias"][None, :]
        if name != names[-1]:
            x = jax.nn.relu(x)
    return x


def condensed_apply(params, indices, x, impl):
    names = sorted(params)
    for name in names:
        p = params[name]
        x = T.condensed_linear(x, p["values"], indices[name]["indices"], p["bias"], impl=impl)
        if name != names[-1]:
            x = jax.nn.relu(x)
    return x


def condensed_growth_inputs(params, indices, x, labels, impl):
    """Per layer ``GrowthInputs(x, dy)`` from one forward + backward of the condensed model
    (a zero added to each layer's output; its gradient is ``dy``)."""
    names = sorted(params)

    def loss(deltas):
        h, xs = x, {}
        for name in names:
            p = params[name]
            xs[name] = h
            h = T.condensed_linear(h, p["values"], indices[name]["indices"], p["bias"],
                                   impl=impl) + deltas[name]
            if name != names[-1]:
                h = jax.nn.relu(h)
        return xent(h, labels), xs

    zeros = {name: jnp.zeros((x.shape[0], params[name]["bias"].shape[0])) for name in names}
    dys, xs = jax.grad(loss, has_aux=True)(zeros)
    return {name: T.GrowthInputs(xs[name], dys[name]) for name in names}


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def fan_ins(sizes, sparsity):
    return {name: max(1, round((1 - sparsity) * n_in))
            for name, n_in in zip(layer_names(sizes), sizes[:-1])}


def constant_fan_in_masks(key, params, ks):
    return {name: {"kernel": topology.random_mask_per_neuron(
                jax.random.fold_in(key, i), params[name]["kernel"].shape, ks[name]),
                   "bias": None}
            for i, name in enumerate(sorted(params))}


def batch(key, size, sizes):
    x = jax.random.normal(key, (size, sizes[0]))
    return x, jnp.arange(size, dtype=jnp.int32) % sizes[-1]


def build(sizes, sparsity, batch_size, args):
    """Compiled steps and their arguments for one configuration."""
    key = jax.random.key(0)
    params = dense_params(key, sizes)
    x, y = batch(jax.random.key(1), batch_size, sizes)
    adam = optax.adam(1e-3)
    ks = fan_ins(sizes, sparsity)
    masks = jax.jit(lambda p: constant_fan_in_masks(key, p, ks))(params)
    masked = jax.tree.map(lambda w, m: w if m is None else jnp.where(m, w, 0.0), params, masks,
                          is_leaf=lambda v: v is None)
    cparams, indices = T.condense_params(masked, masks)
    n_in = {name: n for name, n in zip(layer_names(sizes), sizes[:-1])}
    fan = None
    if args.ablation:  # the padded layout: room for k' up to 2 k
        cparams, indices, fan = T.pad_condensed(
            cparams, indices, {name: min(2 * k, n_in[name]) for name, k in ks.items()}, n_in)

    def dense_step(p, st, x, y):
        g = jax.grad(lambda p: xent(dense_apply(p, x), y))(p)
        u, st = adam.update(g, st, p)
        return optax.apply_updates(p, u), st

    def condensed_step(p, st, x, y, topology="scheduled", growth_block=None):
        """``growth_block=None``: growth by the whole dense gradients (one dense forward +
        backward); an int: by ``GrowthInputs`` in blocks of that many neurons."""
        tx = T.srigl_condensed(adam, key=key, end_step=10**9, update_every=args.update_every,
                               growth_block=growth_block or 256, ablation=args.ablation)
        idx = T.get_indices(st)
        g = jax.grad(lambda p: xent(condensed_apply(p, idx, x, args.impl), y))(p)

        def dense_grads():  # the dense weight gradients, only inside the update branch
            dense, _ = T.expand_params(p, idx, n_in, st.fan)
            full = jax.grad(lambda d: xent(dense_apply(d, x), y))(dense)
            return {name: full[name]["kernel"] for name in sorted(full)}

        def blocked():
            return condensed_growth_inputs(p, idx, x, y, args.impl)

        return tx.step(g, st, p, dense_grads=dense_grads if growth_block is None else blocked,
                       topology=topology)

    out = {"ks": ks, "n_in": n_in}
    tx = T.srigl_condensed(adam, key=key, end_step=10**9, update_every=args.update_every,
                           ablation=args.ablation)
    cstate = tx.init(cparams, indices, fan)
    block = args.growth_block or None
    if args.update_table:  # the host loop's update program, whole-layer vs blocked growth
        out["update_programs"] = {
            b: [_timing.compile_timed(
                lambda p, st, x, y, b=b, mode=mode: condensed_step(p, st, x, y, mode, b or None),
                cparams, cstate, x, y) for mode in ("update", "scheduled")]
            for b in [0, *args.update_table]}
    else:  # the step table's programs (the update table needs none of them)
        out["condensed"] = _timing.compile_timed(
            lambda p, st, x, y: condensed_step(p, st, x, y, growth_block=block), cparams,
            cstate, x, y)
        # A host loop's program for the steps without a topology update (no dense
        # temporaries).
        out["condensed_skip"] = _timing.compile_timed(
            lambda p, st, x, y: condensed_step(p, st, x, y, topology="skip"), cparams, cstate,
            x, y)
    out["condensed_args"] = {
        "plain": (cparams, cstate._replace(count=jnp.int32(1)), x, y),
        "update": (cparams, cstate._replace(count=jnp.int32(args.update_every)), x, y),
    }
    out["memory_condensed"] = _timing.tree_nbytes((cparams, cstate.inner_state, indices))
    dstate = adam.init(params)
    out["memory_dense"] = _timing.tree_nbytes((params, dstate))
    out["dense_args"] = (params, dstate, x, y)
    out["dense_step"] = dense_step
    if args.masked:
        stx = jaxsparse.srigl(adam, sparsity, key=key, end_step=10**9,
                              update_every=args.update_every, ablation=False,
                              distribution="uniform", track_itop=False)
        mparams, mstate = jax.jit(lambda p: jaxsparse.init_masked(stx, p))(params)

        def masked_step(p, st, x, y):
            g = jax.grad(lambda p: xent(dense_apply(p, x), y))(p)
            u, st = stx.update(g, st, p)
            return optax.apply_updates(p, u), st

        out["masked"] = _timing.compile_timed(masked_step, mparams, mstate, x, y)
        out["masked_args"] = (mparams, mstate._replace(count=jnp.int32(1)), x, y)
    nnz = sum(k * b for k, b in zip(ks.values(), sizes[1:]))
    out["density"] = nnz / sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return out


def timed(variants, args):
    calls = {}
    for name, (fn, a) in variants.items():
        jax.block_until_ready(fn(*a))  # warm up
        once = _timing.mean_seconds(lambda fn=fn, a=a: fn(*a), 1).wall
        calls[name] = ((lambda fn=fn, a=a: fn(*a)),
                       _timing.calls_for(once, args.seconds, most=50))
    return _timing.interleaved(calls, args.repeats)["wall"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--update-every", type=int, default=100)
    ap.add_argument("--impl", default="auto", choices=T.IMPLS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="per timed repetition")
    ap.add_argument("--no-masked", dest="masked", action="store_false")
    ap.add_argument("--growth-block", type=int, default=256,
                    help="neurons per growth block at topology updates (GrowthInputs); 0: "
                         "growth by the whole dense gradients (one dense forward + backward)")
    ap.add_argument("--update-table", type=int, nargs="+", metavar="BLOCK",
                    help="instead of the step table: the topology-update program alone "
                         "(topology='update'), whole-layer growth vs these growth blocks: "
                         "XLA temporaries and time")
    ap.add_argument("--ablation", action="store_true",
                    help="SRigL with neuron ablation on the padded layout (capacity 2k)")
    args = ap.parse_args(argv)
    sizes = tuple(args.sizes)
    if args.update_table:
        return update_table(sizes, args)
    print(f"# condensed training step vs dense: MLP {'-'.join(map(str, sizes))}, Adam, fp32, "
          f"impl={T.choose_train_impl(args.impl, jnp.float32)}, update_every="
          f"{args.update_every}")
    print(f"# {_timing.machine_line()}")
    head = ("| batch | sparsity | dense ms | masked / dense | condensed plain ms | "
            "condensed update ms | speedup plain (median, best) | speedup amortized | "
            "mem ratio | density | mem / density | XLA temp MB dense / condensed / skip-only |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for b in args.batches:
        dense_compiled = None
        for s in args.sparsities:
            cfg = build(sizes, s, b, args)
            if dense_compiled is None:
                dense_compiled = _timing.compile_timed(cfg["dense_step"], *cfg["dense_args"])
            variants = {
                "dense": (dense_compiled.executable, cfg["dense_args"]),
                "plain": (cfg["condensed"].executable, cfg["condensed_args"]["plain"]),
                "update": (cfg["condensed"].executable, cfg["condensed_args"]["update"]),
            }
            if args.masked:
                variants["masked"] = (cfg["masked"].executable, cfg["masked_args"])
            t = timed(variants, args)
            med = {k: statistics.median(v) for k, v in t.items()}
            plain = _timing.ratio(t["dense"], t["plain"])
            amort = med["plain"] + (med["update"] - med["plain"]) / args.update_every
            mem = cfg["memory_condensed"] / cfg["memory_dense"]
            temps = [_timing.memory_stats(dense_compiled.executable)["temp"],
                     _timing.memory_stats(cfg["condensed"].executable)["temp"],
                     _timing.memory_stats(cfg["condensed_skip"].executable)["temp"]]
            masked = f"{med['masked'] / med['dense']:.2f}" if args.masked else "-"
            print(f"| {b} | {s:.0%} | {med['dense'] * 1e3:.1f} | {masked} | "
                  f"{med['plain'] * 1e3:.2f} | {med['update'] * 1e3:.1f} | "
                  f"{plain.median:.2f}x, {plain.best:.2f}x | {med['dense'] / amort:.2f}x | "
                  f"{mem:.4f} | {cfg['density']:.4f} | {mem / cfg['density']:.2f} | "
                  f"{temps[0] / 2**20:.1f} / {temps[1] / 2**20:.1f} / "
                  f"{temps[2] / 2**20:.1f} |", flush=True)


def update_table(sizes, args):
    """The update program (``topology="update"``) per growth mode: XLA temporaries of the
    compiled program and its time, the modes timed interleaved."""
    args.masked = False
    rule = "with neuron ablation (capacity 2k)" if args.ablation else "constant fan-in"
    print(f"# topology-update program, SRigL {rule}: MLP {'-'.join(map(str, sizes))}, Adam, "
          f"fp32, impl={T.choose_train_impl(args.impl, jnp.float32)}")
    print(f"# {_timing.machine_line()}")
    head = ("| batch | sparsity | growth | XLA temp MB (update program) | "
            "XLA temp MB (one-program step) | update ms (median) | vs whole |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for b in args.batches:
        for s in args.sparsities:
            cfg = build(sizes, s, b, args)
            progs = cfg["update_programs"]
            a = cfg["condensed_args"]["update"]
            t = timed({blk: (c[0].executable, a) for blk, c in progs.items()}, args)
            med = {blk: statistics.median(v) for blk, v in t.items()}
            for blk, (upd, sched) in progs.items():
                temps = [_timing.memory_stats(c.executable)["temp"] / 2**20
                         for c in (upd, sched)]
                name = "whole (dense grads)" if blk == 0 else f"blocked, {blk} neurons"
                print(f"| {b} | {s:.0%} | {name} | {temps[0]:.1f} | {temps[1]:.1f} | "
                      f"{med[blk] * 1e3:.1f} | {med[blk] / med[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
