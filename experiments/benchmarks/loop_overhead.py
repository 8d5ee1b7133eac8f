"""Training-loop overhead: ``experiments.train``'s loop vs the bare jitted step.

For each case it times (after compilation):

* bare: the same jitted train step called back to back on the same device data, one block
  at the end (the floor any loop can reach);
* loop: ``experiments.train.train`` itself (batch index bookkeeping, progress bar, metric
  syncs every ``log_every`` steps, per-epoch test evaluation, JSONL logging), no checkpoints.

and prints ms/step and the overhead ratio ``loop / bare - 1``; for sparse cases also the loop
with ``host_topology`` (plain and update steps compiled apart, picked on the host: no
``lax.cond`` in plain steps) and its ratio to the loop. Each measurement is repeated and the
minimum kept (the machine may be shared).

  python -m experiments.benchmarks.loop_overhead                       # digits only
  python -m experiments.benchmarks.loop_overhead --data_dir=../shared/data/mnist
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from experiments import data as data_lib
from experiments import train as train_lib
from experiments.configs import base


def bare_step_time(c, ds, steps: int) -> float:
    """Seconds per step of the jitted train step alone."""
    setup = train_lib.create_setup(c, ds)
    it = data_lib.BatchIterator(ds.x_train, ds.y_train, c.batch_size, seed=c.seed)
    step_fn = train_lib.make_train_step(setup.model, setup.tx, c.batch_size)
    state, sums = setup.state, train_lib.zero_sums()
    perms = [it.next_indices() for _ in range(steps + 1)]
    state, sums = step_fn(state, sums, it.x, it.y, *perms[0])
    jax.block_until_ready(state)
    t = time.perf_counter()
    for perm, start in perms[1:]:
        state, sums = step_fn(state, sums, it.x, it.y, perm, start)
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / steps


def loop_step_time(c, ds, steps: int, eval_every_epochs: int = 1,
                   host_topology: bool = False) -> float:
    c = c.copy_and_resolve_references()
    c.num_steps = steps + 1
    c.eval_every_epochs = eval_every_epochs
    c.host_topology = host_topology
    c.print_table = False
    with tempfile.TemporaryDirectory() as d:
        out = train_lib.train(c, workdir=d, dataset=ds)
    return out["loop_time"] / out["loop_steps"]


def case(name, dataset, model_hidden, batch_size, log_every, algorithm):
    c = base.get_config()
    c.dataset = dataset
    c.model.hidden = model_hidden
    c.batch_size = batch_size
    c.log_every = log_every
    c.algorithm = algorithm
    c.progress = True
    return name, c


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="", help="MNIST IDX folder (adds MNIST cases)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args(argv)

    cases = [
        case("digits lenet300 b128 rigl", "digits", (300, 100), 128, 50, "rigl"),
        case("digits lenet300 b128 dense", "digits", (300, 100), 128, 50, "dense"),
    ]
    datasets = {"digits": data_lib.load_dataset("digits")}
    if args.data_dir:
        datasets["mnist"] = data_lib.load_dataset("mnist", args.data_dir)
        cases += [
            case("mnist lenet300 b128 rigl", "mnist", (300, 100), 128, 100, "rigl"),
            case("mnist lenet300 b128 dense", "mnist", (300, 100), 128, 100, "dense"),
        ]
    cases = [(name, c) for name, c in cases if args.only in name]
    rows = []
    for name, c in cases:
        ds = datasets[c.dataset]
        # Interleaved repeats, so a load change on a shared machine hits all three alike.
        sparse = c.algorithm != "dense"
        times = [(bare_step_time(c, ds, args.steps), loop_step_time(c, ds, args.steps, 0),
                  loop_step_time(c, ds, args.steps, 1),
                  loop_step_time(c, ds, args.steps, 0, host_topology=sparse))
                 for _ in range(args.repeats)]
        bare, loop, loop_eval, host = (min(t) for t in zip(*times, strict=True))
        spe = len(ds.x_train) // c.batch_size
        rows.append((name, spe, bare * 1e3, loop * 1e3, 100.0 * (loop / bare - 1.0),
                     loop_eval * 1e3, 100.0 * (loop_eval / bare - 1.0),
                     host * 1e3 if sparse else None, host / loop if sparse else None))
    head = ("case", "steps/epoch", "bare ms/step", "loop ms/step", "overhead %",
            "+eval ms/step", "+eval overhead %", "host-scheduled ms/step", "host / loop")
    widths = [max(len(head[0]), *(len(r[0]) for r in rows)), *(len(h) for h in head[1:])]
    print(f"machine: {train_lib.machine_description()}; {args.steps} steps, min of "
          f"{args.repeats}")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        cells = [r[0], str(r[1]), f"{r[2]:.3f}", f"{r[3]:.3f}", f"{r[4]:.1f}", f"{r[5]:.3f}",
                 f"{r[6]:.1f}", "-" if r[7] is None else f"{r[7]:.3f}",
                 "-" if r[8] is None else f"{r[8]:.3f}"]
        print("  ".join(cell.rjust(w) if i else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(cells, widths, strict=True))))
    print("loop: train() with logging every log_every steps, eval only at the end; "
          "+eval: test-set evaluation after every epoch too (real work, not loop overhead); "
          "host-scheduled: the loop with host_topology (each step kind's first call, its "
          "compilation, not timed)")
    return np.asarray([r[4] for r in rows])


if __name__ == "__main__":
    main()
