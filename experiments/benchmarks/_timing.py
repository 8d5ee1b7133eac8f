"""Measuring helpers shared by the benchmark scripts.

The discipline (from ``train_step.py``): every variant being compared is timed in the same
process, repetitions of the variants alternate (and rotate their order) so that load from
other processes hits all of them alike, and results are ratios of medians and of minima
(noise only ever adds time, so the fastest repetition is the least disturbed one).
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np


class Ratio(NamedTuple):
    """``numerator / denominator`` of two timing samples.

    Attributes:
      median: ratio of the medians.
      best: ratio of the minima.
    """

    median: float
    best: float


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Ratio:
    """Ratio of medians and of minima of two samples of seconds."""
    if not numerator or not denominator:
        raise ValueError("ratio needs two non-empty timing samples")
    return Ratio(
        statistics.median(numerator) / statistics.median(denominator),
        min(numerator) / min(denominator),
    )


class Compiled(NamedTuple):
    """A compiled function and what compiling it cost.

    Attributes:
      executable: ``jax.jit(fn).lower(...).compile()``.
      wall_s: wall seconds of tracing, lowering and XLA compilation together.
      cpu_s: CPU seconds of this process over the same span (all threads): on a loaded
        machine it varies far less than ``wall_s``.
    """

    executable: Any
    wall_s: float
    cpu_s: float


def compile_timed(fn: Callable, *args, donate_argnums: tuple[int, ...] = ()) -> Compiled:
    """Compiles ``jax.jit(fn, donate_argnums=...)`` for ``args`` and times it."""
    t0, c0 = time.perf_counter(), time.process_time()
    executable = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return Compiled(executable, time.perf_counter() - t0, time.process_time() - c0)


def memory_stats(compiled) -> dict[str, int]:
    """XLA's buffer assignment of a compiled function, in bytes (``temp`` is the scratch
    memory the program needs beyond its arguments and outputs; ``peak`` where the backend
    reports it, else 0)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {"temp": 0, "peak": 0, "argument": 0, "output": 0, "alias": 0}
    return {
        "temp": int(stats.temp_size_in_bytes),
        "peak": int(getattr(stats, "peak_memory_in_bytes", 0) or 0),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (``None`` leaves hold none)."""
    return int(sum(np.asarray(x.nbytes) for x in jax.tree.leaves(tree)))


class Timing(NamedTuple):
    """Seconds per call: ``wall`` clock, and ``cpu`` time of this process (all threads).

    On a machine shared with other processes ``wall`` includes the time the scheduler gave
    to them; ``cpu`` does not (it still includes cache and memory-bandwidth contention, and
    time that XLA's worker threads spend spinning).
    """

    wall: float
    cpu: float


def mean_seconds(call: Callable[[], Any], n: int) -> Timing:
    """Mean time of ``n`` back-to-back calls, blocking once on the last result (as a
    training loop does: dispatch of step ``i + 1`` overlaps step ``i``)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = None
    for _ in range(n):
        out = call()
    jax.block_until_ready(out)
    return Timing((time.perf_counter() - t0) / n, (time.process_time() - c0) / n)


def fault_mb_per_call(call: Callable[[], Any], n: int) -> float:
    """Megabytes of fresh pages (minor page faults x page size) per call over ``n`` calls.

    XLA:CPU allocates a compiled program's temporary buffers on every call; with glibc's
    malloc, blocks over its mmap threshold (at most 32 MB) are new mappings each time, so
    every page the call writes is faulted in and zeroed by the kernel again. That cost
    grows with the temporaries a program *touches*, not with its arithmetic.
    """
    jax.block_until_ready(call())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = None
    for _ in range(n):
        out = call()
    jax.block_until_ready(out)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults * resource.getpagesize() / 1e6 / n


def allocator(maps: str | None = None) -> str:
    """The host allocator the process runs with: the ``LD_PRELOAD`` library and
    ``MALLOC_CONF`` (jemalloc) when that library is mapped into the process, else ``glibc
    malloc`` (a preload the loader could not find is ignored by it, and here too).
    ``maps``: the process's memory map (default: ``/proc/self/maps`` where it exists)."""
    preload = os.path.basename(os.environ.get("LD_PRELOAD", ""))
    if maps is None and os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            maps = f.read()
    if not preload or (maps is not None and preload not in maps):
        return "glibc malloc"
    conf = os.environ.get("MALLOC_CONF")
    return preload + (f" (MALLOC_CONF={conf})" if conf else "")


def calls_for(seconds_per_call: float, target_seconds: float, most: int = 200) -> int:
    """How many calls make one timed repetition last about ``target_seconds``."""
    return max(1, min(most, math.ceil(target_seconds / max(seconds_per_call, 1e-9))))


def interleaved(variants: dict[str, tuple[Callable[[], Any], int]], repeats: int,
                prepare: dict[str, Callable[[], Any]] | None = None,
                ) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each variant, ``repeats`` times, variants alternating.

    Args:
      variants: ``name -> (call, n)``: one timed repetition of ``name`` is ``n`` calls.
      repeats: repetitions per variant; the variants' order rotates every repetition.
      prepare: optional ``name -> fn``, called untimed before each repetition of ``name``
        (e.g. to build its state afresh when the variants' states do not fit in memory
        together).

    Returns:
      ``{"wall": {name: [seconds per call of each repetition]}, "cpu": {...}}``.
    """
    names = list(variants)
    times = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call, n = variants[name]
            if prepare and name in prepare:
                prepare[name]()
            t = mean_seconds(call, n)
            times["wall"][name].append(t.wall)
            times["cpu"][name].append(t.cpu)
    return times


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``"1.9/0.8/0.3"``."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line() -> str:
    """One line naming the machine and software the numbers were measured on."""
    device = jax.devices()[0]
    return (f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
            f"{platform.machine()} with {os.cpu_count()} CPUs, {allocator()}, "
            f"load {load_average()}")
