"""Pure topology functions: select, drop and grow by score, with traced counts.

**The rule.** Every selection keeps the ``k`` highest scores; scores tied at the threshold
go to the positions with the higher *tie rank*, a distinct number per position: a keyed
bijective hash of the position when a ``tie_key`` is given (ties broken at random, the
RigL/SRigL convention), else earliness (row-major over a whole array, top to bottom within a
neuron). NaN ranks below every number, -inf included. ``k`` may be a traced value (a drop
count on a cosine schedule, a pruning target, a fan-in that moves after neuron ablation), so
a schedule never recompiles a training step.

**Two implementations of the rule**, equal bit for bit (property-tested):

* :func:`select_by_sorting`, the reference: sort the keys; the k-th largest is the
  threshold, and the ranks of the keys tied at it are sorted when the threshold splits
  them. It states the rule and is the default on GPU and TPU, whose sorts are fast.
* :func:`select_by_counting`: finds the k-th key by counting the keys at or above a pivot
  (one fused compare-and-sum pass each), the pivot interpolated inside a bracket
  (quadratic or secant, see :func:`_search`); then the same search over tie ranks
  among the keys tied at the threshold. No sort: ~50x faster than sorting on XLA:CPU for a
  784x300 layer, and 4 bytes of temporaries per weight (the keys), where the sort also
  stores a sorted copy of them.
  The default on CPU (:data:`COUNTING_PLATFORMS`), chosen at lowering time by
  ``jax.lax.platform_dependent``.

Counts are exact int32 reductions on every backend; nothing here accumulates floats through
a matrix product (whose default precision is bf16 on TPU and TF32 on recent GPUs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import bitmask
from jaxsparse.layermap import map_groups, map_layers

_U32_MAX = 0xFFFFFFFF
_RANK_LIMIT = 1 << 31

# Platforms whose selections use the counting search (measured faster there; see
# BENCHMARKS.md); every other platform uses the sorting reference.
COUNTING_PLATFORMS = ("cpu",)

# The rankings of the pruning methods (one definition for every module that ranks).
RANKINGS = ("layerwise", "global")


def check_ranking(ranking: str) -> str:
    """Validates a ranking scope name."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {RANKINGS}")
    return ranking


def sortable_key(scores: jax.Array) -> jax.Array:
    """Order-preserving map float -> uint32 (NaN below -inf). Every key is >= 1, so 0 is free
    to mark non-candidates."""
    scores = jnp.asarray(scores, jnp.float32)
    nan = jnp.isnan(scores)
    bits = jax.lax.bitcast_convert_type(jnp.where(nan, -jnp.inf, scores), jnp.uint32)
    negative = (bits >> 31) == 1
    keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
    # -inf maps to 0x007FFFFF; NaN goes strictly below it.
    return jnp.where(nan, jnp.uint32(1), keys)


def tie_ranks(shape: tuple[int, int], tie_key=None, *, whole: bool,
              offset: int | jax.Array = 0, total: int | None = None,
              anchor: jax.Array | None = None) -> jax.Array:
    """Distinct uint32 tie ranks below 2**31 for the positions of a 2-D ``shape`` (m, s).

    With ``tie_key``: a keyed bijective hash of the position ``offset + row * s + col``
    (xor with a key word, multiplication by an odd constant and xorshifts, each a bijection
    of [0, 2**31)), so ties break at random. Without: earliness, larger for earlier
    positions (row-major over ``total`` positions when ``whole``, else down each column).
    ``offset``/``total`` place the array inside a selection over several arrays; ``offset``
    may also be a ``uint32`` array broadcastable to ``shape`` (the keyed ranks of arbitrary
    global positions, e.g. one block of a layer selected block by block: with
    ``shape=(1, 1)`` and ``offset`` the positions themselves, the ranks equal those of the
    whole layer at those positions). ``anchor``, a ``uint32`` zero computed inside a loop's
    body, makes the ranks a value of that iteration (see :func:`_select_counting`).
    """
    m, s = shape
    row = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
    if anchor is not None:  # every rank below reads ``row``
        row = row + anchor
    pos = jnp.uint32(offset) + row * jnp.uint32(s) + col
    if tie_key is None:
        if whole:
            return jnp.uint32((m * s if total is None else total) - 1) - pos
        return jnp.uint32(m - 1) - row
    mask = jnp.uint32(_RANK_LIMIT - 1)
    # The key's own words seed the hash: keys from split / fold_in are already random words.
    words = jax.random.key_data(tie_key).reshape(-1).astype(jnp.uint32)
    seed0 = words[0] & mask
    seed1 = (words[-1] ^ jnp.uint32(0x5BD1E995)) & mask
    x = pos & mask
    x = ((x ^ seed0) * jnp.uint32(0x9E3779B1)) & mask
    x = ((x ^ (x >> 15)) * jnp.uint32(0x85EBCA6B)) & mask
    x = ((x ^ (x >> 13) ^ seed1) * jnp.uint32(0xC2B2AE35)) & mask
    return x ^ (x >> 16)


def _check_size(size: int, what) -> None:
    """Tie ranks are distinct below 2**31: refuses a selection over more entries."""
    if size >= _RANK_LIMIT:
        raise ValueError(f"selections over >= 2**31 entries are not supported (got {what})")


def _clip_k(k, n: int, width: int) -> jax.Array:
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, n)
    return jnp.broadcast_to(k, (width,))


def _kth_largest(x: jax.Array, k) -> jax.Array:
    """Per column of (n, width) ``x``, its k-th largest entry (``k``: (width,), each in
    [1, n]), shaped (1, width). One column is sorted as a 1-D array: the shape XLA:GPU
    hands to CUB's radix sort (from 100,000 entries)."""
    n, width = x.shape
    if width == 1:
        return jnp.sort(x.reshape(-1))[n - k[0]].reshape(1, 1)
    return jnp.take_along_axis(jnp.sort(x, axis=0), (n - k)[None, :], axis=0)


