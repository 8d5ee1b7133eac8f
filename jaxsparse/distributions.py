"""Per-layer sparsity budgets: uniform, Erdos-Renyi (ER) and Erdos-Renyi-Kernel (ERK).

All functions are host-side (shapes are static) and return exact integer budgets, the number
of active weights per prunable leaf.

* ``uniform``: every prunable leaf at ``sparsity``; overridden leaves at their own value.
  (The RigL code base also keeps the first layer dense under uniform; here that is an explicit
  override, ``overrides={"Dense_0": 0.0}``.)
* ``er`` / ``erk``: density_l = eps * score_l with ER score (n_in + n_out) / (n_in * n_out)
  (the last two kernel dims) and ERK score sum(shape) / prod(shape) (all dims, incl. h, w).
  eps is solved from the global budget ``(1 - sparsity) * sum_l N_l``; overridden leaves keep
  their own count and are moved to the other side of the equation; while a leaf would exceed
  density 1 it is made dense and eps is solved again. Budgets are rounded with the largest
  remainder method, so the total equals ``round((1 - sparsity) * N_total)`` exactly.

Reference: Evci et al. 2020, "Rigging the Lottery" (ERK); Mocanu et al. 2018 (ER).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from jaxsparse.masks import Prunable, PyTree, as_predicate, compile_regex, path_to_str

DISTRIBUTIONS = ("uniform", "er", "erk")


class LayerSpec(NamedTuple):
    """A prunable leaf: its path string and static shape."""

    path: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def check_sparsity(value, name: str = "sparsity") -> float:
    """Validates a sparsity in [0, 1) and returns it as a float.

    Raises:
      TypeError: ``value`` is not a number (strings and bools are refused, not parsed).
      ValueError: ``value`` is outside [0, 1) or NaN.
    """
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= v < 1.0) or math.isnan(v):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v


def check_spec(spec: LayerSpec) -> LayerSpec:
    """Refuses a prunable leaf that has no weights to prune, naming it.

    A scalar has no fan-in or fan-out (ER's score is undefined) and a zero-size array (a
    kernel with 0 input or output features) has no weights to distribute a budget over.

    Raises:
      ValueError: ``spec`` is a scalar or has a zero dimension.
    """
    if len(spec.shape) == 0:
        raise ValueError(
            f"prunable leaf {spec.path!r} is a scalar; only arrays of rank >= 1 can be "
            f"pruned: exclude it with prunable="
        )
    if spec.size == 0:
        if len(spec.shape) == 1:
            what = "no entries"
        elif spec.shape[-1] == 0:
            what = "0 output features"
        else:
            what = "0 input features"
        raise ValueError(
            f"prunable leaf {spec.path!r} has shape {spec.shape} ({what}): it has no weights "
            f"to prune; exclude it with prunable= or give the layer a nonzero size"
        )
    return spec


def layer_specs(params: PyTree, prunable: Prunable = None) -> list[LayerSpec]:
    """The prunable leaves of ``params`` in flattening order.

    Args:
      params: the params tree (arrays or ``jax.ShapeDtypeStruct`` leaves).
      prunable: which leaves are pruned (see :data:`jaxsparse.masks.Prunable`); the default
        selects floating-point ``kernel``/``weight``/``w`` leaves of rank >= 2.

    Raises:
      ValueError: a selected leaf is a scalar or has a zero dimension.
      TypeError: an explicit ``prunable`` selects a bool or integer leaf.
    """
    import jax

    pred = as_predicate(prunable)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    specs = []
    for p, leaf in flat:
        path = path_to_str(p)
        if pred(path, leaf):
            specs.append(check_spec(LayerSpec(path, tuple(int(d) for d in np.shape(leaf)))))
    return specs


def resolve_overrides(
    specs: list[LayerSpec], overrides: Mapping[str, float] | None
) -> dict[str, float]:
    """Maps each overridden path to its sparsity; errors name the offending pattern."""
    resolved: dict[str, float] = {}
    if not overrides:
        return resolved
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides must be a mapping {{path regex: sparsity}}, got {type(overrides).__name__}"
        )
    for pattern, value in overrides.items():
        s = check_sparsity(value, name=f"overrides[{pattern!r}]")
        if not isinstance(pattern, (str, re.Pattern)):
            raise TypeError(f"overrides keys must be path regex strings, got {pattern!r}")
        rx = compile_regex(pattern, "overrides")
        hits = [spec.path for spec in specs if rx.search(spec.path)]
        if not hits:
            raise ValueError(
                f"override {pattern!r} matches no prunable leaf; prunable leaves are "
                f"{[spec.path for spec in specs]}"
            )
        for h in hits:
            if h in resolved:
                raise ValueError(f"leaf {h!r} is matched by more than one override pattern")
            resolved[h] = s
    return resolved


def _score(shape: tuple[int, ...], distribution: str) -> float:
    if distribution == "erk":
        return sum(shape) / float(np.prod(shape))
    n_in, n_out = (shape[-2], shape[-1]) if len(shape) >= 2 else (shape[-1], 1)
    return (n_in + n_out) / float(n_in * n_out)


def _largest_remainder(targets: dict[str, float], total: int, caps: dict[str, int]):
    floors = {k: min(int(math.floor(v)), caps[k]) for k, v in targets.items()}
    rest = total - sum(floors.values())
    order = sorted(targets, key=lambda k: (-(targets[k] - math.floor(targets[k])), k))
    for k in order:
        if rest <= 0:
            break
        if floors[k] < caps[k]:
            floors[k] += 1
            rest -= 1
    return floors


def layer_budgets(
    specs: list[LayerSpec],
    sparsity: float,
    distribution: str = "erk",
    overrides: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Number of active weights for each prunable leaf.

    Args:
      specs: prunable leaves, from :func:`layer_specs`.
      sparsity: global target sparsity in [0, 1) over the prunable leaves.
      distribution: ``"uniform"``, ``"er"`` or ``"erk"``.
      overrides: ``{path regex: sparsity}``; ``0.0`` keeps matched leaves dense.

    Returns:
      ``{path: nnz}`` for every spec.

    Example:
      >>> specs = layer_specs(params)
      >>> layer_budgets(specs, 0.9, "erk", overrides={"Dense_0": 0.0})
    """
    sparsity = check_sparsity(sparsity)
    for spec in specs:
        check_spec(spec)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    fixed_s = resolve_overrides(specs, overrides)
    budgets: dict[str, int] = {}
    for spec in specs:
        if spec.path in fixed_s:
            budgets[spec.path] = int(round((1.0 - fixed_s[spec.path]) * spec.size))
    free = [s for s in specs if s.path not in fixed_s]

    if distribution == "uniform":
        for spec in free:
            budgets[spec.path] = int(round((1.0 - sparsity) * spec.size))
    elif free:
        n_total = sum(s.size for s in specs)
        total = int(round((1.0 - sparsity) * n_total))
        fixed_total = sum(budgets.values())
        dense: set[str] = set()
        while True:
            rhs = total - fixed_total - sum(s.size for s in free if s.path in dense)
            live = [s for s in free if s.path not in dense]
            if not live:
                break
            divisor = sum(_score(s.shape, distribution) * s.size for s in live)
            eps = rhs / divisor
            over = [s.path for s in live if eps * _score(s.shape, distribution) > 1.0]
            if not over:
                break
            dense.update(over)
        if rhs < 0:
            raise ValueError(
                f"the overrides {dict(fixed_s)} need {fixed_total} active weights, more than "
                f"the global budget of {total} at sparsity {sparsity}"
            )
        targets = {s.path: float(s.size) for s in free if s.path in dense}
        targets.update({s.path: eps * _score(s.shape, distribution) * s.size for s in live})
        caps = {s.path: s.size for s in free}
        budgets.update(_largest_remainder(targets, total - fixed_total, caps))

    for spec in specs:
        if budgets[spec.path] <= 0:
            density = budgets[spec.path] / spec.size
            raise ValueError(
                f"layer {spec.path!r} (shape {spec.shape}) would keep no weights at density "
                f"{density:.3g} under distribution={distribution!r}, sparsity={sparsity}; "
                f"lower the sparsity or override this layer"
            )
    return {spec.path: budgets[spec.path] for spec in specs}


def budget_sparsities(specs: list[LayerSpec], budgets: Mapping[str, int]) -> dict[str, float]:
    """Per-leaf sparsity implied by integer budgets."""
    return {s.path: 1.0 - budgets[s.path] / s.size for s in specs}
