"""One-shot pruning of one trained linear layer: magnitude, Wanda and SparseGPT.

Every function here works on a single Flax ``Dense`` kernel of shape ``(d_in, d_out)`` and
returns a :class:`LayerResult` (the new kernel, exactly zero outside the mask, and the bool
mask). An output neuron is a *column* of the kernel (a "row" ``W_i`` in the papers, which write
``y = W x``), so "per output row" selections rank each column along the fan-in, through
:func:`jaxsparse.topology.top_k_per_neuron`; N:M patterns group ``m`` consecutive inputs
through :func:`jaxsparse.topology.nm_mask` (2:4 keeps 2 of every 4).

The data-aware methods read :class:`InputStats`, sums over the calibration rows ``x`` (the
layer's inputs, flattened to ``(rows, d_in)``) that :func:`input_stats` builds and
:func:`add_stats` accumulates, so memory is one layer's statistics whatever the amount of
calibration data:

* magnitude: score ``|W_ij|`` (no data);
* Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
  Models"): score ``|W_ij| * ||X_j||_2``, compared within each output neuron; no weight update;
* SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"): ``H = 2 X^T X / rows + damp * I`` with ``damp = percdamp * mean
  diag(H)``; inputs are visited in blocks of ``blocksize``; in each block the mask is chosen by
  ``w^2 / [U]_jj^2`` with ``U`` the upper Cholesky factor of ``H^-1``, then each pruned weight's
  error is propagated to the not-yet-visited weights of its neuron (the OBS update, applied
  lazily: within the block at once, to the later blocks by one matrix product per block).
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse import topology

_HIGHEST = lax.Precision.HIGHEST


class InputStats(NamedTuple):
    """Sums over the calibration rows ``x`` (float32[rows, d_in]) a layer has seen.

    Attributes:
      gram: ``float32[d_in, d_in]``, ``sum x^T x`` (SparseGPT's Hessian up to 2 / rows), or
        ``None`` when only the column norms are needed (Wanda).
      sq_norms: ``float32[d_in]``, ``sum x_j^2`` per input feature (``||X_j||_2^2``).
      count: ``float32[]``, number of rows summed.
    """

    gram: jax.Array | None
    sq_norms: jax.Array
    count: jax.Array


class LayerResult(NamedTuple):
    """A pruned kernel (``where(mask, ., 0)`` exactly) and its bool mask, both (d_in, d_out)."""

    kernel: jax.Array
    mask: jax.Array


class Pattern(NamedTuple):
    """What to keep: ``sparsity`` (fraction pruned per output neuron) or ``nm=(n, m)``."""

    sparsity: float | None
    nm: tuple[int, int] | None


def pattern(sparsity: float | None = None, nm: tuple[int, int] | None = None) -> Pattern:
    """Validates a sparsity target: exactly one of ``sparsity`` in [0, 1) or ``nm=(n, m)``."""
    if (sparsity is None) == (nm is None):
        raise ValueError(
            f"give exactly one of sparsity= (unstructured) or nm=(n, m); got sparsity="
            f"{sparsity!r}, nm={nm!r}"
        )
    if nm is not None:
        if len(tuple(nm)) != 2:
            raise ValueError(f"nm must be a pair (n, m) such as (2, 4), got {nm!r}")
        return Pattern(None, topology.check_nm(*nm))
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return Pattern(float(sparsity), None)


def kept_per_neuron(d_in: int, sparsity: float) -> int:
    """Weights each output neuron keeps at ``sparsity``: ``d_in - round(sparsity * d_in)``
    (half rounds up), the count every method here keeps."""
    return d_in - int(np.floor(sparsity * d_in + 0.5))


def check_layer(kernel, pat: Pattern, name: str = "kernel") -> None:
    """Raises ``ValueError`` naming ``name`` when the kernel cannot take the pattern."""
    shape = tuple(np.shape(kernel))
    if len(shape) != 2:
        raise ValueError(
            f"layer {name!r}: one-shot pruning works on 2-D Dense kernels (d_in, d_out), got "
            f"shape {shape}; leave this leaf out with prunable="
        )
    if pat.nm is not None and shape[0] % pat.nm[1]:
        raise ValueError(
            f"layer {name!r}: N:M {pat.nm[0]}:{pat.nm[1]} needs the input dimension "
            f"({shape[0]}, kernel shape {shape}) to be a multiple of M={pat.nm[1]}"
        )


def input_stats(x: jax.Array, with_gram: bool = True) -> InputStats:
    """The statistics of one batch of a layer's inputs ``x`` (``(..., d_in)``, any float)."""
    x = jnp.reshape(x, (-1, jnp.shape(x)[-1])).astype(jnp.float32)
    gram = jnp.dot(x.T, x, precision=_HIGHEST) if with_gram else None
    sq = jnp.sum(x * x, axis=0)
    return InputStats(gram, sq, jnp.asarray(x.shape[0], jnp.float32))


def add_stats(a: InputStats | None, b: InputStats) -> InputStats:
    """``a + b`` leaf by leaf (``a`` may be ``None``: the first batch)."""
    if a is None:
        return b
    gram = None if a.gram is None else a.gram + b.gram
    return InputStats(gram, a.sq_norms + b.sq_norms, a.count + b.count)


@functools.partial(jax.jit, static_argnums=1)
def _select(scores, pat: Pattern) -> jax.Array:
    if pat.nm is not None:
        return topology.nm_mask(scores, *pat.nm)
    return topology.top_k_per_neuron(scores, kept_per_neuron(scores.shape[0], pat.sparsity))


def _masked_impl(kernel, mask) -> LayerResult:
    return LayerResult(jnp.where(mask, kernel, jnp.zeros((), kernel.dtype)), mask)


_masked = jax.jit(_masked_impl)
_masked_in_place = jax.jit(_masked_impl, donate_argnums=0)  # for a kernel of our own


def magnitude_layer(kernel: jax.Array, *, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, name: str = "kernel") -> LayerResult:
    """Keeps the largest ``|W|`` of every output neuron (or of every N:M group).

    Example:
      >>> kernel, mask = magnitude_layer(params["Dense_0"]["kernel"], nm=(2, 4))
    """
    pat = pattern(sparsity, nm)
    check_layer(kernel, pat, name)
    return _masked(kernel, _select(jnp.abs(kernel), pat))


def wanda_scores(kernel: jax.Array, stats: InputStats) -> jax.Array:
    """Wanda's ``|W_ij| * ||X_j||_2`` for a (d_in, d_out) kernel (``j`` indexes the inputs)."""
    norms = jnp.sqrt(stats.sq_norms)
    return jnp.abs(kernel).astype(jnp.float32) * norms[:, None]


def wanda_layer(kernel: jax.Array, stats: InputStats, *, sparsity: float | None = None,
                nm: tuple[int, int] | None = None, name: str = "kernel") -> LayerResult:
    """Wanda (Sun et al. 2024): keeps the top ``|W_ij| * ||X_j||_2`` per output neuron.

    Example:
      >>> stats = input_stats(x)                       # x: the layer's inputs (rows, d_in)
      >>> kernel, mask = wanda_layer(kernel, stats, sparsity=0.5)
    """
    pat = pattern(sparsity, nm)
    check_layer(kernel, pat, name)
    _check_stats(stats, kernel, name, need_gram=False)
    return _masked(kernel, _select(wanda_scores(kernel, stats), pat))


def _check_stats(stats: InputStats, kernel, name: str, need_gram: bool) -> None:
    d_in = np.shape(kernel)[0]
    if float(stats.count) <= 0:
        raise ValueError(f"layer {name!r}: no calibration rows reached this layer")
    if np.shape(stats.sq_norms) != (d_in,):
        raise ValueError(
            f"layer {name!r}: statistics for {np.shape(stats.sq_norms)[0]} inputs but the "
            f"kernel has d_in={d_in}"
        )
    if need_gram and stats.gram is None:
        raise ValueError(f"layer {name!r}: SparseGPT needs input_stats(x, with_gram=True)")
    leaves = [stats.sq_norms] + ([stats.gram] if need_gram else [])
    if not all(bool(jnp.all(jnp.isfinite(v))) for v in leaves):
        raise ValueError(f"layer {name!r}: the calibration inputs contain inf or nan")


def _hessian_impl(gram, count):
    h = 2.0 * gram / count
    dead = jnp.diagonal(h) == 0
    eye = jnp.eye(h.shape[0], dtype=bool)
    return jnp.where(eye & dead[:, None], jnp.ones((), h.dtype), h), dead


_hessian = jax.jit(_hessian_impl)
# The same, writing H over the gram matrix's buffer (the caller gives the statistics up).
_hessian_in_place = jax.jit(_hessian_impl, donate_argnums=0)


@jax.jit
def _reversed_cholesky(h, damp):
    """``M^T``, ``M`` lower with ``J (h + damp I) J = M M^T`` (``J`` reverses the order; nan
    when ``h + damp I`` is not positive definite).

    Returned transposed: LAPACK leaves ``M`` column-major, which is ``M^T`` row-major, so
    :func:`_factor_from_cholesky` hands it back to LAPACK without a layout copy.
    """
    n = h.shape[0]
    h = h + damp * jnp.eye(n, dtype=h.dtype)
    return jnp.linalg.cholesky(h[::-1, ::-1]).T


@functools.partial(jax.jit, donate_argnums=0)
def _factor_from_cholesky(m_t):
    """Upper ``U = J M^-1 J`` from :func:`_reversed_cholesky`'s ``M^T`` (donated).

    ``(h + damp I)^-1 = J M^-T M^-1 J = U^T U``, ``U`` upper triangular with a positive
    diagonal: one Cholesky and one triangular inverse, with no explicit inverse to factor
    again. Split from the Cholesky so that ``h`` is freed before the inverse is formed; with
    ``M`` in LAPACK's layout and the result written over it, this step holds two
    ``d_in^2`` matrices (the same arithmetic as one jit of both steps, bit for bit).
    """
    n = m_t.shape[0]
    m_inv = jax.scipy.linalg.solve_triangular(m_t.T, jnp.eye(n, dtype=m_t.dtype), lower=True)
    return m_inv[::-1, ::-1]


def _inverse_factor(h, damp):
    """Upper ``U`` with ``(h + damp I)^-1 = U^T U`` (nan when not positive definite); see
    :func:`_factor_from_cholesky`."""
    return _factor_from_cholesky(_reversed_cholesky(h, damp))


def sparsegpt_factor(stats: InputStats, percdamp: float = 0.01, name: str = "kernel",
                     max_retries: int = 4, *, donate: bool = False):
    """SparseGPT's ``U`` (upper Cholesky factor of the damped ``H^-1``) and the dead inputs.

    ``H = 2 X^T X / rows``; inputs that are zero on every calibration row ("dead") get
    ``H_jj = 1``; ``damp = percdamp * mean diag(H)`` is added to the diagonal. When the
    factorisation still fails (``H`` numerically singular), the damping is raised tenfold, up
    to ``max_retries`` times, with a warning naming the layer.

    ``donate=True`` builds ``H`` in the buffer of ``stats.gram``, which is deleted (one
    ``d_in^2`` matrix less at the peak; :func:`jaxsparse.oneshot.prune` does this).

    Returns:
      ``(U float32[d_in, d_in], dead bool[d_in])``.
    """
    h, dead = (_hessian_in_place if donate else _hessian)(stats.gram, stats.count)
    n_dead = int(jnp.sum(dead))
    if n_dead:
        warnings.warn(
            f"layer {name!r}: {n_dead} of {dead.shape[0]} inputs are zero on all calibration "
            "rows (dead); their Hessian diagonal is set to 1 and their weights are pruned "
            "first", stacklevel=3)
    mean_diag = float(jnp.mean(jnp.diagonal(h)))
    damp = percdamp * mean_diag
    for attempt in range(max_retries + 1):
        m = _reversed_cholesky(h, jnp.float32(damp))
        if bool(jnp.all(jnp.isfinite(m))):
            if attempt:
                warnings.warn(
                    f"layer {name!r}: the Hessian is singular at percdamp={percdamp}; "
                    f"dampened with {damp / mean_diag:.3g} * mean diag(H) instead",
                    stacklevel=3)
            del h  # the factor needs only M: one d_in^2 matrix less while it is formed
            return _factor_from_cholesky(m), dead
        del m
        damp = 10.0 * damp if damp > 0 else 1e-6 * max(mean_diag, 1.0)
    raise ValueError(
        f"layer {name!r}: the Hessian is not positive definite even with damping "
        f"{damp / 10.0:.3g} (percdamp={percdamp}); check the calibration inputs"
    )


def block_counts(d_in: int, sparsity: float, blocksize: int) -> np.ndarray:
    """Kept weights per neuron in each block of ``blocksize`` inputs: the cumulative count
    ``kept_per_neuron(e)`` at each block end, differenced, so the blocks add up exactly."""
    ends = np.minimum(np.arange(1, -(-d_in // blocksize) + 1) * blocksize, d_in)
    kept = np.array([0] + [kept_per_neuron(int(e), sparsity) for e in ends])
    return np.diff(kept).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("blocksize", "nm"), donate_argnums=0)
def _sparsegpt_solve(kernel, u, block_keep, valid, *, blocksize: int, nm):
    """The blocked lazy OBS sweep over a (d, d_out) kernel, d a multiple of ``blocksize``
    (``kernel`` is donated: the sweep runs in its buffer).

    ``u``: upper Cholesky factor of H^-1 (d, d); ``block_keep``: int32[d // blocksize]
    weights kept per neuron in each block (unstructured); ``valid``: bool[d], False on rows
    added as padding (never selected, never counted).
    """
    d, d_out = kernel.shape
    rows = jnp.arange(d)
    group = 1 if nm is None else nm[1]

    def block(b, carry):
        w, mask = carry
        i1 = b * blocksize
        w1 = lax.dynamic_slice(w, (i1, 0), (blocksize, d_out))
        u1 = lax.dynamic_slice(u, (i1, i1), (blocksize, blocksize))
        scale = jnp.diagonal(u1)[:, None] ** 2
        if nm is None:
            v1 = lax.dynamic_slice(valid, (i1,), (blocksize,))
            m1 = topology.top_k_per_neuron(
                w1 * w1 / scale, block_keep[b], where=jnp.broadcast_to(v1[:, None], w1.shape))
        else:
            m1 = jnp.zeros(w1.shape, bool)
        e1 = jnp.zeros_like(w1)

        def one_group(g, c):
            w1, m1, e1 = c
            j0 = g * group
            if nm is not None:
                # The N:M choice of a group sees the updates of every input before it.
                wg = lax.dynamic_slice(w1, (j0, 0), (group, d_out))
                sg = lax.dynamic_slice(scale, (j0, 0), (group, 1))
                m1 = lax.dynamic_update_slice(m1, topology.nm_mask(wg * wg / sg, *nm), (j0, 0))
            for t in range(group):
                j = j0 + t
                wj = lax.dynamic_index_in_dim(w1, j, keepdims=False)
                mj = lax.dynamic_index_in_dim(m1, j, keepdims=False)
                err = (wj - jnp.where(mj, wj, 0.0)) / u1[j, j]
                # U is upper triangular: row j of U touches inputs j.. of the block only.
                w1 = w1 - u1[j][:, None] * err[None, :]
                e1 = lax.dynamic_update_index_in_dim(e1, err, j, 0)
            return w1, m1, e1

        w1, m1, e1 = lax.fori_loop(0, blocksize // group, one_group, (w1, m1, e1))
        w = lax.dynamic_update_slice(w, jnp.where(m1, w1, 0.0), (i1, 0))
        mask = lax.dynamic_update_slice(mask, m1, (i1, 0))
        # Lazy update of all later inputs from this block's errors.
        u_rows = lax.dynamic_slice(u, (i1, 0), (blocksize, d))
        later = (rows >= i1 + blocksize)[:, None]
        w = w - jnp.where(later, jnp.dot(u_rows.T, e1, precision=_HIGHEST), 0.0)
        return w, mask

    init = (kernel, jnp.zeros(kernel.shape, bool))
    return lax.fori_loop(0, d // blocksize, block, init)


def sparsegpt_layer(kernel: jax.Array, stats: InputStats, *, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, percdamp: float = 0.01,
                    blocksize: int = 128, name: str = "kernel",
                    donate_stats: bool = False) -> LayerResult:
    """SparseGPT (Frantar & Alistarh 2023) on one (d_in, d_out) kernel.

    Selects the mask block by block by ``w^2 / [H^-1]_jj`` (per output neuron: each neuron
    keeps :func:`kept_per_neuron` weights, spread over the blocks by :func:`block_counts`; or
    N:M, each group of ``m`` inputs chosen when the sweep reaches it) and reconstructs the
    kept weights with the OBS update, so the layer's output on the calibration rows changes
    as little as the sequential sweep allows. Computes in float32; returns the kernel's dtype.

    Args:
      kernel: (d_in, d_out) trained weights.
      stats: :func:`input_stats` of the layer's calibration inputs, with the gram matrix.
      sparsity: fraction of each neuron's inputs to prune, in [0, 1); or
      nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs (``d_in % m == 0``).
      percdamp: diagonal damping as a fraction of the mean Hessian diagonal (paper: 0.01).
      blocksize: inputs per lazy-update block (paper: 128); a multiple of ``m`` for N:M.
      name: the layer's name in warnings and errors.
      donate_stats: reuse ``stats.gram``'s buffer for the Hessian (``stats`` is consumed:
        its gram matrix is deleted); saves one ``d_in^2`` float32 matrix at the peak.

    Example:
      >>> stats = input_stats(x)           # x: the layer's inputs, (rows, d_in)
      >>> kernel, mask = sparsegpt_layer(kernel, stats, nm=(2, 4))
    """
    pat = pattern(sparsity, nm)
    check_layer(kernel, pat, name)
    _check_stats(stats, kernel, name, need_gram=True)
    d_in, d_out = kernel.shape
    if int(blocksize) != blocksize or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if pat.nm is not None and blocksize % pat.nm[1]:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of M={pat.nm[1]} for N:M")
    u, dead = sparsegpt_factor(stats, percdamp, name, donate=donate_stats)
    del stats
    w = jnp.where(dead[:, None], 0.0, kernel.astype(jnp.float32))
    bs = min(int(blocksize), d_in)  # for N:M both are multiples of m
    pad = -d_in % bs
    if pad:
        # Padded inputs: zero weights, identity Hessian rows (no coupling), never selected.
        w = jnp.pad(w, ((0, pad), (0, 0)))
        u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
            jnp.concatenate([jnp.zeros(d_in), jnp.ones(pad)]).astype(jnp.float32))
    valid = jnp.arange(d_in + pad) < d_in
    keep = (block_counts(d_in, pat.sparsity, bs) if pat.nm is None
            else np.zeros(((d_in + pad) // bs,), np.int32))
    new, mask = _sparsegpt_solve(w, u, jnp.asarray(keep), valid, blocksize=bs, nm=pat.nm)
    del w, u
    if pad:
        new, mask = new[:d_in], mask[:d_in]
    return _masked_in_place(new.astype(kernel.dtype), mask)
