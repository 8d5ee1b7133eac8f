"""Pruning at initialisation: SNIP, GraSP and SynFlow scores, and one-shot masks.

The score functions are pure: they take the user's loss or apply function and return a tree
shaped like the params, where **a higher score means a more important weight** (for every
method, so any score tree goes straight into :func:`one_shot_masks`):

* :func:`snip_scores`: ``|g * w|`` on one batch (Lee et al. 2019).
* :func:`grasp_scores`: ``w * (H g)`` with logits divided by a temperature of 200
  (Wang et al. 2020). GraSP's paper score is ``S = -w * (H g)`` and it *removes* the weights
  with the largest ``S``; returning ``-S`` keeps the convention above.
* :func:`synflow_scores`: data-free ``|w * dR/dw|`` with ``R = 1^T (prod_l |W_l|) 1``, the
  network run on an all-ones input with absolute-valued params (Tanaka et al. 2020);
  :func:`synflow_masks` iterates it over 100 rounds with the exponential schedule (round r
  keeps density ``d^(r/R)``), which avoids layer collapse.

:func:`one_shot_masks` turns any score tree into jaxsparse masks at a target sparsity, with
global or layerwise ranking under any distribution (uniform, ER, ERK) and per-layer
overrides; the per-layer counts come from :func:`jaxsparse.distributions.layer_budgets`, so
they are exact. :func:`fixed_masks` wraps an optax optimizer to train with those masks.

References:
  N. Lee, T. Ajanthan, P. Torr, "SNIP: Single-shot Network Pruning based on Connection
  Sensitivity", ICLR 2019.
  C. Wang, G. Zhang, R. Grosse, "Picking Winning Tickets Before Training by Preserving
  Gradient Flow", ICLR 2020.
  H. Tanaka, D. Kunin, D. Yamins, S. Ganguli, "Pruning neural networks without any data by
  iteratively conserving synaptic flow", NeurIPS 2020.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import bitmask, schedules, topology
from jaxsparse.distributions import check_sparsity, layer_budgets, layer_specs, resolve_overrides
from jaxsparse.masks import (
    Masks,
    Prunable,
    PyTree,
    as_predicate,
    is_none,
    map_masked,
    path_to_str,
    validate_masks,
    validate_prunable_masks,
)
from jaxsparse.topology import check_ranking
from jaxsparse.transform import SparsityRule, sparse_transform

__all__ = [
    "fixed_masks",
    "grasp_scores",
    "one_shot_masks",
    "snip_scores",
    "synflow_masks",
    "synflow_scores",
]


def snip_scores(loss_fn: Callable[[PyTree, object], jax.Array], params: PyTree,
                batch) -> PyTree:
    """SNIP connection sensitivity ``|dL/dw * w|`` on one batch.

    Args:
      loss_fn: ``(params, batch) -> scalar loss``.
      params: the initial params.
      batch: one batch of data, passed to ``loss_fn`` as is.

    Returns:
      A tree shaped like ``params`` of non-negative scores.

    Example:
      >>> scores = snip_scores(loss_fn, params, batch)
      >>> masks = one_shot_masks(scores, 0.9)

    Reference: Lee et al., "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity", ICLR 2019.
    """
    grads = jax.grad(loss_fn)(params, batch)
    return jax.tree.map(lambda g, w: jnp.abs(g * w), grads, params)


def _mean_cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def grasp_scores(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    batch: tuple[jax.Array, jax.Array],
    *,
    temperature: float = 200.0,
    loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> PyTree:
    """GraSP keep-scores ``w * (H g)``: weights whose removal least reduces gradient flow.

    With ``L(w) = loss(apply_fn(w, inputs) / temperature, labels)``, ``g = dL/dw`` (held
    fixed) and ``H g`` the Hessian-gradient product (``jax.jvp`` of ``jax.grad``). GraSP
    removes the weights with the largest ``S = -w * (H g)``; this returns ``-S`` so that, as
    for every score here, higher means keep.

    Args:
      apply_fn: ``(params, inputs) -> logits``.
      params: the initial params.
      batch: ``(inputs, labels)``; GraSP samples ~10 examples per class.
      temperature: logits are divided by it (200 in the paper), > 0.
      loss: ``(logits, labels) -> scalar``; default mean softmax cross-entropy with integer
        labels.

    Example:
      >>> scores = grasp_scores(model.apply, params, (images, labels))
      >>> masks = one_shot_masks(scores, 0.9)

    Reference: Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by Preserving
    Gradient Flow", ICLR 2020.
    """
    t = float(temperature)
    if not (np.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    loss = _mean_cross_entropy if loss is None else loss
    inputs, labels = batch

    def objective(p):
        logits = apply_fn(p, inputs)
        return loss(logits / jnp.asarray(t, logits.dtype), labels)

    grad_fn = jax.grad(objective)
    g = jax.lax.stop_gradient(grad_fn(params))
    _, hg = jax.jvp(grad_fn, (params,), (g,))
    return jax.tree.map(lambda w, h: w * h, params, hg)


def synflow_scores(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    input_shape: Sequence[int],
    *,
    masks: Masks | None = None,
    dtype=jnp.float32,
) -> PyTree:
    """SynFlow scores ``|w * dR/dw|`` with ``R = sum(apply_fn(|W| * mask, ones))``.

    No data: the network runs on an all-ones input with every parameter replaced by its
    absolute value (masked weights are zero), so for a ReLU network
    ``R = 1^T (prod_l |W_l|) 1``. Run normalisation layers in inference mode. Float32
    ``R`` can overflow for very deep networks; pass ``dtype=jnp.float64`` with x64 enabled.

    Args:
      apply_fn: ``(params, inputs) -> outputs``.
      params: the params (their signs are ignored).
      input_shape: shape of the all-ones input, batch axis included, e.g. ``(1, 28, 28, 1)``.
      masks: optional current masks (pruned weights are zero in the linearised network).
      dtype: dtype of the computation.

    Example:
      >>> scores = synflow_scores(model.apply, params, (1, 784))

    Reference: Tanaka et al., "Pruning neural networks without any data by iteratively
    conserving synaptic flow", NeurIPS 2020.
    """
    positive = jax.tree.map(lambda w: jnp.abs(jnp.asarray(w, dtype)), params)
    if masks is not None:
        validate_masks(masks, params)
        positive = map_masked(lambda m, w: jnp.where(m, w, jnp.zeros((), w.dtype)),
                              masks, positive)
    ones = jnp.ones(tuple(input_shape), dtype)

    def synaptic_flow(p):
        return jnp.sum(apply_fn(p, ones))

    grads = jax.grad(synaptic_flow)(positive)
    return jax.tree.map(lambda g, w: jnp.abs(g * w), grads, positive)


def _prunable_positions(scores: PyTree, prunable: Prunable):
    pred = as_predicate(prunable)
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
    positions = [i for i, (p, leaf) in enumerate(flat) if pred(path_to_str(p), leaf)]
    if not positions:
        paths = [path_to_str(p) for p, _ in flat]
        raise ValueError(
            f"no prunable leaves in the score tree (leaves: {paths[:8]}); by default only "
            f"leaves named 'kernel'/'weight'/'w' of rank >= 2 are pruned, pass prunable=..."
        )
    return [leaf for _, leaf in flat], treedef, positions


def _where_leaves(where: Masks | None, scores: PyTree, positions):
    """The candidate-mask leaves of ``where`` (``None`` = every weight a candidate), after
    checking each one at a prunable position is a bool array of its score's shape."""
    flat, _ = jax.tree_util.tree_flatten_with_path(scores)
    if where is None:
        return [None] * len(flat)
    leaves = jax.tree.leaves(where, is_leaf=is_none)
    if len(leaves) != len(flat):
        raise ValueError(
            f"where (the candidate masks) must have the structure of the scores: it has "
            f"{len(leaves)} leaves, the scores have {len(flat)}"
        )
    for i in positions:
        c, (p, score) = leaves[i], flat[i]
        if c is None:
            continue
        if getattr(c, "dtype", None) != jnp.bool_ or tuple(np.shape(c)) != np.shape(score):
            raise ValueError(
                f"where[{path_to_str(p)!r}] must be a bool array of shape {np.shape(score)}, "
                f"got {getattr(c, 'dtype', type(c).__name__)} of shape {tuple(np.shape(c))}"
            )
    return leaves


