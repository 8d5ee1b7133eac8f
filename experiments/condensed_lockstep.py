"""What the condensed-training accuracy studies share (issue 18): loops stepped in lockstep
on the same batches and timed, the mask agreement of two runs, state sizes, and the
``final`` records (``results/<out>/results.jsonl``).

Used by :mod:`experiments.condensed_training_accuracy` (MLPs) and
:mod:`experiments.condensed_training_lm` (the byte LM's MLP blocks).
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.results_stats import fmt_cell
from jaxsparse.masks import path_to_str


class Lockstep:
    """Training loops advanced one step each in turn on the same batch, each step timed on
    its own (``block_until_ready``) once ``warmup`` steps (compilation) are past.

    Args:
        steps: ``{name: step(*state, *batch) -> new state tuple}``.
        states: ``{name: initial state tuple}``.
        warmup: leading steps left out of the timing.

    Example:
        >>> ls = Lockstep({"masked": m_step, "condensed": c_step}, {"masked": (p, s), ...})
        >>> for x, y in batches:
        ...     ls.step(x, y)
        >>> ls.states["masked"], ls.step_ms()["condensed"]
    """

    def __init__(self, steps: dict[str, Callable], states: dict[str, tuple], warmup: int = 11):
        if set(steps) != set(states):
            raise ValueError(f"steps {sorted(steps)} and states {sorted(states)} differ")
        self.steps, self.states, self.warmup = steps, dict(states), warmup
        self.count = 0
        self.seconds = {name: 0.0 for name in steps}

    def step(self, *batch) -> None:
        for name, fn in self.steps.items():
            t0 = time.perf_counter()
            out = fn(*self.states[name], *batch)
            jax.block_until_ready(out)
            if self.count >= self.warmup:
                self.seconds[name] += time.perf_counter() - t0
            self.states[name] = out
        self.count += 1

    def run(self, batches: Iterable[tuple]) -> None:
        for batch in batches:
            self.step(*batch)

    @property
    def timed_steps(self) -> int:
        return max(self.count - self.warmup, 0)

    def step_ms(self) -> dict[str, float]:
        """Mean milliseconds per timed step of each loop."""
        n = max(self.timed_steps, 1)
        return {name: 1e3 * s / n for name, s in self.seconds.items()}


def mask_agreement(masks: Any, other: Any) -> float:
    """Fraction of entries on which two mask trees agree, over the leaves both have masked
    (``None`` leaves are dense: skipped)."""
    a, b = jax.tree.leaves(masks), jax.tree.leaves(other)
    if len(a) != len(b) or not a:
        raise ValueError(f"mask trees with {len(a)} and {len(b)} masked leaves")
    return float(np.mean(np.concatenate([(np.asarray(x) == np.asarray(y)).ravel()
                                         for x, y in zip(a, b)])))


def tree_bytes(tree: Any, where: str | None = None) -> int:
    """Bytes held by the arrays of a pytree (PRNG keys by their key data); with ``where``
    (a regex), only the leaves whose path (``a/b/c``) it matches."""
    total = 0
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, x in flat:
        if where is not None and not re.search(where, path_to_str(path)):
            continue
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if hasattr(x, "dtype"):
            total += int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
    return total


def machine() -> str:
    return (f"{platform.machine()} {platform.system()}, {jax.device_count()} device(s), "
            f"jax {jax.__version__} {jax.default_backend()}")


def append_records(path, records: list[dict]) -> None:
    """Appends ``records`` (dicts) as JSON lines to ``path``."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def summary_table(rows: list[dict], sparsities, metric: str, label: str, *,
                  scale: float = 1.0, digits: int = 3,
                  loops: tuple[str, ...] = ("masked", "condensed")) -> str:
    """Markdown table of the studies' ``final`` records per sparsity: ``metric`` of the masked
    and condensed runs (mean ± sample std over seeds, times ``scale``), the least mask
    agreement, and the median ms per step of each of ``loops`` (records whose algorithm
    ends with the loop's name)."""
    def pick(s, name, key):
        return [r[key] for r in rows
                if r["sparsity_target"] == s and r["algorithm"].endswith(name)]

    out = [f"| sparsity | masked {label} (mean ± std) | condensed {label} | mask agreement "
           "(min) | " + " | ".join(f"{name} ms/step" for name in loops) + " |",
           "|---|---|---|---|" + "---|" * len(loops)]
    for s in sparsities:
        cells = [fmt_cell(pick(s, name, metric), scale=scale, digits=digits)
                 for name in ("masked", "condensed")]
        cells.append(f"{min(pick(s, 'masked', 'mask_agreement')):.6f}")
        cells += [f"{np.median(pick(s, name, 'step_ms')):.2f}" for name in loops]
        out.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(out)
