"""Pure topology functions: select, drop and grow by score, with traced counts.

Every function here is jit-safe with counts that are traced values (a drop count that follows
a cosine schedule, a target that follows a pruning ramp, a fan-in that changes after neuron
ablation), so a schedule that moves never recompiles.

Selection is exact top-k by *counting*: scores are mapped to order-preserving ``uint32``
keys, and each round counts the keys at or above one pivot (a vectorised pass). The pivot is
interpolated on the counts between the ends of a bracket (regula falsi with the Illinois
safeguard, falling back to the midpoint when the bracket does not halve), and the search
stops as soon as some pivot has exactly k keys above it, so no threshold key has to be pinned
down: a smooth score distribution takes a handful of passes, any input at most ~3 x 32. A
whole-layer selection over >= 16k weights starts from a bracket read off a fixed 2048-key
sample. Keys tied at the threshold are ranked by a second search over distinct
per-position ranks: a keyed bijective hash of the position (given a ``tie_key``, so ties
break at random) or the position itself (earliest first); it ends at once when nothing ties.
Counts are matrix products rather than reductions (below 2**18 entries), and there is no
``lax.cond`` in here: XLA's CPU runtime pays for every reduction, constant and conditional of
a program on each execution, those in an untaken topology branch included (see
:func:`column_counts`). ~50x faster than
``argsort`` for a 784x300 layer on CPU, and it works per neuron (per column) at no extra
cost.
NaN scores rank below every number, -inf included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_U32_MAX = 0xFFFFFFFF


def sortable_key(scores: jax.Array) -> jax.Array:
    """Order-preserving map float -> uint32 (NaN mapped to -inf). Candidate keys are > 0."""
    scores = jnp.asarray(scores, jnp.float32)
    nan = jnp.isnan(scores)
    bits = jax.lax.bitcast_convert_type(jnp.where(nan, -jnp.inf, scores), jnp.uint32)
    negative = (bits >> 31) == 1
    keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
    # -inf maps to 0x007FFFFF; NaN goes strictly below it, and 0 stays free for non-candidates.
    return jnp.where(nan, jnp.uint32(1), keys)


# Sums of 0/1 values below this are exact in float32 in any order.
_EXACT_F32 = 1 << 24
# Column counts of arrays with fewer entries go through a matrix product (see column_counts).
# At 2**18, a 784x300 layer (235k) still does; the crossover measured on CPU with an update
# every 100 steps lies near there (per-pass loss of the product vs per-step reduction cost).
_DOT_MAX_SIZE = 1 << 18


def column_counts(x: jax.Array) -> jax.Array:
    """Number of true (nonzero) entries per column of a 2-D array, as int32.

    A vector-matrix product with a ones vector rather than a reduction, and this matters on
    CPU: on each execution of a program, XLA's CPU client allocates a buffer-table entry for
    every constant and every value of every reducer computation, *those in a ``lax.cond``
    branch that is not taken included*, so each reduction costs every training step ~1 us;
    a topology update holds dozens of counts. The product is exact: 0/1 inputs are exact in
    every input precision (bf16, TF32), and the float32 accumulator holds every integer
    below 2**24. It is ~1.1x the time of the fastest reduction (int16 column sums) on a
    784x300 layer on CPU; arrays of 2**18 entries or more (or taller than 2**24) are
    reduced instead.
    """
    m, s = x.shape
    x = _nonzero(x)
    if m >= _EXACT_F32 or x.size >= _DOT_MAX_SIZE:
        # Large arrays: the reduction's fixed per-step cost is small next to what the
        # product loses per pass (it materialises a float32 copy: ~3x slower whole-layer
        # selections on 3072x768). The narrowest exact accumulator reduces fastest on CPU.
        if s > 1 and m < (1 << 15):
            return jnp.sum(x.astype(jnp.int16), axis=0, dtype=jnp.int16).astype(jnp.int32)
        if m < _EXACT_F32:
            return jnp.sum(x.astype(jnp.float32), axis=0).astype(jnp.int32)
        return jnp.sum(x, axis=0, dtype=jnp.int32)
    return jnp.dot(jnp.ones((m,), jnp.float32), x.astype(jnp.float32),
                   preferred_element_type=jnp.float32).astype(jnp.int32)


def _nonzero(x: jax.Array) -> jax.Array:
    return x if x.dtype == jnp.bool_ else x != jnp.zeros((), x.dtype)


def _tree(v: jax.Array, op) -> jax.Array:
    """``op``-fold of a 1-D vector as a ``(1,)`` array by halving (pad, then
    ``op(v[:h], v[h:])``): slices and elementwise ops that XLA fuses into one loop, with no
    reducer computation (see :func:`column_counts`)."""
    n = v.shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    v = jnp.pad(v, (0, size - n))  # zeros: neutral for + and |
    while v.shape[0] > 1:
        half = v.shape[0] // 2
        v = op(v[:half], v[half:])
    return v


def total(v: jax.Array) -> jax.Array:
    """Sum of a 1-D int32 (or bool) vector as a ``(1,)`` int32 array, without a reduction
    (:func:`_tree`); exact in int32."""
    return _tree(v.astype(jnp.int32), jnp.add)


def count_true(x: jax.Array) -> jax.Array:
    """Number of true (nonzero) entries of ``x`` (any shape) as an int32 scalar: column
    counts of its 2-D view (:func:`column_counts`), added by :func:`total`."""
    x = jnp.asarray(x)
    if x.ndim == 0:
        return _nonzero(x).astype(jnp.int32)
    return total(column_counts(x.reshape(_layer_view(x.shape))))[0]


def float_sum(x: jax.Array) -> jax.Array:
    """Sum of a float array (any shape) as a float32 scalar, by matrix products (see
    :func:`column_counts`); the summation order differs from ``jnp.sum``'s."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
        return x
    rows, cols = _layer_view(x.shape)
    col = jnp.dot(jnp.ones((rows,), jnp.float32), x.reshape(rows, cols),
                  preferred_element_type=jnp.float32)
    return _vsum(col)