def _cut_by_sorting(keys: jax.Array, ranks, k) -> tuple[jax.Array, jax.Array]:
    """Where the sorting reference cuts each column of (n, width) ``keys`` (``k``: one count
    per column, clipped): ``(t_key, t_rank)``, each (1, width): the k-th largest key, and
    the lowest selected tie rank among the keys equal to it, 0 where all of them are
    selected (the cut splits no tie). ``ranks``: an array or a function giving it."""
    t_key = _kth_largest(keys, jnp.maximum(k, 1))
    tied = keys == t_key
    left = k - count_per_neuron(keys > t_key)  # tied keys still to take
    splits = (t_key[0] > 0) & (k > 0) & (count_per_neuron(tied) > left)

    def split():
        r = (ranks() if callable(ranks) else ranks).reshape(keys.shape)
        # The left-th largest rank among the tied keys (ranks + 1, so 0 marks the others).
        tied_ranks = jnp.where(tied, r + jnp.uint32(1), jnp.uint32(0))
        return _kth_largest(tied_ranks, jnp.maximum(left, 1)) - jnp.uint32(1)

    # Continuous scores seldom tie at the cut: the ranks are sorted only when they decide.
    t_rank = jax.lax.cond(jnp.any(splits), split, lambda: jnp.zeros_like(t_key))
    return t_key, jnp.where(splits[None, :], t_rank, jnp.uint32(0))


def select_by_sorting(keys: jax.Array, ranks, k, *, whole: bool) -> jax.Array:
    """The reference selection: top ``k`` of ``keys`` (m, s), per column or over the whole
    array, ties going to the higher ``ranks`` (an array of the keys' shape, or a function
    giving it). Keys of 0 are never selected.

    The k-th largest key is the threshold: every key above it is selected, and of the keys
    equal to it, those of highest rank, as many as are left (their ranks are sorted only
    when the threshold splits them). Sorts of one uint32 array, one after the other, rather
    than one sort of (key, rank) pairs: fewer temporaries, and a sort XLA:GPU can run as a
    radix sort (it sorts pairs compared on both with its own kernel).
    """
    shape = keys.shape
    if whole:
        keys = keys.reshape(-1, 1)
    n, width = keys.shape
    k = _clip_k(k, n, width)
    t_key, t_rank = _cut_by_sorting(keys, ranks, k)
    r = (ranks() if callable(ranks) else ranks).reshape(keys.shape)
    above = (keys > t_key) | ((keys == t_key) & (r >= t_rank))
    return (above & (keys > 0) & (k > 0)[None, :]).reshape(shape)


# A one-column bracket of at least this many keys takes the quadratic estimate of
# :func:`_search` (fewer rounds over magnitudes and gradients; a bracket of a few hundred
# keys converges no faster with it, the last few keys being where their gaps fall).
_QUADRATIC_MIN_KEYS = 1024


def _search(count, k, lo, hi, c_lo, c_hi, *, quadratic: bool = False, first=None):
    """Counting search for the k-th largest key.

    ``count(pivot)`` gives, per column (shape of ``k``), the number of candidate keys
    ``>= pivot``, the smallest of them and the largest candidate key below ``pivot`` (see
    :func:`_reduce`). Starting from ``c_lo = count(lo) >= k > c_hi = count(hi)``, each round
    counts at one pivot inside the bracket, keeps the invariant, and moves the end it
    replaces onto the nearest key (``lo`` to the smallest key at or above the pivot, ``hi`` to
    one past the largest key below it), so the bracket always ends at keys. It stops per
    column when ``c_lo == k`` (then the keys >= lo are exactly the top k) or
    ``hi == lo + 1`` (then lo is the k-th key, and ``c_lo - c_hi`` keys tie at it).

    The pivot is where the count is estimated to cross ``k + 1/2`` (between the k-th and
    the next key): with ``quadratic`` (a one-column search over at least
    :data:`_QUADRATIC_MIN_KEYS` keys, see :func:`_quadratic`), while the bracket holds at
    least that many keys, by inverse quadratic interpolation through the two ends and the
    end replaced last (it follows a count far from linear in the key, e.g. magnitudes
    spread over many binades with a cluster of just-grown small weights); else by the
    secant between the ends (regula falsi, the Illinois rule halving the value of an end
    kept twice); the midpoint after two rounds that did not halve the bracket. ``first``
    (shape of ``k``) are the first round's pivots instead, where they lie inside the
    bracket. Where the pivot lands never changes the result, only the number of rounds
    (``experiments.benchmarks.search_rounds`` counts them).
    """

    def done(lo, hi, c_lo):
        return (c_lo == k) | (hi - lo <= jnp.uint32(1))

    def f(c):
        return (c - k).astype(jnp.float32) - 0.5

    def body(carry):
        lo, hi, c_lo, c_hi, f_lo, f_hi, side, slow, x_p, f_p, fresh = carry
        width = hi - lo
        w = width.astype(jnp.float32)
        guess = f_lo / jnp.maximum(f_lo - f_hi, 1e-30) * w  # the secant (Illinois values)
        if quadratic:
            # The key where the quadratic through (0, e_lo), (w, e_hi), (d, f_p), the key as
            # a function of the counts' true distances to the target, reaches 0; NaN before
            # an end was replaced (f_p is NaN). The replaced end lies outside the bracket.
            d = jnp.where(x_p >= lo, (x_p - lo).astype(jnp.float32),
                          -(lo - x_p).astype(jnp.float32))
            e_lo, e_hi = f(c_lo), f(c_hi)
            quad = (w * e_lo * f_p / ((e_hi - e_lo) * (e_hi - f_p))
                    + d * e_lo * e_hi / ((f_p - e_lo) * (f_p - e_hi)))
            use = ((c_lo - c_hi >= _QUADRATIC_MIN_KEYS) & jnp.isfinite(quad) & (quad > 0)
                   & (quad < w))
            guess = jnp.where(use, quad, guess)
        guess = jnp.clip(jnp.floor(guess), 1.0, 4294967040.0).astype(jnp.uint32)  # < 2**32
        offset = jnp.where(slow >= 2, width >> 1, guess)
        offset = jnp.clip(offset, jnp.uint32(1), jnp.maximum(width, jnp.uint32(2)) - 1)
        pivot = lo + offset
        if first is not None:
            pivot = jnp.where(fresh & (first > lo) & (first < hi), first, pivot)
        c, above, below = count(pivot)
        active = ~done(lo, hi, c_lo)
        up, down = active & (c >= k), active & (c < k)
        x_p = jnp.where(up, lo, jnp.where(down, hi, x_p))
        f_p = jnp.where(up, f(c_lo), jnp.where(down, f(c_hi), f_p))
        lo, c_lo = jnp.where(up, above, lo), jnp.where(up, c, c_lo)
        hi, c_hi = jnp.where(down, below + jnp.uint32(1), hi), jnp.where(down, c, c_hi)
        # Illinois: an end kept twice in a row has its value halved.
        f_lo = jnp.where(up, f(c), jnp.where(down & (side < 0), 0.5 * f_lo, f_lo))
        f_hi = jnp.where(down, f(c), jnp.where(up & (side > 0), 0.5 * f_hi, f_hi))
        side = jnp.where(up, 1, jnp.where(down, -1, side))
        slow = jnp.where(active & (hi - lo > (width >> 1)), slow + 1, 0)
        return lo, hi, c_lo, c_hi, f_lo, f_hi, side, slow, x_p, f_p, jnp.bool_(False)

    zeros = jnp.zeros(k.shape, jnp.int32)
    lo, hi, c_lo, c_hi, *_ = jax.lax.while_loop(
        lambda c: jnp.any(~done(c[0], c[1], c[2])), body,
        (lo, hi, c_lo, c_hi, f(c_lo), f(c_hi), zeros, zeros, lo,
         jnp.full(k.shape, jnp.nan, jnp.float32), jnp.bool_(True)))
    return lo, hi, c_lo, c_hi