@functools.partial(jax.jit, static_argnames=("positions", "free", "ranking"))
def _select(leaves, positions, candidates, targets, free, ranking):
    """Masks for the prunable positions, keeping ``targets[j]`` per layer (layerwise) or
    ``sum(targets[free])`` over the ``free`` layers together (global)."""
    # Each layer as (scores, candidates), its keys computed where it is read: same-shaped
    # layers share one traced selection, and nothing of the model's size is stored.
    layers = [(leaves[i], candidates[i]) for i in positions]

    def keys(layer, j):
        scores, cand = layer
        return topology.candidate_keys(jnp.asarray(scores, jnp.float32), cand)

    new = topology.top_k_per_layer(keys, layers, [np.shape(s) for s, _ in layers],
                                   [targets[j] for j in range(len(positions))],
                                   shared=free if ranking == "global" else ())
    return [bitmask.unpack(m) for m in new]


def _assemble(treedef, n, positions, new):
    out = [None] * n
    for j, i in enumerate(positions):
        out[i] = new[j]
    return jax.tree.unflatten(treedef, out)


def one_shot_masks(
    scores: PyTree,
    sparsity: float,
    *,
    distribution: str = "uniform",
    ranking: str = "global",
    prunable: Prunable = None,
    overrides: Mapping[str, float] | None = None,
    where: Masks | None = None,
) -> Masks:
    """Masks keeping the highest-scoring weights at ``sparsity``.

    Args:
      scores: tree shaped like the params (from any score function here, or ``|w|``).
      sparsity: target sparsity in [0, 1) over the prunable leaves.
      distribution: ``"uniform"``, ``"er"`` or ``"erk"``: the per-layer budgets. Under
        ``ranking="global"`` only their total matters (one ranking over all layers decides
        the split, as in SNIP/GraSP/SynFlow); under ``"layerwise"`` each layer keeps its
        budget exactly.
      ranking: ``"global"`` or ``"layerwise"``.
      prunable: which leaves are pruned (default: ``kernel``/``weight`` leaves, rank >= 2).
      overrides: ``{path regex: sparsity}``; overridden layers always keep their own budget
        (``0.0`` keeps a layer dense) and are left out of the global ranking.
      where: optional masks of candidates (e.g. the current masks): pruned weights stay
        pruned.

    Returns:
      A mask tree: bool arrays for every prunable leaf, ``None`` elsewhere.

    Raises:
      ValueError: bad sparsity, ranking, distribution or overrides; no prunable leaf.

    Example:
      >>> masks = one_shot_masks(snip_scores(loss_fn, params, batch), 0.95,
      ...                        ranking="layerwise", distribution="erk")
      >>> params = jaxsparse.apply_masks(params, masks)
    """
    check_ranking(ranking)
    check_sparsity(sparsity)
    leaves, treedef, positions = _prunable_positions(scores, prunable)
    specs = layer_specs(scores, prunable)
    budgets = layer_budgets(specs, sparsity, distribution, overrides)
    fixed = resolve_overrides(specs, overrides)
    free = [j for j, s in enumerate(specs) if s.path not in fixed]
    targets = jnp.asarray([budgets[s.path] for s in specs], jnp.int32)
    candidates = _where_leaves(where, scores, positions)
    new = _select(leaves, tuple(positions), candidates, targets, tuple(free), ranking)
    return _assemble(treedef, len(leaves), positions, new)