def count_per_neuron(x: jax.Array) -> jax.Array:
    """Number of true entries per output neuron (last axis) as int32 ``(n_out,)``."""
    x = jnp.asarray(x)
    return column_counts(x.reshape(-1, x.shape[-1]))


def _vsum(v: jax.Array) -> jax.Array:
    """Sum of a 1-D vector in its own dtype, as a scalar, without a reduction
    (:func:`_tree`)."""
    return _tree(v, jnp.add)[0]


def _any(v: jax.Array) -> jax.Array:
    """``any(v)`` for a 1-D bool vector without a reduction (:func:`_tree`)."""
    return _tree(v, jnp.logical_or)[0]


def _count_ge(keys: jax.Array, pivot: jax.Array, whole: bool, among=None) -> jax.Array:
    """``count(keys >= pivot)`` (only where ``among``, if given) per column of ``keys``
    (m, s), or over all of it when ``whole`` (then ``pivot`` has shape (1,)); int32.

    By :func:`column_counts` (a product below 2**18 entries), then :func:`total`.
    """
    ge = keys >= pivot[None, :]
    if among is not None:
        ge = ge & among
    cols = column_counts(ge)
    return total(cols) if whole else cols


def _coarse(keys: jax.Array) -> jax.Array:
    """``keys >> 8`` as float32: exact (< 2**24) and order-preserving, so min/max reduce in
    vectorised float arithmetic (uint32 min/max reductions are several times slower on CPU)."""
    return (keys >> 8).astype(jnp.float32)


# A whole-layer selection over at least this many keys first brackets its k-th key between
# two order statistics of a fixed strided sample; smaller ones start from their key range.
_SAMPLE_MIN_SIZE = 1 << 14
_SAMPLE_SIZE = 2048


def _sample_bracket(keys, k, lo, hi, c_lo, c_hi):
    """Narrows a whole-layer bracket to two order statistics of a fixed 2048-key sample;
    each end is only taken when a counting pass confirms it (else it stays)."""
    n = keys.size
    pos = (np.arange(_SAMPLE_SIZE, dtype=np.uint64) * 2654435761 % n).astype(np.int32)
    sample = jnp.sort(keys.reshape(-1)[pos])[::-1]  # descending
    r = k[0].astype(jnp.float32) * (_SAMPLE_SIZE / n)
    margin = 4.0 * jnp.sqrt(r + 1.0) + 4.0
    i_hi, i_lo = (r - margin).astype(jnp.int32), (r + margin).astype(jnp.int32)
    s_hi = jnp.where(i_hi < 0, jnp.uint32(_U32_MAX - 1),
                     sample[jnp.clip(i_hi, 0, _SAMPLE_SIZE - 1)]) + jnp.uint32(1)
    s_lo = jnp.where(i_lo >= _SAMPLE_SIZE, jnp.uint32(0),
                     sample[jnp.clip(i_lo, 0, _SAMPLE_SIZE - 1)])
    c_slo = _count_ge(keys, s_lo[None], True)
    c_shi = _count_ge(keys, s_hi[None], True)
    take_lo = (s_lo > lo) & (s_lo < hi) & (c_slo >= k)
    take_hi = (s_hi < hi) & (s_hi > lo) & (c_shi < k)
    return (jnp.where(take_lo, s_lo, lo), jnp.where(take_hi, s_hi, hi),
            jnp.where(take_lo, c_slo, c_lo), jnp.where(take_hi, c_shi, c_hi))


