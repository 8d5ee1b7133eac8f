"""Starts a multi-process (multi-controller) JAX job on this machine: ``num_processes``
local processes, each owning ``devices_per_process`` CPU devices, joined by
``jax.distributed`` with the coordinator on 127.0.0.1 and CPU collectives over gloo.

  python -m experiments.lm.launch --num_processes=2 --devices_per_process=4 -- \
      --config=experiments/configs/lm_tiny.py --workdir=/tmp/lm2

Everything after ``--`` goes to ``python -m experiments.lm.trainer`` (or to ``--module``)
in every process, with ``--coordinator``, ``--num_processes`` and ``--process_id`` added.
Process 0's output is shown; the others' goes to ``<log_dir>/process_<i>.log`` (default:
discarded). If any process fails, the others are terminated and its exit code returned;
if the launcher itself is stopped (SIGTERM, Ctrl-C), it kills its processes first (a
process of a jax.distributed job catches SIGTERM for preemption handling and would go on
running, holding its memory, after its launcher is gone).

On a TPU pod slice no launcher is needed: start the same trainer on every host and let
``jax.distributed.initialize()`` find the coordinator (see BUILD.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(signum, frame):
    raise SystemExit(128 + signum)


def _sigterm_exits():
    """Makes SIGTERM raise ``SystemExit`` (so ``finally`` blocks run); returns the handler
    to restore, or ``None`` off the main thread (where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _stop)


def launch(args: list[str], num_processes: int, devices_per_process: int,
           module: str = "experiments.lm.trainer", log_dir: str | None = None,
           timeout: float | None = None, quiet: bool = False) -> int:
    """Runs ``python -m module *args`` in ``num_processes`` local processes; returns the
    first non-zero exit code (0 if all succeed).

    Raises:
      subprocess.TimeoutExpired: after ``timeout`` seconds (all processes are killed).
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes} and devices_per_process="
                         f"{devices_per_process} must be >= 1")
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    procs, logs = [], []
    code = 0
    old_handler = _sigterm_exits()
    try:  # every started process is killed on the way out, whatever the way
        for i in range(num_processes):
            out = None
            if i > 0 or quiet:
                if log_dir:
                    os.makedirs(log_dir, exist_ok=True)
                    out = open(os.path.join(log_dir, f"process_{i}.log"), "w")  # noqa: SIM115
                    logs.append(out)
                else:
                    out = subprocess.DEVNULL
            cmd = [sys.executable, "-m", module, *args, f"--coordinator={coordinator}",
                   f"--num_processes={num_processes}", f"--process_id={i}"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=out,
                                          stderr=subprocess.STDOUT if out is not None else None))
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                break
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(module, timeout)
            time.sleep(0.2)
        else:
            code = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--module", default="experiments.lm.trainer")
    parser.add_argument("--log_dir", default=None)
    a = parser.parse_args(argv)
    return launch(rest, a.num_processes, a.devices_per_process, a.module, a.log_dir)


if __name__ == "__main__":
    sys.exit(main())