def _synflow_rounds(init, params, targets, apply_fn, input_shape, dtype, treedef, positions,
                    free, ranking):
    """The SynFlow rounds as one ``fori_loop``: round ``r`` rescores the network with the
    current masks and keeps ``targets[r]`` weights among the still active ones."""
    n = treedef.num_leaves

    def body(r, layer_masks):
        masks = _assemble(treedef, n, positions, list(layer_masks))
        scores = synflow_scores(apply_fn, params, input_shape, masks=masks, dtype=dtype)
        score_leaves = jax.tree.leaves(scores)
        candidates = [None] * n
        for j, i in enumerate(positions):
            candidates[i] = layer_masks[j]
        return tuple(_select(score_leaves, positions, candidates, targets[r], free, ranking))

    return jax.lax.fori_loop(0, targets.shape[0], body, init)


_synflow_rounds_jit = jax.jit(_synflow_rounds, static_argnums=tuple(range(3, 10)))


def synflow_masks(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    input_shape: Sequence[int],
    sparsity: float,
    *,
    rounds: int = 100,
    distribution: str = "uniform",
    ranking: str = "global",
    prunable: Prunable = None,
    overrides: Mapping[str, float] | None = None,
    dtype=jnp.float32,
) -> Masks:
    """Iterative SynFlow: ``rounds`` rounds of scoring and pruning, round ``r`` keeping
    density ``d^(r / rounds)`` with ``d = 1 - sparsity`` (exactly ``sparsity`` at the end).

    Each round rescores the network with the current masks and prunes among the still
    active weights. The loop runs in one compiled ``lax.fori_loop``; the per-round per-layer
    counts come from :func:`jaxsparse.distributions.layer_budgets`.

    Args:
      apply_fn, params, input_shape, dtype: as in :func:`synflow_scores`.
      sparsity: final sparsity in [0, 1).
      rounds: number of rounds (100 in the paper), >= 1.
      distribution, ranking, prunable, overrides: as in :func:`one_shot_masks`.

    Example:
      >>> masks = synflow_masks(model.apply, params, (1, 784), 0.99)

    Reference: Tanaka et al., NeurIPS 2020 (Algorithm 1).
    """
    check_ranking(ranking)
    sparsity = check_sparsity(sparsity)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    leaves, treedef, positions = _prunable_positions(params, prunable)
    specs = layer_specs(params, prunable)
    fixed = resolve_overrides(specs, overrides)
    free = [j for j, s in enumerate(specs) if s.path not in fixed]
    density = 1.0 - sparsity
    table = []
    for r in range(1, rounds + 1):
        s_r = sparsity if r == rounds else 1.0 - density ** (r / rounds)
        budgets = layer_budgets(specs, s_r, distribution, overrides)
        table.append([budgets[s.path] for s in specs])
    targets = jnp.asarray(table, jnp.int32)
    static = (apply_fn, tuple(int(d) for d in input_shape), dtype, treedef, tuple(positions),
              tuple(free), ranking)
    # Params and targets are arguments, not constants baked into the compiled loop.
    init = tuple(jnp.ones(jnp.shape(leaves[i]), bool) for i in positions)
    try:
        hash(static)
    except TypeError:  # an unhashable apply_fn: compile for this call only
        final = jax.jit(lambda i, p, t: _synflow_rounds(i, p, t, *static))(init, params, targets)
    else:  # compiled once per model and settings, reused by later calls (e.g. a sweep)
        final = _synflow_rounds_jit(init, params, targets, *static)
    return _assemble(treedef, len(leaves), positions, list(final))


def fixed_masks(inner: optax.GradientTransformation, masks: Masks,
                ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` to train with the given, never-changing ``masks`` (pruning at init,
    lottery-ticket retraining): params stay exactly zero outside the masks after every step.

    Example:
      >>> tx = fixed_masks(optax.sgd(0.1, 0.9), masks)
      >>> state = tx.init(jaxsparse.apply_masks(params, masks))
    """

    def init_masks(params, key):
        del key
        validate_prunable_masks(masks, params)
        return masks

    rule = SparsityRule(
        init_masks=init_masks,
        is_update_step=schedules.never,
        update_masks=lambda x: x.masks,
    )
    return sparse_transform(inner, rule, key=jax.random.key(0), track_itop=False)