def _search(keys: jax.Array, k: jax.Array, whole: bool, all_valid: bool = False,
            n_valid=None, key_range=None, among=None):
    """A counting bracket around the k-th largest key, per column of ``keys`` (m, s) or,
    when ``whole``, over all of it (then ``k`` and every output have shape (1,)).

    Keys are 0 for non-candidates and >= 1 for candidates (``all_valid``: all are; or give
    their count as ``n_valid``: either saves a counting pass). ``key_range`` ``(lo, hi)``
    bounds the candidate keys (``lo <= key < hi``) and saves the min/max passes. With
    ``among`` (bool, with ``n_valid`` and ``key_range``) the candidates are the positions
    it marks, whatever their keys. Returns ``(lo, hi, c_lo, c_hi, k)`` with ``k`` clipped
    to the candidate count and
    ``c_lo = count(keys >= lo) >= k > c_hi = count(keys >= hi)``, where either
    ``c_lo == k`` (then ``keys >= lo`` is exactly the top k) or ``hi == lo + 1`` (then ``lo``
    is the k-th largest key and ``c_lo - c_hi`` keys tie at it); ``k == 0`` gives
    ``lo = hi = 2**32 - 1``.

    Each round counts the keys at or above one pivot. The pivot interpolates the count
    between the ends (regula falsi over the empirical CDF, with the Illinois halving when one
    end is kept twice), and is the midpoint after two rounds that did not halve the bracket,
    so a smooth score distribution is pinned in a handful of passes and any input in at most
    ~3 x 32. An exact count ends the search early: no threshold key has to be pinned down.
    """
    count = functools.partial(_count_ge, whole=whole, among=among)
    width_s = 1 if whole else keys.shape[1]
    if all_valid:
        n_valid = jnp.full((width_s,), keys.size if whole else keys.shape[0], jnp.int32)
    elif n_valid is None:
        n_valid = count(keys, jnp.ones((width_s,), jnp.uint32))
    k = jnp.minimum(k, n_valid)
    some = k > 0
    sampled = whole and keys.size >= _SAMPLE_MIN_SIZE and key_range is None
    if key_range is not None:
        lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.uint32), (width_s,)) for b in key_range)
    elif sampled:  # the sample gives a tighter start than the key range
        lo, hi = jnp.ones((1,), jnp.uint32), jnp.full((1,), _U32_MAX, jnp.uint32)
    else:
        coarse = _coarse(keys)
        # min and max in one reduction (min x = -max -x, exact on these integers): each
        # reduction costs every step a little on CPU (see column_counts).
        both = jnp.stack([-jnp.where(keys > 0, coarse, jnp.float32(1 << 24)), coarse])
        both = jnp.max(both.reshape(2, -1) if whole else both, axis=1,
                       initial=-float(1 << 24))
        c_min, c_max = -both[0], jnp.maximum(both[1], 0.0)
        lo = jnp.maximum(c_min.astype(jnp.uint32) << 8, jnp.uint32(1))
        # Keys never exceed 0xFF800000 (+inf), so this does not wrap.
        hi = (c_max.astype(jnp.uint32) + jnp.uint32(1)) << 8
    lo = jnp.where(some, lo, jnp.uint32(_U32_MAX))
    hi = jnp.where(some, hi, jnp.uint32(_U32_MAX))
    c_lo = jnp.where(some, n_valid, 0)
    c_hi = jnp.zeros((width_s,), jnp.int32)
    if sampled:
        lo, hi, c_lo, c_hi = _sample_bracket(keys, k, lo, hi, c_lo, c_hi)

    def done(lo, hi, c_lo):
        return (c_lo == k) | (hi - lo <= jnp.uint32(1))

    def f(c):
        return (c - k).astype(jnp.float32)

    def body(carry):
        lo, hi, c_lo, c_hi, f_lo, f_hi, side, slow = carry
        width = hi - lo
        frac = f_lo / jnp.maximum(f_lo - f_hi, 1e-30)
        guess = jnp.floor(frac * width.astype(jnp.float32))
        guess = jnp.clip(guess, 1.0, 4294967040.0).astype(jnp.uint32)  # < 2**32 in f32
        offset = jnp.where(slow >= 2, width >> 1, guess)
        offset = jnp.clip(offset, jnp.uint32(1), jnp.maximum(width, jnp.uint32(2)) - 1)
        pivot = lo + offset
        c = count(keys, pivot)
        active = ~done(lo, hi, c_lo)
        up = active & (c >= k)
        down = active & (c < k)
        lo = jnp.where(up, pivot, lo)
        c_lo = jnp.where(up, c, c_lo)
        hi = jnp.where(down, pivot, hi)
        c_hi = jnp.where(down, c, c_hi)
        # Illinois: the end kept twice in a row has its value halved.
        f_lo = jnp.where(down & (side < 0), 0.5 * f_lo, f(c_lo))
        f_hi = jnp.where(up & (side > 0), 0.5 * f_hi, f(c_hi))
        side = jnp.where(up, 1, jnp.where(down, -1, side))
        slow = jnp.where(active & (hi - lo > (width >> 1)), slow + 1, 0)
        return lo, hi, c_lo, c_hi, f_lo, f_hi, side, slow

    zeros = jnp.zeros((width_s,), jnp.int32)
    lo, hi, c_lo, c_hi, *_ = jax.lax.while_loop(
        lambda c: _any(~done(c[0], c[1], c[2])), body,
        (lo, hi, c_lo, c_hi, f(c_lo), f(c_hi), zeros, zeros))
    return lo, hi, c_lo, c_hi, k


