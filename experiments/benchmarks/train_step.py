"""Train-step overhead of every jaxsparse algorithm relative to the dense optax step.

For each model and algorithm it measures, side by side in one run (one period of the dense
loop and one of every algorithm's per rotation, in a random order each time, so machine
noise hits all alike):

* the mean step time over a whole update period of ``update_every`` steps, which contains
  exactly one topology update, divided by the dense step time (target <= 1.05x). The
  table gives the ratio of the medians and the ratio of the fastest periods (noise on a
  shared machine only ever adds time, so the fastest period is the least disturbed one);
* the topology-update step alone divided by a plain step of the same algorithm
  (target <= 3x).

``--schedule`` picks how the sparse step learns that a topology update is due: ``cond``
(``tx.update(grads, state, params)``: decided in the step, under ``lax.cond``), ``host``
(the README's loop: ``topology_update=jaxsparse.topology_due(tx, t)``, two compiled steps
chosen on the host, the flag's cost included) or ``both`` (one row each).

Usage:
  python -m experiments.benchmarks.train_step [--periods 15] [--models lenet300,lenet5] \
      [--algorithms static,rigl,srigl] [--schedule cond|host|both]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse
from experiments.models import LeNet5, LeNet300

MODELS = {"lenet300": LeNet300, "lenet5": LeNet5}


def algorithms(update_every: int):
    key = jax.random.key(0)
    far = 10**9  # never reach end_step: every period has one full-size update
    common = dict(key=key, end_step=far, update_every=update_every)
    algos = {
        "static": lambda tx: jaxsparse.static(tx, 0.9, key=key),
        "set": lambda tx: jaxsparse.set(tx, 0.9, **common),
        "rigl": lambda tx: jaxsparse.rigl(tx, 0.9, **common),
        "snfs": lambda tx: jaxsparse.snfs(tx, 0.9, **common),
        "magnitude": lambda tx: jaxsparse.magnitude_pruning(
            tx, 0.9, end_step=far, update_every=update_every),
        "random_pruning": lambda tx: jaxsparse.random_pruning(
            tx, 0.9, key=key, end_step=far, update_every=update_every),
    }
    if hasattr(jaxsparse, "srigl"):
        algos["srigl"] = lambda tx: jaxsparse.srigl(tx, 0.9, **common)
        algos["srigl_no_ablation"] = lambda tx: jaxsparse.srigl(tx, 0.9, ablation=False,
                                                                **common)
    if hasattr(jaxsparse, "nm_rigl"):
        # N:M needs fan-ins divisible by M (LeNet-5's 5x5x1 conv is not): others stay dense.
        def nm_prunable(path, leaf):
            return path.endswith("kernel") and int(np.prod(leaf.shape[:-1])) % 4 == 0

        algos["nm_rigl_2:4"] = lambda tx: jaxsparse.nm_rigl(tx, n=2, m=4, prunable=nm_prunable,
                                                            **common)
    return algos


def make_step(model, tx, host: bool):
    """The jitted train step; with ``host`` it takes the static ``topology_update`` flag."""

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, state, x, y, topology_update=None):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params,
                                   **({"topology_update": topology_update} if host else {}))
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1),
                   static_argnames="topology_update" if host else None)


class Runner:
    """Holds one (model, optimizer) train loop and times periods of it."""

    def __init__(self, model, tx, params, x, y, host: bool = False):
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), params)  # donated below
        self.state = tx.init(params)
        try:
            params = jaxsparse.apply_masks(params, jaxsparse.get_masks(self.state))
        except ValueError:
            pass  # dense
        self.params = params
        self.tx, self.host, self.t = tx, host, 0
        self.step = make_step(model, tx, host)
        self.x, self.y = x, y
        self.advance()  # compile, t = 0
        jax.block_until_ready(self.params)

    def advance(self) -> None:
        """One train step; under ``host`` with the flag the README's loop computes."""
        flag = {"topology_update": jaxsparse.topology_due(self.tx, self.t)} if self.host else {}
        self.params, self.state = self.step(self.params, self.state, self.x, self.y, **flag)
        self.t += 1

    def period(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.advance()
        jax.block_until_ready(self.params)
        return (time.perf_counter() - t0) / n

    def step_times(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.advance()
            jax.block_until_ready(self.params)
            times.append(time.perf_counter() - t0)
        return times


def bench(model_name, periods, update_every, batch, only=None, schedules=("cond",)):
    model = MODELS[model_name]()
    kp, kx = jax.random.split(jax.random.key(0))
    x = jax.random.uniform(kx, (batch, 28, 28, 1))
    y = jnp.arange(batch) % 10
    params = model.init(kp, x)["params"]
    inner = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
    dense = Runner(model, inner(), params, x, y)
    runs = {}
    for name, make in algorithms(update_every).items():
        for host in schedules if not only or name in only else ():
            label = name if schedules == ("cond",) else f"{name} ({host})"
            runs[label] = Runner(model, make(inner()), params, x, y, host=host == "host")
            # After the compile step (t = 0), run to t = 2 * update_every (one whole period
            # compiles a host-scheduled update step): every period then starts with its
            # topology update.
            runs[label].period(2 * update_every - 1)
    # One rotation per period over the dense loop and every sparse loop, so that the
    # machine's drifts (other jobs, the CPU's modes) hit all of them alike, in a fresh
    # random order each time (a loop run right after another finds the caches as that one
    # left them).
    loops = {"dense": dense, **runs}
    avg = {label: [] for label in loops}
    order = np.random.default_rng(0)
    for _ in range(periods):
        for label in order.permutation(list(loops)):
            avg[label].append(loops[label].period(update_every))
    rows = []
    d = statistics.median(avg["dense"])
    for label, sparse in runs.items():
        update, plain = [], []
        for _ in range(max(2, periods // 2)):
            times = sparse.step_times(update_every)
            # Each period starts at a multiple of update_every: the update is its first step.
            update.append(times[0])
            plain.append(statistics.median(times[1:]))
        s = statistics.median(avg[label])
        u, p = statistics.median(update), statistics.median(plain)
        best = min(avg[label]) / min(avg["dense"])
        rows.append((model_name, label, d * 1e3, s * 1e3, s / d, best, u * 1e3, p * 1e3, u / p))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="lenet300,lenet5")
    parser.add_argument("--periods", type=int, default=15)
    parser.add_argument("--update-every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--algorithms", default="",
                        help="comma-separated subset of the algorithms (default: all)")
    parser.add_argument("--schedule", choices=("cond", "host", "both"), default="cond",
                        help="topology update decided in the step (cond), by the host's "
                             "topology_due (host, the README's loop), or one row each")
    args = parser.parse_args()
    schedules = ("cond", "host") if args.schedule == "both" else (args.schedule,)
    only = set(filter(None, args.algorithms.split(",")))
    unknown = only - set(algorithms(args.update_every))
    if unknown:
        parser.error(f"unknown algorithms {sorted(unknown)}; "
                     f"choose from {sorted(algorithms(args.update_every))}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}), "
          f"batch {args.batch}, update every {args.update_every} steps, "
          f"{args.periods} periods, sparsity 0.9, inner sgd+momentum, "
          f"schedule {args.schedule}")
    head = ("model", "algorithm", "dense ms", "sparse ms", "avg ratio", "best-period ratio",
            "update ms", "plain ms", "update/plain")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m in args.models.split(","):
        for r in bench(m, args.periods, args.update_every, args.batch, only, schedules):
            print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | "
                  f"{r[6]:.3f} | {r[7]:.3f} | {r[8]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
