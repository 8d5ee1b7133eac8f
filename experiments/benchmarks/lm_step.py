"""LM train-step benchmark on 8 CPU devices: tokens/s and the sparse / dense full-step ratio
(averaged over whole topology-update periods, so each timed repetition holds exactly one
update), in 1 process (mesh 4x2 over 8 devices) and 2 processes x 4 devices (same mesh,
jax.distributed + gloo), plus the bytes per prunable weight that masks take in the
optimizer state and in a checkpoint (bit-packed, Orbax).

  python -m experiments.benchmarks.lm_step                       # 1m preset, 1 and 2 procs
  python -m experiments.benchmarks.lm_step --preset=10m --algorithms=dense,rigl
  python -m experiments.benchmarks.lm_step --preset=125m --algorithms=rigl --masks_only
  python -m experiments.benchmarks.lm_step --preset=125m --algorithms=dense,srigl --one_state

Each process count runs in its own child processes (launched like experiments/lm/launch.py);
inside one, the algorithms' repetitions alternate (experiments/benchmarks/_timing.py) and
ratios are of medians and of minima (wall clock), and of medians of this process's CPU
time (less disturbed by other jobs on a shared machine). ``--plain`` adds each sparse
algorithm's plain step alone, so the update's own cost can be told from the plain step's;
``--host_topology`` adds each sparse algorithm with host-scheduled topology updates (two
compiled steps, no ``lax.cond`` in plain steps; rows ``<algo>-host``).
The parent prints one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

PLAIN = "-plain"  # variant suffix: the plain step only (``--plain``)
HOST = "-host"  # variant suffix: host-scheduled topology updates (``--host_topology``)
NEVER = 10**9  # the update period of a plain-step variant


def mask_bytes(opt_state) -> dict:
    """Prunable weights and the bytes per weight their masks take in ``opt_state``, packed,
    and in a masks-only Orbax checkpoint on disk."""
    import jax

    from experiments.benchmarks import _timing
    from jaxsparse import bitmask
    from jaxsparse import checkpoint as ckpt_lib
    from jaxsparse.transform import get_sparse_state

    sparse = get_sparse_state(opt_state)
    masks = sparse.masks  # PackedMask leaves: count weights, not bytes
    leaves = [m for m in jax.tree.leaves(masks, is_leaf=bitmask.is_packed) if m is not None]
    n = sum(m.size for m in leaves)
    in_state = _timing.tree_nbytes(masks) + _timing.tree_nbytes(sparse.ever_active or {})
    with tempfile.TemporaryDirectory() as d:
        ck = ckpt_lib.Checkpointer(Path(d) / "masks")
        ck.save(0, {"masks": masks})
        ck.close()
        on_disk = ckpt_lib.disk_bytes(Path(d) / "masks" / "0" / "state")
        packed = _timing.tree_nbytes(ckpt_lib.pack_masks(masks))
    return {"prunable": n, "state_bytes_per_weight": in_state / n,
            "packed_bits_per_weight": 8 * packed / n, "disk_bits_per_weight": 8 * on_disk / n,
            "mask_leaves": len(leaves)}


def worker(a) -> None:
    import jax

    # One process too runs its 8 devices' collectives through gloo: XLA's in-process
    # collectives aborted a 10m run (two all-reduces of one program waiting on each other's
    # devices: "Termination timeout for `all reduce ...`", 8 devices on 2 cores).
    if a.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    import functools

    import numpy as np

    import jaxsparse
    from experiments.benchmarks import _timing
    from experiments.configs import lm_base
    from experiments.lm import data as data_lib
    from experiments.lm import model as model_lib
    from experiments.lm import trainer

    corpus = data_lib.load_corpus()
    variants, compile_s, extra, prepare = {}, {}, {}, {}
    holders = []
    names = a.algorithms.split(",")
    sparse = [n for n in names if n not in ("dense", "static")]
    if a.plain:  # the same algorithms with a topology update that never comes
        names += [f"{n}{PLAIN}" for n in sparse]
    if a.host_topology:  # the same algorithms, plain and update steps compiled apart
        names += [f"{n}{HOST}" for n in sparse]
    for algo in names:
        c = lm_base.get_config()
        c.model = model_lib.lm_config(a.preset, seq_len=a.seq_len)
        c.batch_size, c.sparsity = a.batch_size, a.sparsity
        c.algorithm = algo.removesuffix(PLAIN).removesuffix(HOST)
        c.update_every = NEVER if algo.endswith(PLAIN) else a.update_every
        c.num_steps, c.warmup_steps = 1_000_000, 0
        setup = trainer.make_setup(c)
        data = trainer.replicated_array(corpus.train, setup)
        holder = {"state": trainer.init_state(setup), "t": 0}  # t: the host's step count
        holders.append(holder)
        # Mask bytes: measured in the 1-process run (each process would need the same
        # checkpoint folder, and the numbers do not depend on the process count).
        if algo != "dense" and not extra and jax.process_count() == 1:
            extra = mask_bytes(holder["state"].opt_state)
        if a.masks_only:
            continue
        kinds = [False, True] if algo.endswith(HOST) else [None]
        compiled = [_timing.compile_timed(trainer.make_train_step(setup, k), holder["state"],
                                          data) for k in kinds]
        compile_s[algo] = sum(x.cpu_s for x in compiled)
        executables = [x.executable for x in compiled]
        if algo.endswith(HOST):
            due = functools.partial(jaxsparse.topology_due, setup.tx)
            step_for = lambda t, ex=executables, due=due: ex[due(t)]  # noqa: E731
        else:
            step_for = lambda t, ex=executables: ex[0]  # noqa: E731

        def call(step_for=step_for, holder=holder, data=data):
            # One step in flight at a time: with a queue of steps, 8 simulated devices on 2
            # cores deadlocked in their collectives (every pool thread blocked in a
            # rendezvous; a 10m warm-up of 99 steps hung until gloo's 30-minute timeout).
            holder["state"], loss = step_for(holder["t"])(holder["state"], data)
            holder["t"] += 1
            return jax.block_until_ready(loss)

        if a.one_state:
            # Every repetition starts from a fresh state at a period's start: the warm-up
            # only needs both branches run once, an update step and a plain step.
            prepare[algo] = _fresh_state(setup, holder, holders, a.update_every)
            prepare[algo]()
            warm_up = min(2, a.update_every)
        else:
            warm_up = a.update_every  # one whole update period
        for _ in range(warm_up):
            call()
        variants[algo] = (call, a.update_every)
        if a.one_state:
            holder["state"] = None
    times = (_timing.interleaved(variants, a.repeats, prepare) if variants
             else {"wall": {}})
    if jax.process_index() == 0:
        tokens = a.batch_size * a.seq_len
        out = {"machine": _timing.machine_line(), "processes": jax.process_count(),
               "devices": jax.device_count(), "compile_cpu_s": compile_s, **extra,
               "step_s": {k: float(np.median(v)) for k, v in times["wall"].items()},
               "step_s_best": {k: float(min(v)) for k, v in times["wall"].items()},
               "tokens_per_step": tokens}
        if "dense" in times["wall"]:
            for clock, field in (("wall", "ratio_vs_dense"), ("cpu", "cpu_ratio_vs_dense")):
                out[field] = {k: list(_timing.ratio(v, times[clock]["dense"]))
                              for k, v in times[clock].items()}
        Path(a.json_out).write_text(json.dumps(out))


def _fresh_state(setup, holder: dict, holders: list[dict], period: int):
    """``--one_state``: a function that drops every variant's state and gives ``holder`` a
    freshly initialized one at the start of an update period (step and sparse step counter
    ``period``), so that the timed ``period`` steps hold exactly one topology update."""
    import jax
    import jax.numpy as jnp

    from experiments.benchmarks.scaling import pin_count

    def advance(state):
        start = jnp.asarray(period, state.step.dtype)
        return pin_count(state._replace(step=start), start)

    advance = jax.jit(advance, out_shardings=setup.state_shardings, donate_argnums=0)

    def prepare():
        for h in holders:
            h["state"] = None
        from experiments.lm import trainer
        holder["state"] = jax.block_until_ready(advance(trainer.init_state(setup)))
        holder["t"] = period

    return prepare


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="1m")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--algorithms", default="dense,static,rigl,srigl")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--update_every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--processes", default="1,2")
    p.add_argument("--json_out", default="",
                   help="also write the measured rows (one per process count) to this JSON "
                        "file")
    # Set by the launcher for the processes it starts (not for users).
    p.add_argument("--coordinator", default="")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--plain", action="store_true",
                   help="also time each sparse algorithm's plain step alone (rows "
                        "'<algo>-plain': an update period longer than the run)")
    p.add_argument("--host_topology", action="store_true",
                   help="also time each sparse algorithm with host-scheduled topology updates "
                        "(rows '<algo>-host': plain and update steps compiled apart, "
                        "jaxsparse.topology_due)")
    p.add_argument("--one_state", action="store_true",
                   help="hold one algorithm's state at a time (for models whose states do "
                        "not fit in memory together): each repetition starts from a freshly "
                        "initialized state at the start of an update period (warm-up: 2 steps)")
    p.add_argument("--masks_only", action="store_true",
                   help="only the mask bytes (state, packed, on disk): no step is compiled "
                        "or timed (1 process)")
    a = p.parse_args(argv)
    if a.coordinator:  # a process started by the launcher below (its --json_out: the row)
        worker(a)
        return
    from experiments.lm.launch import launch

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in [1] if a.masks_only else (int(x) for x in a.processes.split(",")):
            out = Path(d) / f"{n}.json"
            args = [f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(a).items()
                    if v is not False and k not in ("json_out", "coordinator",
                                                    "num_processes", "process_id",
                                                    "processes")]
            code = launch([*args, f"--json_out={out}"], n, 8 // n,
                          module="experiments.benchmarks.lm_step", log_dir=str(Path(d) / "log"))
            if code:
                logs = "".join(f.read_text()[-2000:] for f in (Path(d) / "log").glob("*"))
                sys.exit(f"{n}-process benchmark failed ({code}):\n{logs}")
            rows.append(json.loads(out.read_text()))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"# {rows[0]['machine']}")
    if not a.masks_only:
        _print_steps(a, rows)
    r = rows[0]
    if "prunable" in r:
        print(f"\nmasks: {r['prunable']:,} prunable weights in {r['mask_leaves']} leaves; in "
              f"the optimizer state "
              f"{r['state_bytes_per_weight']:.3f} bytes/weight (packed masks + ever_active); "
              f"packed {r['packed_bits_per_weight']:.3f} bits/weight; checkpoint on disk "
              f"{r['disk_bits_per_weight']:.3f} bits/weight (Orbax files, compressed)")


def _print_steps(a, rows) -> None:
    print(f"# preset {a.preset}, batch {a.batch_size} x {a.seq_len} bytes, sparsity "
          f"{a.sparsity}, one topology update per {a.update_every} steps, {a.repeats} "
          f"repetitions of {a.update_every} steps per algorithm, alternating"
          + (", each from a fresh state (--one_state)" if a.one_state else ""))
    print("| processes x devices | algorithm | step ms (median) | tokens/s | sparse/dense "
          "(median, best) | sparse/dense CPU time (median) | compile CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for algo, s in r["step_s"].items():
            ratio = r.get("ratio_vs_dense", {}).get(algo)
            rt = f"{ratio[0]:.2f}, {ratio[1]:.2f}" if ratio else "-"
            cpu = r.get("cpu_ratio_vs_dense", {}).get(algo)
            print(f"| {r['processes']} x {r['devices'] // r['processes']} | {algo} | "
                  f"{1e3 * s:.1f} | {r['tokens_per_step'] / s:,.0f} | {rt} | "
                  f"{f'{cpu[0]:.2f}' if cpu else '-'} | {r['compile_cpu_s'][algo]:.1f} |")
    if len(rows) == 2:
        print("\n| algorithm | 2-process / 1-process step time (median) |")
        print("|---|---|")
        for algo in rows[0]["step_s"]:
            print(f"| {algo} | {rows[1]['step_s'][algo] / rows[0]['step_s'][algo]:.2f} |")


if __name__ == "__main__":
    main()