def _unique_ranks(tie_key, shape, whole: bool) -> jax.Array:
    """Distinct uint32 values below 2**31 for the positions of (m, s): a keyed bijective
    hash of the position (mod 2**31) when ``tie_key`` is given, else "earliness" (larger
    for earlier positions: row-major over the whole array, or down each column)."""
    m, s = shape
    row = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
    if tie_key is None:
        if whole:
            return jnp.uint32(m * s - 1) - (row * jnp.uint32(s) + col)
        return jnp.uint32(m - 1) - row
    # Every step below is a bijection of [0, 2**31): xor with a constant, multiplication
    # by an odd constant, xorshift.
    mask = jnp.uint32(0x7FFFFFFF)
    # The key's own bits seed the hash: keys from split / fold_in are already random words,
    # and drawing fresh bits would add a threefry loop (a per-step cost on CPU, see
    # column_counts) for each selection.
    words = jax.random.key_data(tie_key).reshape(-1).astype(jnp.uint32)
    seed = jnp.stack([words[0], words[-1] ^ jnp.uint32(0x5BD1E995)]) & mask
    x = (row * jnp.uint32(s) + col) & mask
    x = ((x ^ seed[0]) * jnp.uint32(0x9E3779B1)) & mask
    x = ((x ^ (x >> 15)) * jnp.uint32(0x85EBCA6B)) & mask
    x = ((x ^ (x >> 13) ^ seed[1]) * jnp.uint32(0xC2B2AE35)) & mask
    return x ^ (x >> 16)


def _select(keys, k, valid, tie_key, whole):
    """Top k of ``keys`` (m, s) among ``valid`` (None: all): per column, or over all of it
    (whole).

    Two counting searches and no ``lax.cond`` (each conditional in a training step's topology
    branch costs every step a few microseconds on CPU, taken or not). The second search ranks
    the keys tied at the threshold by distinct per-position values (a keyed hash, or
    position), and ends at once when nothing ties.
    """
    if keys.size >= (1 << 31):
        raise ValueError(f"selections over >= 2**31 entries are not supported (got shape "
                         f"{keys.shape})")
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, keys.size if whole else keys.shape[0])
    k = jnp.broadcast_to(k, (1,) if whole else (keys.shape[1],))
    if valid is not None:
        keys = jnp.where(valid, keys, jnp.uint32(0))
    lo, hi, c_lo, c_hi, k = _search(keys, k, whole, all_valid=valid is None)
    # Keys in [lo, hi) fill the free slots exactly unless they tie at the threshold.
    above = keys >= hi[None, :]
    tie = (keys >= lo[None, :]) & ~above
    ranks = _unique_ranks(tie_key, keys.shape, whole)
    lo2 = _search(ranks, k - c_hi, whole, n_valid=c_lo - c_hi, key_range=(0, 1 << 31),
                  among=tie)[0]
    return above | (tie & (ranks >= lo2[None, :]))