def _quadratic(k, size: int) -> bool:
    """Whether a search for ``k`` (one count per column) over ``size`` keys compiles the
    quadratic estimate of :func:`_search`: one column (a search over many stops with its
    slowest, which the estimate does not make faster) of enough keys to reach it."""
    return k.size == 1 and size >= _QUADRATIC_MIN_KEYS


def _start(k, n_valid, lo, hi):
    """The initial bracket: ``[lo, hi)`` holds every candidate; ``k == 0`` columns are done."""
    some = k > 0
    return (jnp.where(some, lo, jnp.uint32(_U32_MAX)), jnp.where(some, hi, jnp.uint32(_U32_MAX)),
            jnp.where(some, n_valid, 0), jnp.zeros(k.shape, jnp.int32))


def _bcast(v, whole: bool):
    """A per-column (or whole-array) bound, shaped to compare with a (m, s) array."""
    return v[0] if whole else v[None, :]


def _combine(a, b):
    """Merges two tuples of ``(count, smallest, largest)`` triples."""
    out = []
    for i in range(0, len(a), 3):
        out += [a[i] + b[i], jnp.minimum(a[i + 1], b[i + 1]), jnp.maximum(a[i + 2], b[i + 2])]
    return tuple(out)


# Rows per block of a per-column reduction (see :func:`_fold`).
_BLOCK_ROWS = 16

# Whole-array reductions (see :func:`_fold`): over at least this many entries in rows at
# least :data:`_WIDE` wide, each row is reduced first.
_ROWS_FIRST_MIN_SIZE = 1 << 21
_WIDE = 64


def _block_rows(m: int) -> int:
    """The largest divisor of ``m`` up to :data:`_BLOCK_ROWS`."""
    return max(r for r in range(1, min(m, _BLOCK_ROWS) + 1) if m % r == 0)