def _layer_view(shape) -> tuple[int, int]:
    """A 2-D (rows, columns) view of a layer for counting: (fan-in, neurons) when the last
    axis has several entries, else the widest divisor of the size up to 256 as columns."""
    n = int(np.prod(shape))
    if len(shape) >= 2 and shape[-1] > 1:
        return n // shape[-1], shape[-1]
    cols = max([d for d in range(1, 257) if n % d == 0] or [1])
    return n // cols, cols


def top_k_mask(scores, k, *, where=None, tie_key=None) -> jax.Array:
    """Bool mask of the ``k`` highest ``scores`` (over the whole array) among ``where``.

    Args:
      scores: float array of any shape.
      k: int, possibly traced; clipped to [0, scores.size]. Fewer are selected when ``where``
        has fewer than ``k`` candidates.
      where: optional bool array of candidate positions.
      tie_key: optional PRNG key; ties at the threshold are then broken at random (without
        one, by position: the earliest in row-major order win).

    Example:
      >>> top_k_mask(jnp.array([[0.1, 0.9], [0.5, 0.3]]), 2)
      Array([[False,  True], [ True, False]], dtype=bool)
    """
    shape = jnp.shape(scores)
    view = _layer_view(shape)
    keys = sortable_key(scores).reshape(view)
    valid = None if where is None else jnp.reshape(where, view)
    return _select(keys, k, valid, tie_key, whole=True).reshape(shape)


def top_k_per_neuron(scores, k, *, where=None, tie_key=None) -> jax.Array:
    """Per output neuron (last axis), the ``k`` highest scores along its fan-in.

    ``k`` is a scalar or one count per neuron (shape ``(n_out,)``), possibly traced. A Dense
    kernel (in, out) ranks each column; a Conv kernel (h, w, in, out) ranks each output
    channel over h*w*in.
    """
    shape = jnp.shape(scores)
    keys = sortable_key(scores).reshape(-1, shape[-1])
    valid = None if where is None else jnp.reshape(where, keys.shape)
    return _select(keys, k, valid, tie_key, whole=False).reshape(shape)


def drop_lowest(mask, scores, n_drop, *, tie_key=None) -> jax.Array:
    """Removes the ``n_drop`` active positions with the lowest scores.

    Example:
      >>> drop_lowest(mask, jnp.abs(w), 10)   # SET / RigL drop step
    """
    nnz = count_true(mask)
    return top_k_mask(scores, nnz - jnp.asarray(n_drop, jnp.int32), where=mask, tie_key=tie_key)


def grow_highest(mask, scores, n_grow, *, tie_key=None) -> jax.Array:
    """Activates the ``n_grow`` inactive positions with the highest scores."""
    return mask | top_k_mask(scores, n_grow, where=~mask, tie_key=tie_key)


def random_scores(key, shape) -> jax.Array:
    """Uniform [0, 1) scores: random selection through the same top-k path."""
    return jax.random.uniform(key, shape, jnp.float32)


def random_mask(key, shape, nnz) -> jax.Array:
    """A mask with exactly ``nnz`` active positions drawn uniformly at random."""
    return top_k_mask(random_scores(key, shape), nnz)


def random_mask_per_neuron(key, shape, k) -> jax.Array:
    """A mask where every neuron (last axis) has exactly ``k`` random active inputs."""
    return top_k_per_neuron(random_scores(key, shape), k)