def _fold(parts, inits, whole: bool):
    """Reduces a tuple of equally shaped (m, s) arrays with :func:`_combine`: over the whole
    array, or per column.

    One variadic reduction reads each entry once and keeps no temporary of the array's size
    (a lone large ``sum`` is split by XLA:CPU into a tree of partial sums over a stored
    int32 copy of its input). Its layout is a measured XLA:CPU choice (this is the counting
    path; ``experiments.benchmarks.pass_layout`` times each):

    * Over the whole array: a large array of wide rows is reduced row by row, then the ``m``
      rows' results (XLA:CPU splits a reduction with a vector result across its threads; one
      with a scalar result runs on one thread); else in one reduction. (Not through a flat
      view, though that reduces narrow rows ~40x faster: flattening a sharded layer gathers
      it; ``tests/test_sharding.py`` holds the update free of such gathers.)
    * Per column: the rows are first folded in blocks of up to :data:`_BLOCK_ROWS` (a
      reduction over a middle axis, vectorised along the columns), then the ``m / block``
      partial results of each column are combined.
    """
    m, s = parts[0].shape
    if whole and s >= _WIDE and m * s >= _ROWS_FIRST_MIN_SIZE:
        rows = jax.lax.reduce(parts, inits, _combine, (1,))
        return tuple(jnp.atleast_1d(p) for p in _combine_leading(rows))
    if whole:
        return tuple(jnp.atleast_1d(p) for p in jax.lax.reduce(parts, inits, _combine, (0, 1)))
    r = _block_rows(m)
    blocks = jax.lax.reduce(tuple(p.reshape(m // r, r, s) for p in parts), inits, _combine,
                            (1,))
    return _combine_leading(blocks)


def _combine_leading(stacked):
    """:func:`_combine` over the leading axis of each array of a tuple of stacked
    ``(count, smallest, largest)`` triples."""
    return tuple(jnp.sum(b, axis=0) if i % 3 == 0 else
                 jnp.min(b, axis=0) if i % 3 == 1 else jnp.max(b, axis=0)
                 for i, b in enumerate(stacked))


def _at(x, pivot, among, whole: bool):
    """The ``(count, smallest, largest)`` parts of one pivot (see :func:`_reduce`)."""
    ge = x >= _bcast(pivot, whole)
    at = ge if among is None else ge & among
    under = ~ge if among is None else ~ge & among
    return ((at.astype(jnp.int32), jnp.where(at, x, jnp.uint32(_U32_MAX)),
             jnp.where(under, x, jnp.uint32(0))), (jnp.int32(0), jnp.uint32(_U32_MAX), jnp.uint32(0)))


def _reduce(arrays, among, pivot, whole: bool):
    """One pass over ``arrays`` at ``pivot``: ``(count, above, below)``: the number of
    entries ``>= pivot``, the smallest of them and the largest entry below ``pivot`` (0 if
    none), over the entries where ``among`` holds (all when ``among`` is None); per column
    unless ``whole``."""
    return functools.reduce(_combine, [
        _fold(*_at(x, pivot, None if among is None else among[j], whole), whole)
        for j, x in enumerate(arrays)])


def _range(arrays, whole: bool, pivots=()):
    """``(count, lo, hi)``: the number of candidates (keys >= 1), the smallest candidate key
    and one past the largest (per column unless ``whole``); then :func:`_reduce`'s triple
    at each of ``pivots``, all in the same pass."""
    def one(x):
        valid = x >= jnp.uint32(1)
        parts = (valid.astype(jnp.int32), jnp.where(valid, x, jnp.uint32(_U32_MAX)), x)
        inits = (jnp.int32(0), jnp.uint32(_U32_MAX), jnp.uint32(0))
        for pivot in pivots:
            more, more_inits = _at(x, pivot, None, whole)
            parts, inits = parts + more, inits + more_inits
        return _fold(parts, inits, whole)

    n, lo, top, *at_pivots = functools.reduce(_combine, [one(x) for x in arrays])
    # Keys never exceed 0xFF800000 (+inf), so top + 1 does not wrap.
    triples = [tuple(at_pivots[i:i + 3]) for i in range(0, len(at_pivots), 3)]
    return (n, jnp.maximum(lo, jnp.uint32(1)), top + jnp.uint32(1)), triples


def _counter(arrays, among, whole: bool):
    """``pivot -> _reduce(arrays, among, pivot, whole)``."""
    return lambda pivot: _reduce(arrays, among, pivot, whole)


# A whole-array selection over at least this many keys first brackets its k-th key between
# two order statistics of a fixed sample (counted in the first pass).
_SAMPLE_MIN_SIZE = 1 << 14
_SAMPLE_SIZE = 2048


def sample_strides(shape: tuple[int, int]) -> tuple[int, int]:
    """The row and column strides of the fixed sample of a (m, s) array that brackets a
    whole-array selection's k-th key (about :data:`_SAMPLE_SIZE` entries)."""
    m, s = shape
    row_step = max(1, m // 64)
    col_step = max(1, s // max(1, _SAMPLE_SIZE // -(-m // row_step)))
    return row_step, col_step


def _sample_pivots(keys, k):
    """Two pivots that bracket the k-th largest key with high probability: order statistics
    of a fixed strided sample (a strided slice of a sharded layer stays on its shards;
    gathering positions of the flattened layer would all-gather its keys)."""
    row_step, col_step = sample_strides(keys.shape)
    return _pivots_from_sample(keys[::row_step, ::col_step], k, keys.size)


def _descending(sample) -> jax.Array:
    """The entries of a (small) sample, sorted in descending order."""
    return jnp.sort(sample.reshape(-1))[::-1]


def _pivots_from_sample(sample, k, n: int):
    """The pivots of :func:`_sample_pivots` from ``sample``, keys drawn from ``n`` positions:
    3 standard deviations of the k-th key's sample rank to either side."""
    sample = _descending(sample)
    size = sample.size
    # The k-th key's rank among the sample's candidates (keys >= 1) has a binomial spread.
    r = k[0].astype(jnp.float32) * (size / n)
    n_cand = jnp.maximum(jnp.sum(sample >= jnp.uint32(1), dtype=jnp.int32), 1)
    n_cand = n_cand.astype(jnp.float32)
    margin = 3.0 * jnp.sqrt(r * jnp.clip(1.0 - r / n_cand, 0.0, 1.0) + 1.0) + 3.0
    i_hi, i_lo = (r - margin).astype(jnp.int32), (r + margin).astype(jnp.int32)
    s_hi = jnp.where(i_hi < 0, jnp.uint32(_U32_MAX - 1),
                     sample[jnp.clip(i_hi, 0, size - 1)]) + jnp.uint32(1)
    s_lo = jnp.where(i_lo >= size, jnp.uint32(0), sample[jnp.clip(i_lo, 0, size - 1)])
    return s_lo[None], s_hi[None]


def _narrow(at_pivots, k, lo, hi, c_lo, c_hi):
    """The bracket narrowed by the counts at extra pivots of the first pass (``(count,
    above, below)`` triples, see :func:`_reduce`): each end moves (snapped onto keys)
    where a pivot's count narrows it."""
    for c, above, below in at_pivots:
        take_lo = (c >= k) & (c < c_lo)
        take_hi = (c < k) & (c > c_hi)
        lo, c_lo = jnp.where(take_lo, above, lo), jnp.where(take_lo, c, c_lo)
        hi, c_hi = jnp.where(take_hi, below + jnp.uint32(1), hi), jnp.where(take_hi, c, c_hi)
    return lo, hi, c_lo, c_hi


def _sample_hint(keys, k):
    """One pivot for every column of a per-column selection: where the array's fixed
    sample (:func:`sample_strides`) puts the top ``sum(k)`` keys of the whole array. A
    column's k-th key lies near it when the columns' scores are alike (SRigL's regrowth:
    a layer's dropped weights, regrown per neuron by |grad|), so its bracket starts narrow
    (``experiments.benchmarks.search_rounds --compare hint``: 11.2 -> 7.6 rounds per search
    in SRigL's updates of a 10M model); else it costs at most one round."""
    row_step, col_step = sample_strides(keys.shape)
    sample = _descending(keys[::row_step, ::col_step])
    r = (jnp.sum(k).astype(jnp.float32) * (sample.size / keys.size)).astype(jnp.int32)
    return jnp.full(k.shape, sample[jnp.clip(r, 0, sample.size - 1)])


def _bracket(keys_list, k, whole: bool):
    """The counting search's first part: ``(k, lo, hi, c_lo, c_hi)``, ``k`` clipped to the
    candidates and the keys' bracket after :func:`_search` (``c_lo == k``: the keys ``>= lo``
    are exactly the top k; else the keys in ``[lo, hi)`` tie at the threshold)."""
    count = _counter(keys_list, None, whole)
    sampled = len(keys_list) == 1 and keys_list[0].size >= _SAMPLE_MIN_SIZE
    # A large array: the first pass also counts at two pivots from a sample.
    pivots = _sample_pivots(keys_list[0], k) if sampled and whole else ()
    (n_valid, lo, hi), at_pivots = _range(keys_list, whole, pivots)
    k = jnp.minimum(k, n_valid)
    lo, hi, c_lo, c_hi = _start(k, n_valid, lo, hi)
    if sampled and whole:
        lo, hi, c_lo, c_hi = _narrow(at_pivots, k, lo, hi, c_lo, c_hi)
    # Per column: one pivot for all columns, counted in the search's first round (in the
    # first pass, its per-column partial counts would double that pass's temporaries).
    first = _sample_hint(keys_list[0], k) if sampled and not whole else None
    quadratic = _quadratic(k, sum(x.size for x in keys_list))
    return (k, *_search(count, k, lo, hi, c_lo, c_hi, quadratic=quadratic, first=first))


def _tied_rank(keys_list, ranks_list, k, lo, hi, c_lo, c_hi, whole: bool):
    """The lowest selected tie rank among the keys in ``[lo, hi)`` (the ties at the
    threshold), by the same counting search over their ranks."""
    def tied(x):
        return (x >= _bcast(lo, whole)) & (x < _bcast(hi, whole))

    def count(p):
        # Each pass computes the tie masks and the ranks (given as functions) inside its own
        # reduction. Anchored to the pass's pivot by an optimization barrier: loop
        # invariants, XLA would compute them once before the search loop and keep them
        # through it (5 bytes per key).
        anchor = jax.lax.optimization_barrier((jnp.uint32(0), p))[0]
        ranks = [r(anchor=anchor) if callable(r) else r for r in ranks_list]
        return _reduce(ranks, [tied(x + anchor) for x in keys_list], p, whole)

    r_lo, r_hi, r_clo, r_chi = _start(k - c_hi, c_lo - c_hi, jnp.zeros_like(lo),
                                      jnp.full_like(hi, _RANK_LIMIT))
    # Tie ranks are hashes, spread evenly: the secant needs no quadratic estimate there.
    return _search(count, k - c_hi, r_lo, r_hi, r_clo, r_chi)[0]


def _select_counting(keys_list, ranks_list, k, whole: bool, finish=None):
    """Counting selection over one or several arrays (several only when ``whole``): the
    top ``k`` of each column of a (m, s) array unless ``whole``. ``finish`` (e.g. packing)
    maps each mask inside the branch that computes it, so only its result is stored."""
    finish = (lambda m: m) if finish is None else finish
    k, lo, hi, c_lo, c_hi = _bracket(keys_list, k, whole)

    def no_ties(lo, hi, c_lo, c_hi):
        # c_lo == k in every column: the keys >= lo are exactly the top k.
        return [finish(x >= _bcast(lo, whole)) for x in keys_list]

    def ties(lo, hi, c_lo, c_hi):
        r_lo = _tied_rank(keys_list, ranks_list, k, lo, hi, c_lo, c_hi, whole)
        ranks = [r() if callable(r) else r for r in ranks_list]
        return [finish((x >= _bcast(hi, whole))
                       | ((x >= _bcast(lo, whole)) & (x < _bcast(hi, whole))
                          & (r >= _bcast(r_lo, whole))))
                for x, r in zip(keys_list, ranks)]

    # Continuous scores seldom tie at the threshold: the tie ranks (a hash per position)
    # are computed only when some column needs them.
    return jax.lax.cond(jnp.all(c_lo == k), no_ties, ties, lo, hi, c_lo, c_hi)


def select_by_counting(keys: jax.Array, ranks: jax.Array, k, *, whole: bool) -> jax.Array:
    """The counting selection; equal to :func:`select_by_sorting` on every input."""
    k = _clip_k(k, keys.size if whole else keys.shape[0], 1 if whole else keys.shape[1])
    return _select_counting([keys], [ranks], k, whole)[0]


class Threshold(NamedTuple):
    """Where a whole-array top-k selection cuts (:func:`top_k_threshold`): a candidate is
    selected when its key is ``>= hi``, or ``>= lo`` with a tie rank ``>= rank``.

    Attributes:
        lo, hi: ``uint32[]`` key bounds (``hi == lo`` when no key ties at the threshold).
        rank: ``uint32[]`` the lowest selected tie rank among the keys in ``[lo, hi)``.
    """

    lo: jax.Array
    hi: jax.Array
    rank: jax.Array

    @property
    def tied(self) -> jax.Array:
        """Whether the cut may split keys tied at it (``hi != lo``): only then do tie ranks
        decide (:func:`in_top_k`'s ``tied``)."""
        return self.hi != self.lo


def in_top_k(keys: jax.Array, ranks, threshold: Threshold, *, tied: bool = True
             ) -> jax.Array:
    """Bool mask of the ``keys`` (with their tie ``ranks``, same shape, or a function giving
    them) that a selection cut at ``threshold`` takes; keys of 0 (no candidate) never are.

    ``tied=False`` when the caller knows ``threshold.tied`` is false (e.g. in the false
    branch of a ``lax.cond`` on it): then ``hi == lo`` and the keys ``>= lo`` are the
    selection, and ``ranks`` (a hash per position) is not computed."""
    if not tied:
        return keys >= threshold.lo
    ranks = ranks() if callable(ranks) else ranks
    at_least = keys >= threshold.lo
    return (keys >= threshold.hi) | (at_least & (ranks >= threshold.rank))


def _threshold_by_sorting(keys, ranks, k) -> Threshold:
    """The :class:`Threshold` of the sorting reference's whole-array selection of 1-D
    ``keys`` (:func:`select_by_sorting`; ``ranks`` an array or a function giving it)."""
    n = keys.size
    k = _clip_k(k, n, 1)
    t_key, t_rank = (v[0, 0] for v in _cut_by_sorting(keys.reshape(n, 1), ranks, k))
    none = k[0] == 0
    every = t_key == 0  # k is past the candidates: every candidate (key >= 1)
    # A split tie has a lowest selected rank >= 1 (its lowest rank is not selected).
    hi = jnp.where(t_rank > 0, t_key + jnp.uint32(1), t_key)
    lo = jnp.where(none, jnp.uint32(_U32_MAX), jnp.where(every, jnp.uint32(1), t_key))
    hi = jnp.where(none, jnp.uint32(_U32_MAX), jnp.where(every, jnp.uint32(1), hi))
    return Threshold(lo, hi, jnp.where(none | every, jnp.uint32(0), t_rank))


def top_k_keys_threshold(keys, k, *, tie_key=None) -> Threshold:
    """The :class:`Threshold` of ``top_k_keys(keys, k, tie_key=tie_key)`` (whole array):
    ``in_top_k(keys, whole_ranks(keys.shape, tie_key), threshold)`` is that selection.

    Three scalars instead of a mask, to apply later: SNFS drops in one pass over the layers
    and grows in another, so the kept set of every layer would otherwise be held, as a
    mask, from one pass to the next. Counting on :data:`COUNTING_PLATFORMS`, from the sort
    elsewhere, as :func:`top_k_keys` (property-tested equal to it)."""
    shape = jnp.shape(keys)
    view = layer_view(shape)
    _check_size(int(np.prod(view)), f"shape {shape}")

    def ranks(anchor=None):
        return tie_ranks(view, tie_key, whole=True, anchor=anchor)

    def counting(keys, k):
        k, lo, hi, c_lo, c_hi = _bracket([keys], _clip_k(k, keys.size, 1), True)

        def no_ties(lo, hi, c_lo, c_hi):
            return lo, jnp.zeros_like(lo)

        def ties(lo, hi, c_lo, c_hi):
            return hi, _tied_rank([keys], [ranks], k, lo, hi, c_lo, c_hi, True)

        hi, rank = jax.lax.cond(jnp.all(c_lo == k), no_ties, ties, lo, hi, c_lo, c_hi)
        return Threshold(lo[0], hi[0], rank[0])

    def sorting(keys, k):
        return _threshold_by_sorting(keys.reshape(-1), ranks, k)

    return jax.lax.platform_dependent(jnp.reshape(keys, view), jnp.asarray(k, jnp.int32),
                                      default=sorting,
                                      **{p: counting for p in COUNTING_PLATFORMS})


def whole_ranks(shape, tie_key=None) -> jax.Array:
    """The tie ranks of a whole-array selection of an array of ``shape`` (those
    :func:`top_k_keys` uses), in that shape: for :func:`in_top_k`."""
    return tie_ranks(layer_view(shape), tie_key, whole=True).reshape(shape)


def top_k_threshold(scan: Callable, k, size: int, *, sample=None) -> Threshold:
    """The threshold of the top ``k`` keys of an array seen only one block at a time.

    The whole-array rule of :func:`top_k_keys` (ties at the threshold go to the higher
    tie rank), found by the counting search of :func:`select_by_counting` with every count
    a pass over the blocks: an array too large to keep (the keys of a layer's dense
    gradient, recomputed per block from two factors) is never built. Apply the result to
    each block with :func:`in_top_k`; the selected set is the one :func:`top_k_keys` would
    select on the whole array.

    Args:
        scan: ``scan(part)`` calls ``part(keys, ranks)`` on every block and returns its
            outputs stacked along a new leading axis (e.g. ``lax.map`` over the blocks):
            ``keys`` a block's :func:`candidate_keys` (uint32, any shape, 0 where not a
            candidate, every position of the array in exactly one block), ``ranks()`` their
            tie ranks (distinct over the whole array, as :func:`tie_ranks` gives them).
        k: how many to select (int, traced ok); clipped to ``[0, size]``.
        size: the number of positions of the array (``< 2**31``).
        sample: optional keys of a few positions (e.g. a strided sub-array, see
            :func:`sample_strides`): their order statistics bracket the k-th key, counted in
            the first pass. They only save passes; the result never depends on them.

    Returns:
        The :class:`Threshold`.
    """
    _check_size(size, size)

    def fold(part):
        # The blocks' (count, smallest, largest) triples, combined.
        return _combine_leading(scan(part))

    k = _clip_k(k, size, 1)
    pivots = () if sample is None else _pivots_from_sample(sample, k, size)

    def first(keys, ranks):
        (n, lo, hi), triples = _range([_view(keys)], True, pivots)
        return (n, lo, hi, *(v for t in triples for v in t))

    n_valid, lo, hi, *at = fold(first)
    k = jnp.minimum(k, n_valid)
    lo, hi, c_lo, c_hi = _start(k, n_valid, lo, hi)
    if sample is not None:
        lo, hi, c_lo, c_hi = _narrow([tuple(at[0:3]), tuple(at[3:6])], k, lo, hi, c_lo, c_hi)
    lo, hi, c_lo, c_hi = _search(
        lambda pivot: fold(lambda keys, ranks: _reduce([_view(keys)], None, pivot, True)),
        k, lo, hi, c_lo, c_hi, quadratic=_quadratic(k, size))

    def no_ties(lo, hi, c_lo, c_hi):
        # c_lo == k: the keys >= lo are exactly the top k.
        return Threshold(lo[0], lo[0], jnp.uint32(0))

    def ties(lo, hi, c_lo, c_hi):
        # The keys in [lo, hi) tie at the threshold; the search goes on over their ranks.
        def part(p):
            def count(keys, ranks):
                keys = _view(keys)
                tie = (keys >= lo[0]) & (keys < hi[0])
                return _reduce([ranks().reshape(keys.shape)], [tie], p, True)
            return count

        r_lo, r_hi, r_clo, r_chi = _start(k - c_hi, c_lo - c_hi, jnp.zeros_like(lo),
                                          jnp.full_like(hi, _RANK_LIMIT))
        r_lo = _search(lambda p: fold(part(p)), k - c_hi, r_lo, r_hi, r_clo, r_chi,
                       quadratic=_quadratic(k, size))[0]
        return Threshold(lo[0], hi[0], r_lo[0])

    return jax.lax.cond(jnp.all(c_lo == k), no_ties, ties, lo, hi, c_lo, c_hi)


def top_k_over_layers(keys: Callable, layers: list, shapes: list, k, *, consts=None,
                      tie_key=None) -> list:
    """One whole-array selection over several layers, each read where it lives: the rule
    of :func:`top_k_masks` (the top ``k`` keys of the layers' concatenation, ties to the
    higher tie rank over it), with nothing of the model's size stored.

    The threshold comes from :func:`top_k_threshold`, every count a pass that computes one
    layer's keys at a time (:func:`jaxsparse.layermap.map_groups`), then each layer's mask
    is packed where it is computed (:func:`jaxsparse.layermap.map_layers`). Same-shaped
    layers share one traced pass, so neither the compiled program nor the temporaries grow
    with the number of layers (:func:`top_k_masks` holds the keys of every layer at once).

    Args:
      keys: ``keys(layer, c) -> uint32`` keys of one layer (:func:`candidate_keys`), of
        shape ``shapes[j]``; ``c`` its entry of ``consts``.
      layers: one pytree of arrays per layer (e.g. its packed mask and weights).
      shapes: each layer's shape (that of its keys).
      k: how many to select in all (int, traced ok).
      consts: one pytree of scalars per layer (traced ok), or ``None``.
      tie_key: as :func:`top_k_masks`.

    Returns:
      One :class:`~jaxsparse.bitmask.PackedMask` per layer.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    total = sum(sizes)
    _check_size(total, total)
    offsets = np.cumsum([0] + sizes[:-1])
    consts = [None] * len(layers) if consts is None else list(consts)
    per_layer = [{"c": c, "offset": np.uint32(o)} for c, o in zip(consts, offsets)]

    def keys_and_ranks(layer, c):
        x = keys(layer, c["c"])
        view = layer_view(x.shape)
        return x.reshape(view), lambda anchor=None: tie_ranks(
            view, tie_key, whole=True, offset=c["offset"], total=total, anchor=anchor), x.shape

    def scan(part):
        groups = map_groups(
            lambda read, c: read(lambda layer: part(*keys_and_ranks(layer, c)[:2])),
            layers, per_layer, read=True)
        return tuple(jnp.concatenate(parts) for parts in zip(*(out for _, out in groups)))

    threshold = top_k_threshold(scan, k, total)

    def mask(read, c):
        def packed(layer, tied):
            x, ranks, shape = keys_and_ranks(layer, c)
            return bitmask.pack(in_top_k(x, ranks, threshold, tied=tied).reshape(shape)).bits

        # The tie ranks (a hash per weight) only when the cut splits tied keys.
        return read(lambda layer: jax.lax.cond(threshold.tied, lambda: packed(layer, True),
                                               lambda: packed(layer, False)))

    bits = map_layers(mask, layers, per_layer, read=True)
    return [bitmask.PackedMask(b, tuple(s)) for b, s in zip(bits, shapes)]


def top_k_per_layer(keys: Callable, layers: list, shapes: list, ks: list, *,
                    shared=()) -> list:
    """Each layer's top ``ks[j]`` keys (:func:`top_k_keys`, the keys computed where the
    layer lives, one layer at a time: :func:`jaxsparse.layermap.map_layers`), except the
    layers listed in ``shared``, which share one ranking for the sum of their ``ks``
    (:func:`top_k_over_layers`). Ties go to the earliest position.

    ``keys(layer, j)`` gives layer ``j``'s keys (``j`` traced); returns one
    :class:`~jaxsparse.bitmask.PackedMask` per layer."""
    own = [j for j in range(len(layers)) if j not in shared]
    out: list = [None] * len(layers)
    masks = map_layers(lambda read, c: top_k_keys(read(keys, c["j"]), c["k"], packed=True),
                       [layers[j] for j in own], [{"j": j, "k": ks[j]} for j in own],
                       read=True)
    for j, m in zip(own, masks):
        out[j] = m
    if shared:
        kept = top_k_over_layers(keys, [layers[j] for j in shared],
                                 [shapes[j] for j in shared], sum(ks[j] for j in shared),
                                 consts=list(shared))
        for j, m in zip(shared, kept):
            out[j] = m
    return out


def _select(keys, ranks, k, whole: bool, finish=None) -> jax.Array:
    """:func:`select_by_counting` on :data:`COUNTING_PLATFORMS`, else the sorting
    reference; ``ranks()`` gives the tie ranks; ``finish`` maps the mask where it is
    computed (see :func:`_select_counting`)."""
    _check_size(keys.size, f"shape {keys.shape}")

    def counting(keys, k):
        k = _clip_k(k, keys.size if whole else keys.shape[0], 1 if whole else keys.shape[1])
        return _select_counting([keys], [ranks], k, whole, finish)[0]

    def sorting(keys, k):
        # The tie ranks as a value of the keys: a hash of the position alone has no operand,
        # and XLA computes it apart and stores it (4 bytes per weight).
        anchor = jax.lax.optimization_barrier((jnp.uint32(0), keys))[0]
        mask = select_by_sorting(keys, lambda: ranks(anchor=anchor), k, whole=whole)
        return mask if finish is None else finish(mask)

    return jax.lax.platform_dependent(keys, jnp.asarray(k, jnp.int32), default=sorting,
                                      **{p: counting for p in COUNTING_PLATFORMS})


def layer_view(shape) -> tuple[int, int]:
    """The 2-D (fan-in, neurons) view of a layer: all axes but the last as rows; a 1-D
    array is one column."""
    shape = tuple(shape)
    if len(shape) <= 1:
        return (int(np.prod(shape)), 1)
    return (int(np.prod(shape[:-1])), shape[-1])


def _view(x) -> jax.Array:
    """``x`` in its :func:`layer_view` (leading axes merged, the last kept: a reshape that
    leaves a layer sharded along its neurons where it is, where a flat view gathers it)."""
    return x.reshape(layer_view(x.shape))


def candidate_keys(scores, where=None) -> jax.Array:
    """The selection keys of ``scores`` (:func:`sortable_key`, shape kept), 0 where ``where``
    is false (not a candidate): what :func:`top_k_keys` selects from."""
    keys = sortable_key(scores)
    if where is not None:
        keys = jnp.where(where, keys, jnp.uint32(0))
    return keys


def top_k_keys(keys, k, *, tie_key=None, per_neuron: bool = False, packed: bool = False):
    """Bool mask of the ``k`` largest nonzero ``keys`` (from :func:`candidate_keys`): over
    the whole array, or per output neuron (last axis) with ``per_neuron``; ties as in
    :func:`top_k_mask`. For keys computed apart from their selection (e.g. inside the
    branch that reads a layer, :func:`jaxsparse.map_layers`).

    With ``packed``, the mask comes as a :class:`~jaxsparse.bitmask.PackedMask`, packed
    where the selection computes it: the bool mask (1 byte per entry) is never stored,
    only its bits."""
    shape = jnp.shape(keys)
    view = layer_view(shape)
    whole = not per_neuron
    finish = None
    if packed:
        def finish(mask):
            return bitmask.pack(mask.reshape(shape)).bits
    out = _select(jnp.reshape(keys, view),
                  lambda anchor=None: tie_ranks(view, tie_key, whole=whole, anchor=anchor),
                  k, whole, finish)
    return bitmask.PackedMask(out, shape) if packed else out.reshape(shape)


def top_k_mask(scores, k, *, where=None, tie_key=None) -> jax.Array:
    """Bool mask of the ``k`` highest ``scores`` over the whole array, among ``where``.

    Args:
      scores: float array of any shape.
      k: int, possibly traced; clipped to [0, scores.size]. Fewer are selected when ``where``
        has fewer than ``k`` candidates.
      where: optional bool array of candidate positions.
      tie_key: optional PRNG key; ties at the threshold are then broken at random (without
        one, the earliest positions in row-major order win).

    Example:
      >>> top_k_mask(jnp.array([[0.1, 0.9], [0.5, 0.3]]), 2)
      Array([[False,  True], [ True, False]], dtype=bool)
    """
    return top_k_keys(candidate_keys(scores, where), k, tie_key=tie_key)


def top_k_per_neuron(scores, k, *, where=None, tie_key=None) -> jax.Array:
    """Per output neuron (last axis), the ``k`` highest scores along its fan-in.

    ``k`` is a scalar or one count per neuron (shape ``(n_out,)``), possibly traced. A Dense
    kernel (in, out) ranks each column; a Conv kernel (h, w, in, out) ranks each output
    channel over h*w*in.
    """
    return top_k_keys(candidate_keys(scores, where), k, tie_key=tie_key, per_neuron=True)


def top_k_masks(scores, k, *, where=None, tie_key=None, impl: str = "auto") -> list:
    """One selection of the ``k`` highest scores over several arrays (global ranking).

    Args:
      scores: list of float arrays (any shapes).
      k: total count (traced ok).
      where: optional list of bool candidate arrays.
      tie_key: optional PRNG key (ties at random), else the earliest positions win in the
        order of the list.
      impl: ``"auto"`` (the counting search: no array is concatenated, so the memory is the
        keys of the arrays, not a copy of all of them), ``"sorting"`` (the reference:
        concatenates and sorts), or ``"counting"``.

    Returns:
      A list of bool masks of the shapes of ``scores``.
    """
    views = [layer_view(jnp.shape(s)) for s in scores]
    where = [None] * len(scores) if where is None else where
    keys = [candidate_keys(s, w).reshape(v) for s, w, v in zip(scores, where, views)]
    sizes = [int(np.prod(v)) for v in views]
    total = sum(sizes)
    _check_size(total, total)
    offsets = np.cumsum([0] + sizes)
    ranks = [functools.partial(tie_ranks, v, tie_key, whole=True, offset=int(o), total=total)
             for v, o in zip(views, offsets)]
    if impl == "sorting":
        flat = select_by_sorting(jnp.concatenate([x.reshape(-1, 1) for x in keys]),
                                 jnp.concatenate([r().reshape(-1, 1) for r in ranks]), k,
                                 whole=True)
        out = [flat[offsets[i]:offsets[i + 1], 0] for i in range(len(keys))]
    elif impl in ("auto", "counting"):
        out = _select_counting(keys, ranks, _clip_k(k, total, 1), True)
    else:
        raise ValueError(f"unknown impl {impl!r}; choose 'auto', 'sorting' or 'counting'")
    return [m.reshape(jnp.shape(s)) for m, s in zip(out, scores)]


def _nonzero(x) -> jax.Array:
    x = jnp.asarray(x)
    return x if x.dtype == jnp.bool_ else x != jnp.zeros((), x.dtype)


def _count(x, axes) -> jax.Array:
    """int32 count of the true entries of bool ``x`` along ``axes``.

    Written as a two-output reduction (the count and an ``any``) rather than a ``sum``:
    XLA:CPU splits a large single-output reduction into a tree of partial sums and first
    stores the converted input (4 bytes per entry); a variadic reduction stays one fused
    pass with no temporary, on every backend.
    """
    n, some = jax.lax.reduce((x.astype(jnp.int32), x), (jnp.int32(0), False),
                             lambda a, b: (a[0] + b[0], a[1] | b[1]), axes)
    # Both outputs are used (XLA would drop an unused one and be back to a plain sum).
    return jnp.where(some, n, 0)


def count_true(x) -> jax.Array:
    """Number of true (nonzero) entries of ``x`` as an int32 scalar."""
    x = _nonzero(x)
    return _count(x, tuple(range(x.ndim)))


def count_per_neuron(x) -> jax.Array:
    """Number of true entries per output neuron (last axis) as int32 ``(n_out,)``."""
    x = _nonzero(x).reshape(-1, x.shape[-1])
    m, s = x.shape
    r = _block_rows(m)
    # Blocks of rows first, as in :func:`_fold` (a lone column sum would store an int32 copy).
    return jnp.sum(_count(x.reshape(m // r, r, s), (1,)), axis=0)


def drop_lowest(mask, scores, n_drop, *, tie_key=None) -> jax.Array:
    """Removes the ``n_drop`` active positions with the lowest scores.

    Example:
      >>> drop_lowest(mask, jnp.abs(w), 10)   # SET / RigL drop step
    """
    keep = count_true(mask) - jnp.asarray(n_drop, jnp.int32)
    return top_k_mask(scores, keep, where=mask, tie_key=tie_key)


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
    total = jnp.minimum(jnp.asarray(total, jnp.int32), jnp.sum(caps))
    totalf = total.astype(jnp.float32)

    def fill(alloc):
        room = capf - alloc
        open_ = room > 0.5
        w = jnp.where(open_, weights, 0.0)
        w = jnp.where(jnp.sum(w) > 0, w, open_.astype(jnp.float32))
        share = w / jnp.maximum(jnp.sum(w), 1e-30) * (totalf - jnp.sum(alloc))
        return alloc + jnp.clip(share, 0.0, room)

    # At most one round per slot (each round fills every slot it caps); a round that changes
    # nothing is a fixed point, so the loop stops there with the same result. A loop, not a
    # Python unrolling: the program stays one round long for any number of layers.
    def again(carry):
        i, alloc, prev = carry
        return (i < weights.shape[0]) & ((i == 0) | jnp.any(alloc != prev))

    alloc = jax.lax.while_loop(
        again, lambda c: (c[0] + 1, fill(c[1]), c[1]),
        (jnp.int32(0), jnp.zeros_like(weights), jnp.zeros_like(weights)))[1]
    base = jnp.minimum(jnp.floor(alloc).astype(jnp.int32), caps)
    frac = alloc - base.astype(jnp.float32)
    # Float round-off can overshoot by a unit: take it back from the smallest remainders.
    base = base - top_k_short(-frac, jnp.sum(base) - total, where=base > 0).astype(jnp.int32)
    # Largest remainder: one more for the slots with the biggest fractional parts ...
    rest = total - jnp.sum(base)
    base = base + top_k_short(frac, rest, where=base < caps).astype(jnp.int32)
    # ... and whatever is still missing (underflowing weights) fills free room in slot order.
    rest = total - jnp.sum(base)
    room = caps - base
    before = jnp.cumsum(room) - room
    return base + jnp.clip(rest - before, 0, room)


def top_k_short(scores, k, *, where=None, tie_key=None) -> jax.Array:
    """:func:`top_k_mask` of a short vector (one value per layer or per neuron) by the
    sorting reference on every platform: a sort of a few hundred values compiles in 0.05 s
    on XLA:CPU, the counting search in 0.16-0.24 s, and runs as fast (BENCHMARKS.md). Used
    by SNFS's regrowth split and SRigL's ablation guard."""
    return top_k_masks([scores], k, where=None if where is None else [where],
                       tie_key=tie_key, impl="sorting")[0]


def _fan_in_groups(x, m: int):
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


def nm_mask(scores, n, m: int, *, priority=None) -> jax.Array:
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
    prio = (jnp.zeros(keys.shape, bool) if priority is None
            else _fan_in_groups(jnp.asarray(priority, bool), m))
    idx = jnp.arange(m)
    # beats[g, j, i, o]: does position j outrank position i in its group?
    pj, pi = prio[:, :, None, :], prio[:, None, :, :]
    kj, ki = keys[:, :, None, :], keys[:, None, :, :]
    first = (idx[:, None] < idx[None, :])[None, :, :, None]
    beats = (pj & ~pi) | ((pj == pi) & ((kj > ki) | ((kj == ki) & first)))
    rank = jnp.sum(beats, axis=1, dtype=jnp.int32)
    return (rank < jnp.asarray(n, jnp.int32)).reshape(shape)