def distribute(total, weights, capacities) -> jax.Array:
    """Splits an integer ``total`` over slots in proportion to ``weights``, capped per slot.

    Water-filling: slots that hit their capacity hand their excess to the others; the result
    is integer (largest remainder) and sums to ``min(total, sum(capacities))`` exactly. Zero
    weights everywhere fall back to an even split. This is SNFS's cross-layer redistribution
    of regrowth, and works with traced values.

    Args:
      total: int scalar (traced ok).
      weights: float[L] non-negative.
      capacities: int[L] non-negative.

    Returns:
      int32[L] allocation.
    """
    weights = jnp.asarray(weights, jnp.float32)
    caps = jnp.asarray(capacities, jnp.int32)
    capf = caps.astype(jnp.float32)
    total = jnp.minimum(jnp.asarray(total, jnp.int32), _vsum(caps))
    totalf = total.astype(jnp.float32)
    alloc = jnp.zeros_like(weights)
    for _ in range(weights.shape[0]):
        room = capf - alloc
        open_ = room > 0.5
        w = jnp.where(open_, weights, 0.0)
        w = jnp.where(_vsum(w) > 0, w, open_.astype(jnp.float32))
        share = w / jnp.maximum(_vsum(w), 1e-30) * (totalf - _vsum(alloc))
        alloc = alloc + jnp.clip(share, 0.0, room)
    base = jnp.minimum(jnp.floor(alloc).astype(jnp.int32), caps)
    frac = alloc - base.astype(jnp.float32)
    # Float round-off can overshoot by a unit: take it back from the smallest remainders.
    over = _vsum(base) - total
    base = base - top_k_mask(-frac, over, where=base > 0).astype(jnp.int32)
    # Largest remainder: one more for the slots with the biggest fractional parts ...
    rest = total - _vsum(base)
    base = base + top_k_mask(frac, rest, where=base < caps).astype(jnp.int32)
    # ... and whatever is still missing (underflowing weights) fills free room in slot order.
    rest = total - _vsum(base)
    room = caps - base
    # Exclusive prefix sum, as a product with a strictly upper-triangular matrix.
    n = room.shape[0]
    upper = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]
    before = jnp.dot(room, upper.astype(jnp.int32), preferred_element_type=jnp.int32)
    return base + jnp.clip(rest - before, 0, room)


def _fan_in_groups(x, m: int, what: str = "scores"):
    shape = jnp.shape(x)
    fan_in = int(np.prod(shape[:-1]))
    if fan_in % m:
        raise ValueError(
            f"N:M sparsity needs the fan-in ({fan_in}, shape {tuple(shape)}) to be a multiple "
            f"of M={m}"
        )
    return jnp.reshape(x, (fan_in // m, m, shape[-1]))


def check_nm(n: int, m: int) -> tuple[int, int]:
    """Validates an N:M pattern (0 < N <= M)."""
    if int(n) != n or int(m) != m or not 0 < n <= m:
        raise ValueError(f"N:M sparsity needs integers 0 < N <= M, got N={n!r}, M={m!r}")
    return int(n), int(m)


def nm_mask(scores, n: int, m: int, *, priority=None) -> jax.Array:
    """In every group of ``m`` consecutive weights along the fan-in, the ``n`` best.

    The fan-in is all axes but the last (a Dense kernel's rows; a Conv kernel's h*w*in), so
    NVIDIA's 2:4 pattern is ``nm_mask(scores, 2, 4)``. ``priority`` (bool, optional) ranks
    its positions ahead of all others (N:M RigL keeps its kept weights, then fills the free
    slots by gradient). ``n`` may be traced (gradual N:M pruning). Ties break by position.

    Example:
      >>> nm_mask(jnp.array([[1.0], [4.0], [3.0], [2.0]]), 2, 4)[:, 0]
      Array([False,  True,  True, False], dtype=bool)
    """
    shape = jnp.shape(scores)
    keys = _fan_in_groups(sortable_key(scores), m)
    if priority is None:
        prio = jnp.zeros(keys.shape, bool)
    else:
        prio = _fan_in_groups(jnp.asarray(priority, bool), m)
    idx = jnp.arange(m)
    # beats[g, j, i, o]: does position j outrank position i in its group?
    pj, pi = prio[:, :, None, :], prio[:, None, :, :]
    kj, ki = keys[:, :, None, :], keys[:, None, :, :]
    first = (idx[:, None] < idx[None, :])[None, :, :, None]
    beats = (pj & ~pi) | ((pj == pi) & ((kj > ki) | ((kj == ki) & first)))
    # Summed over the group by m - 1 adds rather than a reduction (see column_counts).
    rank = beats[:, 0].astype(jnp.int32)
    for j in range(1, m):
        rank = rank + beats[:, j].astype(jnp.int32)
    return (rank < jnp.asarray(n, jnp.int32)).reshape(shape)
