"""Pure topology functions: hand-checked tiny cases and property tests."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse import bitmask, topology
from tests.helpers import examples


def test_top_k_hand_checked():
    scores = jnp.array([[0.1, 0.9], [0.5, 0.3]])
    np.testing.assert_array_equal(topology.top_k_mask(scores, 2), [[False, True], [True, False]])
    np.testing.assert_array_equal(topology.top_k_mask(scores, 0), np.zeros((2, 2), bool))
    np.testing.assert_array_equal(topology.top_k_mask(scores, 7), np.ones((2, 2), bool))


def test_top_k_negative_scores_and_ties_break_by_position():
    scores = jnp.array([-1.0, 2.0, -1.0, -1.0, -3.0])
    np.testing.assert_array_equal(topology.top_k_mask(scores, 3),
                                  [True, True, True, False, False])
    np.testing.assert_array_equal(topology.top_k_mask(-jnp.zeros(4), 2),
                                  [True, True, False, False])


def test_top_k_never_picks_nan_before_numbers():
    scores = jnp.array([jnp.nan, 1.0, jnp.nan, -jnp.inf, 0.0])
    np.testing.assert_array_equal(topology.top_k_mask(scores, 3),
                                  [False, True, False, True, True])


def test_top_k_restricted_to_candidates():
    scores = jnp.array([5.0, 4.0, 3.0, 2.0, 1.0])
    where = jnp.array([False, True, False, True, True])
    np.testing.assert_array_equal(topology.top_k_mask(scores, 2, where=where),
                                  [False, True, False, True, False])
    # More asked than candidates: all candidates, nothing else.
    np.testing.assert_array_equal(topology.top_k_mask(scores, 4, where=where), where)


def test_random_tie_break_depends_on_key_and_keeps_count():
    scores = jnp.zeros((64,))
    a = topology.top_k_mask(scores, 10, tie_key=jax.random.key(0))
    b = topology.top_k_mask(scores, 10, tie_key=jax.random.key(0))
    c = topology.top_k_mask(scores, 10, tie_key=jax.random.key(1))
    assert int(a.sum()) == 10 and int(c.sum()) == 10
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.arange(64) < 10)  # not just the first 10


def test_drop_and_grow_hand_checked():
    mask = jnp.array([True, True, True, False, False, False])
    w = jnp.array([0.5, -0.1, 2.0, 0.0, 0.0, 0.0])
    kept = topology.drop_lowest(mask, jnp.abs(w), 1)
    np.testing.assert_array_equal(kept, [True, False, True, False, False, False])
    g = jnp.array([9.0, 8.0, 0.0, 0.1, 3.0, 0.2])
    grown = topology.grow_highest(kept, jnp.abs(g), 2)
    # Position 0 is active already; the two best inactive ones are 1 (8.0) and 4 (3.0).
    np.testing.assert_array_equal(grown, [True, True, True, False, True, False])


def test_packed_selection_is_the_packed_mask():
    # top_k_keys(..., packed=True) packs inside the selection: the same bits as packing its
    # bool mask, whole and per neuron, for 1-D, 2-D and conv-shaped keys, with ties.
    rng = np.random.default_rng(0)
    for shape in [(37, 11), (3, 3, 4, 10), (13,)]:
        keys = topology.candidate_keys(np.round(rng.standard_normal(shape)).astype(np.float32),
                                       jnp.asarray(rng.random(shape) < 0.8))
        for per_neuron in (False, True):
            k = 3 if per_neuron else keys.size // 3
            want = topology.top_k_keys(keys, k, tie_key=jax.random.key(1),
                                       per_neuron=per_neuron)
            got = topology.top_k_keys(keys, k, tie_key=jax.random.key(1),
                                      per_neuron=per_neuron, packed=True)
            assert isinstance(got, bitmask.PackedMask) and got.shape == shape
            np.testing.assert_array_equal(got.bits, bitmask.pack(want).bits)
            np.testing.assert_array_equal(bitmask.unpack(got), want)


_SELECT_SHAPES = ((13,), (3, 16), (2, 3, 4, 9))
_SELECT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8, jnp.bool_,
                  jnp.complex64)


@functools.partial(jax.jit, static_argnames=("with_b", "word_dtype"))
def _select_both(bits, a, b, with_b, word_dtype):
    m = bitmask.PackedMask(bits, a.shape)
    words = bitmask.word_mask(m, word_dtype)
    got = bitmask.select(words, a, b) if with_b else bitmask.select(words, a)
    return got, jnp.where(bitmask.unpack(m), a, b if with_b else jnp.zeros((), a.dtype))


def _raw(x):
    # The values' bits (NaN payloads and signed zeros compared too).
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype != np.bool_ else x


@settings(deadline=None, max_examples=examples(40, nightly=400))
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(_SELECT_SHAPES),
       dtype=st.sampled_from(_SELECT_DTYPES), with_b=st.booleans(),
       word_dtype=st.sampled_from((None, jnp.float32, jnp.bfloat16, jnp.uint8)))
def test_select_on_the_bits_is_where(seed, shape, dtype, with_b, word_dtype):
    # bitmask.select (and/or on the values' bits) is jnp.where on the unpacked mask, bit for
    # bit: NaN, infinities, -0.0, a last axis padded to whole bytes, words of the values'
    # width or of another (bf16 params, f32 moments).
    rng = np.random.default_rng(seed)
    special = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 1.5, -2.25], np.float32)

    def values():
        x = np.where(rng.random(shape) < 0.3, rng.choice(special, shape),
                     rng.standard_normal(shape).astype(np.float32) * 100)
        if dtype == jnp.complex64:
            c = x.astype(np.complex64)
            c.imag = x.reshape(-1)[::-1].reshape(shape)
            return jnp.asarray(c)
        if dtype == jnp.bool_:
            return jnp.asarray(rng.random(shape) < 0.5)
        if jnp.issubdtype(dtype, jnp.integer):
            return jnp.asarray(np.nan_to_num(x, posinf=7, neginf=-7), jnp.float32).astype(dtype)
        return jnp.asarray(x, dtype)

    mask = bitmask.pack(jnp.asarray(rng.random(shape) < 0.5))
    got, want = _select_both(mask.bits, values(), values(), with_b, word_dtype or dtype)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(_raw(got), _raw(want))


def test_word_mask_is_all_ones_where_set():
    m = bitmask.pack(jnp.array([[True, False, True, True, False, False, True, False, True]]))
    for dtype, word in ((jnp.float32, np.uint32), (jnp.bfloat16, np.uint16),
                        (jnp.int8, np.uint8)):
        w = np.asarray(bitmask.word_mask(m, dtype))
        assert w.dtype == word
        np.testing.assert_array_equal(w, np.where(np.asarray(bitmask.unpack(m)),
                                                  np.iinfo(word).max, 0))
    with pytest.raises(ValueError, match="shape"):
        bitmask.select(bitmask.word_mask(m, jnp.float32), jnp.ones((1, 8)))
    with pytest.raises(TypeError, match="word_mask"):  # arguments swapped
        bitmask.select(jnp.ones((1, 9)), bitmask.word_mask(m, jnp.float32))


def test_top_k_short_is_top_k_mask():
    # The sort of a short vector selects what the counting search selects: ties (rounded
    # scores), candidates, with and without a tie key, k past the candidates.
    rng = np.random.default_rng(0)
    for n in (1, 7, 96, 300):
        scores = jnp.asarray(np.round(rng.standard_normal(n), 1), jnp.float32)
        where = jnp.asarray(rng.random(n) < 0.7)
        for k in (0, 1, n // 3, n):
            for tie_key in (None, jax.random.key(n + k)):
                np.testing.assert_array_equal(
                    topology.top_k_short(scores, k, where=where, tie_key=tie_key),
                    topology.top_k_mask(scores, k, where=where, tie_key=tie_key))
        np.testing.assert_array_equal(topology.top_k_short(scores, n // 2),
                                      topology.top_k_mask(scores, n // 2))


def test_traced_counts_compile_once():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def select(scores, k):
        return topology.top_k_mask(scores, k)

    scores = jax.random.normal(jax.random.key(0), (50, 7))
    for k in [0, 1, 17, 349, 350, 400]:
        assert int(select(scores, k).sum()) == min(k, 350)


@pytest.mark.slow  # recompiles for every drawn shape
@settings(deadline=None, max_examples=examples(25, nightly=200))
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    frac=st.floats(0.0, 1.2),
    seed=st.integers(0, 2**16),
    with_where=st.booleans(),
    ties=st.booleans(),
)
def test_top_k_property(shape, frac, seed, with_where, ties):
    shape = tuple(shape)
    n = int(np.prod(shape))
    k = int(frac * n)
    kscore, kwhere = jax.random.split(jax.random.key(seed))
    scores = jax.random.normal(kscore, shape)
    if ties:
        scores = jnp.round(scores)
    where = jax.random.bernoulli(kwhere, 0.6, shape) if with_where else jnp.ones(shape, bool)
    sel = np.asarray(topology.top_k_mask(scores, k, where=where))
    w = np.asarray(where)
    s = np.asarray(scores)
    assert sel.sum() == min(k, w.sum())
    assert not np.any(sel & ~w)
    rest = w & ~sel
    if sel.any() and rest.any():
        assert s[sel].min() >= s[rest].max()


@pytest.mark.slow  # recompiles for every drawn shape
@settings(deadline=None, max_examples=examples(20, nightly=200))
@given(
    fan_in=st.integers(1, 12), n_out=st.integers(1, 6), seed=st.integers(0, 2**16),
    ks=st.lists(st.integers(0, 14), min_size=6, max_size=6),
)
def test_top_k_per_neuron_property(fan_in, n_out, seed, ks):
    scores = jax.random.normal(jax.random.key(seed), (fan_in, n_out))
    k = jnp.asarray(ks[:n_out], jnp.int32)
    sel = np.asarray(topology.top_k_per_neuron(scores, k))
    np.testing.assert_array_equal(sel.sum(axis=0), np.minimum(np.asarray(k), fan_in))
    s = np.asarray(scores)
    for j in range(n_out):
        col, cs = sel[:, j], s[:, j]
        if col.any() and (~col).any():
            assert cs[col].min() >= cs[~col].max()


def test_per_neuron_on_conv_kernels_counts_over_hwc():
    mask = topology.random_mask_per_neuron(jax.random.key(0), (3, 3, 4, 5), 7)
    np.testing.assert_array_equal(np.asarray(mask).reshape(-1, 5).sum(axis=0), [7] * 5)


def test_random_mask_exact_and_keyed():
    a = topology.random_mask(jax.random.key(3), (30, 20), 123)
    b = topology.random_mask(jax.random.key(4), (30, 20), 123)
    assert int(a.sum()) == 123 and int(b.sum()) == 123
    assert not np.array_equal(a, b)


@pytest.mark.slow  # recompiles for every drawn shape
@settings(deadline=None, max_examples=examples(30, nightly=200))
@given(
    weights=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6),
    caps=st.lists(st.integers(0, 50), min_size=6, max_size=6),
    total=st.integers(0, 200),
)
def test_distribute_property(weights, caps, total):
    caps = caps[: len(weights)]
    out = np.asarray(topology.distribute(total, jnp.asarray(weights), jnp.asarray(caps)))
    assert out.sum() == min(total, sum(caps))
    assert np.all(out >= 0) and np.all(out <= np.asarray(caps))


def test_distribute_is_proportional_and_redistributes_overflow():
    out = topology.distribute(60, jnp.array([1.0, 2.0, 3.0]), jnp.array([100, 100, 100]))
    np.testing.assert_array_equal(out, [10, 20, 30])
    # The last slot can take only 5: its excess goes to the others in proportion.
    # (27.5 each, exactly in float32: the tied remainders go to the earliest slot.)
    out = topology.distribute(60, jnp.array([1.0, 1.0, 10.0]), jnp.array([100, 100, 5]))
    np.testing.assert_array_equal(out, [28, 27, 5])


def test_distribute_program_does_not_grow_with_the_slots():
    # SNFS redistributes over every layer: the water-filling is a loop, not unrolled per
    # layer (a 96-layer model once compiled 96 rounds of 96-slot arithmetic).
    def size(n):
        return len(jax.make_jaxpr(topology.distribute)(
            10, jnp.ones((n,)), jnp.ones((n,), jnp.int32)).eqns)

    assert size(3) == size(96)
    # Many rounds: each caps one more slot (weights 2**i, capacity 1 each but the first).
    caps = np.r_[1000, np.ones(20, np.int32)].astype(np.int32)
    out = topology.distribute(200, jnp.asarray(2.0 ** np.arange(21), jnp.float32),
                              jnp.asarray(caps))
    np.testing.assert_array_equal(out, np.r_[180, np.ones(20)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_scores_of_any_float_dtype(dtype):
    scores = jnp.arange(10, dtype=dtype)
    np.testing.assert_array_equal(topology.top_k_mask(scores, 3), np.arange(10) >= 7)


@pytest.mark.parametrize("case", ["normal", "ties", "where", "skewed"])
def test_large_selection_stays_exact(case):
    # Interpolated pivots on a large layer: each k is checked against a sort, on inputs
    # where interpolation is poor (few distinct values, a 1e26 jump, sparse candidates).
    n = (1 << 14) + 37
    key = jax.random.key(3)
    scores = jax.random.normal(key, (n,))
    where = None
    if case == "ties":
        scores = jnp.round(scores * 2.0)  # a handful of distinct values
    elif case == "where":
        where = jax.random.bernoulli(jax.random.key(4), 0.1, (n,))
    elif case == "skewed":
        scores = jnp.where(jnp.arange(n) < 100, 1e6, scores * 1e-20)
    select = jax.jit(lambda s, k: topology.top_k_mask(s, k, where=where))
    valid = np.ones(n, bool) if where is None else np.asarray(where)
    s_np = np.asarray(scores)
    for k in [0, 1, 99, 100, 101, 1000, n // 3, n // 2, n - 1, n]:
        sel = np.asarray(select(scores, jnp.int32(k)))
        assert sel.sum() == min(k, valid.sum()), (case, k)
        assert not (sel & ~valid).any()
        chosen, rest = s_np[sel], s_np[valid & ~sel]
        if chosen.size and rest.size:
            assert chosen.min() >= rest.max(), (case, k)


def _reference_top_k(scores, k, where=None):
    """Top k per column of a (m, s) array by sortable key, ties by position (numpy sort)."""
    keys = np.asarray(topology.sortable_key(jnp.asarray(scores))).astype(np.int64)
    valid = np.ones(keys.shape, bool) if where is None else np.asarray(where)
    m, s = keys.shape
    k = np.broadcast_to(np.asarray(k), (s,))
    out = np.zeros((m, s), bool)
    for j in range(s):
        rows = np.flatnonzero(valid[:, j])
        order = rows[np.lexsort((rows, -keys[rows, j]))]
        out[order[: max(0, min(int(k[j]), rows.size))], j] = True
    return out


def _adversarial(kind, shape, seed):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if kind == "geometric":  # one value per binade: interpolation on counts is poor
        x = 2.0 ** -(rng.permutation(n) % 120).astype(np.float64)
    elif kind == "clusters":  # two clusters 1e26 apart
        x = np.where(rng.random(n) < 0.5, 1e6, 1e-20) * (1 + 1e-3 * rng.random(n))
    elif kind == "ties":
        x = np.round(rng.normal(size=n) * 2.0)
    elif kind == "specials":
        x = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1.0, 3e38], size=n)
    elif kind == "near_ties":  # neighbours one ulp apart
        x = np.float32(1.0) + np.float32(2.0**-23) * rng.integers(0, 40, n)
    else:  # heavy tail
        x = rng.standard_t(1.5, size=n)
    return jnp.asarray(x.reshape(shape), jnp.float32)


@pytest.mark.parametrize("kind", ["geometric", "clusters", "ties", "specials", "near_ties",
                                  "heavy"])
def test_selection_equals_a_stable_sort_on_adversarial_scores(kind):
    # Without a tie key the result is fully determined (ties by position): compare exactly
    # with a numpy sort, per column and for a whole layer, at several k.
    scores = _adversarial(kind, (257, 9), seed=len(kind))
    where = jax.random.bernoulli(jax.random.key(1), 0.7, scores.shape)
    per_neuron = jax.jit(lambda s, k, w: topology.top_k_per_neuron(s, k, where=w))
    ks = jnp.array([0, 1, 2, 50, 128, 129, 179, 256, 257], jnp.int32)
    np.testing.assert_array_equal(per_neuron(scores, ks, where),
                                  _reference_top_k(scores, ks, where))
    whole = jax.jit(lambda s, k: topology.top_k_mask(s, k))
    flat = scores.reshape(-1, 1)
    for k in [0, 1, 7, 500, 1156, 2312, 2313]:
        np.testing.assert_array_equal(np.asarray(whole(flat, k)), _reference_top_k(flat, k))


@pytest.mark.parametrize("kind", ["geometric", "clusters", "ties", "near_ties"])
def test_large_layer_selection_equals_a_stable_sort(kind):
    # >= 2**14 entries in one column: the sampled bracket is used first.
    scores = _adversarial(kind, (1 << 15, 1), seed=7)
    whole = jax.jit(lambda s, k: topology.top_k_mask(s, k))
    for k in [1, 3000, 16384, 30000]:
        np.testing.assert_array_equal(np.asarray(whole(scores, k)),
                                      _reference_top_k(scores, k))


def test_random_tie_break_among_many_ties_is_exact_and_only_among_ties():
    scores = jnp.concatenate([jnp.full((500,), 2.0), jnp.ones((3000,)), jnp.zeros((500,))])
    sel = np.asarray(topology.top_k_mask(scores, 1700, tie_key=jax.random.key(5)))
    assert sel.sum() == 1700
    assert sel[:500].all() and not sel[3500:].any()  # all above, none below the tie
    assert 0 < sel[500:1500].sum() < 1000  # spread over the tied block, not its head


# Each example's new shape compiles the counts anew (~0.4 s each): 12 examples per CI run.
@settings(deadline=None, max_examples=examples(12, nightly=1000))
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["bool", "int32", "float32"]),
)
def test_counts_match_numpy(shape, density, seed, dtype):
    rng = np.random.default_rng(seed)
    x = rng.random(shape) < density
    if dtype == "int32":
        x = x * rng.integers(-3, 4, shape)
    elif dtype == "float32":
        x = x * rng.standard_normal(shape)
        x.flat[rng.integers(0, x.size)] = np.nan  # NaN counts as nonzero, as in numpy
    x = np.asarray(x, dtype)
    assert int(topology.count_true(x)) == np.count_nonzero(x)
    per = topology.count_per_neuron(x)
    assert per.dtype == jnp.int32
    np.testing.assert_array_equal(per, np.count_nonzero(x.reshape(-1, shape[-1]), axis=0))


# The two implementations of the selection rule: the sorting reference and the counting
# search are equal bit for bit. Fixed shapes (37 x 11) so each compiles once; the contents,
# k (traced), candidates and tie keys vary.
_M, _S = 37, 11


@jax.jit
def _both(keys, ranks, k_whole, k_cols):
    return (topology.select_by_sorting(keys, ranks, k_whole, whole=True),
            topology.select_by_counting(keys, ranks, k_whole, whole=True),
            topology.select_by_sorting(keys, ranks, k_cols, whole=False),
            topology.select_by_counting(keys, ranks, k_cols, whole=False))


def _numpy_top_k(keys, ranks, k):
    """The rule stated with numpy: order by (key, rank) descending, take the first k
    candidates (key > 0)."""
    order = np.lexsort((-ranks.astype(np.int64), -keys.astype(np.int64)))
    out = np.zeros(keys.size, bool)
    cand = [i for i in order if keys[i] > 0]
    out[cand[:max(k, 0)]] = True
    return out


# The kinds of scores _scores_of_kind draws, and the cases of a selection property test:
# a seed, a kind, tie-breaking at random or by position, k as a fraction of the positions.
_KINDS = st.sampled_from(["normal", "ties", "few_values", "specials", "sparse_where"])
_SELECTION_CASES = given(seed=st.integers(0, 2**31 - 1), kind=_KINDS, keyed=st.booleans(),
                         frac=st.floats(-0.1, 1.1))


def _scores_of_kind(rng, kind):
    """``[_M, _S]`` float32 scores and a candidate mask for one of the property tests' kinds:
    normal, ties, few distinct values, NaN/inf/signed zeros, few candidates."""
    scores = rng.standard_normal((_M, _S)).astype(np.float32)
    if kind == "ties":
        scores = np.round(scores)
    elif kind == "few_values":
        scores = rng.integers(0, 3, (_M, _S)).astype(np.float32)
    elif kind == "specials":
        scores.flat[rng.integers(0, scores.size, 40)] = rng.choice(
            [np.nan, np.inf, -np.inf, 0.0, -0.0], 40)
    return scores, rng.random((_M, _S)) < (0.2 if kind == "sparse_where" else 0.8)


@settings(deadline=None, max_examples=examples(60, nightly=2500))
@_SELECTION_CASES
def test_sorting_and_counting_select_the_same(seed, kind, keyed, frac):
    rng = np.random.default_rng(seed)
    scores, where = _scores_of_kind(rng, kind)
    keys = jnp.where(where, topology.sortable_key(scores), jnp.uint32(0))
    tie_key = jax.random.key(seed) if keyed else None
    ranks_whole = topology.tie_ranks((_M, _S), tie_key, whole=True)
    ranks_cols = topology.tie_ranks((_M, _S), tie_key, whole=False)
    k_whole = int(frac * _M * _S)
    k_cols = (rng.random(_S) * 1.2 * _M).astype(np.int32) - 2
    sw, cw, _, _ = _both(keys, ranks_whole, k_whole, jnp.asarray(k_cols))
    _, _, sc, cc = _both(keys, ranks_cols, k_whole, jnp.asarray(k_cols))
    np.testing.assert_array_equal(sw, cw)
    np.testing.assert_array_equal(sc, cc)
    ref = _numpy_top_k(np.asarray(keys).ravel(), np.asarray(ranks_whole).ravel(), k_whole)
    np.testing.assert_array_equal(np.asarray(sw).ravel(), ref)
    for j in range(_S):
        ref = _numpy_top_k(np.asarray(keys)[:, j], np.asarray(ranks_cols)[:, j], int(k_cols[j]))
        np.testing.assert_array_equal(np.asarray(sc)[:, j], ref)


@pytest.mark.parametrize("whole", [True, False])
def test_sorting_reference_sorts_single_uint32_arrays(whole):
    # One operand per sort (XLA:GPU runs a large 1-D one as a CUB radix sort; pairs compared
    # on both keys it sorts with its own kernel), 1-D for a whole-array selection: the
    # keys' sort, and the tie ranks' under the cond taken when the cut splits a tie.
    keys = jnp.arange(1, 4097, dtype=jnp.uint32).reshape(64, 64)
    ranks = topology.tie_ranks((64, 64), jax.random.key(0), whole=whole)
    text = jax.jit(lambda x: topology.select_by_sorting(x, ranks, 100, whole=whole)).lower(
        keys).as_text()
    shape = "4096" if whole else "64x64"
    calls = [line for line in text.splitlines() if "call @sort" in line]
    assert len(calls) == 2, calls
    assert all(f": (tensor<{shape}xui32>) -> tensor<{shape}xui32>" in c for c in calls), calls
    sorts = [line for line in text.splitlines() if '"stablehlo.sort"(' in line]
    assert sorts and all('"stablehlo.sort"(%arg0) ' in line for line in sorts), sorts


# A whole layer large enough for the sample's first bracket (>= 2**14 keys) and for the
# quadratic pivot estimate (brackets of >= 1024 keys), on scores whose count is far from
# linear in the key: a cluster of tiny magnitudes (just-grown weights), heavy tails.
_LARGE = (256, 256)


def _large_scores(rng, kind):
    n = _LARGE[0] * _LARGE[1]
    if kind == "cluster":
        s = np.where(rng.random(n) < 0.3, 1e-5, 1.0) * rng.standard_normal(n)
    elif kind == "cauchy":
        s = rng.standard_cauchy(n)
    elif kind == "lognormal":
        s = np.exp(3 * rng.standard_normal(n))
    else:
        s = np.round(rng.standard_normal(n) * 4) / 4  # few values: ties
    return np.abs(s).astype(np.float32).reshape(_LARGE)


@jax.jit
def _large_both(keys, ranks_whole, ranks_cols, k, k_cols):
    return (topology.select_by_sorting(keys, ranks_whole, k, whole=True),
            topology.select_by_counting(keys, ranks_whole, k, whole=True),
            topology.select_by_sorting(keys, ranks_cols, k_cols, whole=False),
            topology.select_by_counting(keys, ranks_cols, k_cols, whole=False))


@settings(deadline=None, max_examples=examples(25, nightly=1000))
@given(seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["cluster", "cauchy", "lognormal", "ties"]),
       density=st.sampled_from([0.1, 0.9, 1.0]), frac=st.floats(0.0, 1.0),
       col_spread=st.sampled_from([0.0, 0.5]))
def test_counting_selects_as_sorting_on_large_skewed_layers(seed, kind, density, frac,
                                                            col_spread):
    # Whole: the sample's two pivots and the quadratic estimate; per column: the sample's
    # one hint for every column (columns of like or, scaled, unlike scores).
    rng = np.random.default_rng(seed)
    where = rng.random(_LARGE) < density
    scale = np.exp(col_spread * 8 * rng.standard_normal(_LARGE[1])).astype(np.float32)
    keys = jnp.where(where, topology.sortable_key(_large_scores(rng, kind) * scale),
                     jnp.uint32(0))
    ranks = topology.tie_ranks(_LARGE, jax.random.key(seed), whole=True)
    ranks_cols = topology.tie_ranks(_LARGE, jax.random.key(seed), whole=False)
    k = int(frac * where.sum())
    k_cols = (rng.random(_LARGE[1]) * frac * 1.2 * _LARGE[0]).astype(np.int32)
    by_sorting, by_counting, cols_sorting, cols_counting = _large_both(
        keys, ranks, ranks_cols, k, jnp.asarray(k_cols))
    np.testing.assert_array_equal(by_counting, by_sorting)
    assert int(np.sum(by_counting)) == k
    np.testing.assert_array_equal(cols_counting, cols_sorting)
    np.testing.assert_array_equal(np.sum(cols_counting, axis=0),
                                  np.minimum(k_cols, where.sum(axis=0)))


@pytest.mark.parametrize("layout", ["rows first", "one reduction"])
def test_every_layout_of_the_counting_pass_selects_as_sorting(layout, monkeypatch):
    # topology._fold reduces a whole layer row by row (large, wide layers) or in one
    # reduction, by size and width: forced here on narrow and wide layers, both must select
    # as the sorting reference.
    forced = {"rows first": (0, 0), "one reduction": (1 << 62, 0)}
    monkeypatch.setattr(topology, "_ROWS_FIRST_MIN_SIZE", forced[layout][0])
    monkeypatch.setattr(topology, "_WIDE", forced[layout][1])
    both = jax.jit(lambda keys, ranks, k: (topology.select_by_sorting(keys, ranks, k, whole=True),
                                           topology.select_by_counting(keys, ranks, k,
                                                                       whole=True)))
    for seed in range(4):
        rng = np.random.default_rng(seed)
        scores, where = _scores_of_kind(rng, ["normal", "ties", "specials", "sparse_where"][seed])
        kind = ["cluster", "cauchy", "lognormal", "ties"][seed]
        for keys, k in [
                (jnp.where(where, topology.sortable_key(scores), jnp.uint32(0)),
                 int(where.sum() * rng.random())),
                (topology.sortable_key(_large_scores(rng, kind)), int(rng.integers(_LARGE[0] * _LARGE[1])))]:
            ranks = topology.tie_ranks(keys.shape, jax.random.key(seed), whole=True)
            by_sorting, by_counting = both(keys, ranks, k)
            np.testing.assert_array_equal(by_counting, by_sorting)
            assert int(np.sum(by_counting)) == k


def _search_pivots(keys, k, quadratic_min_keys, monkeypatch):
    """The mask of one whole-array selection and the pivots its counting search counted at
    (a host callback per round), the quadratic estimate taken from brackets of
    ``quadratic_min_keys`` keys."""
    pivots = []
    search = topology._search

    def recorded(count, *args, **kwargs):
        def counting(pivot):
            jax.debug.callback(lambda p: pivots.append(int(p[0])), pivot)
            return count(pivot)
        return search(counting, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(topology, "_search", recorded)
        m.setattr(topology, "_QUADRATIC_MIN_KEYS", quadratic_min_keys)
        mask = jax.jit(lambda x, k: topology.top_k_keys(x, k))(keys, k)
        jax.effects_barrier()
    return mask, pivots


def test_large_brackets_take_the_quadratic_estimate(monkeypatch):
    # Magnitudes with a third of them in a tight cluster far below the rest (the weights
    # RigL grew at zero one update before, after a few steps): brackets of >= 1024 keys
    # estimate the pivot by the quadratic, the search takes other pivots, the mask is the
    # same. (How many rounds it saves: experiments/benchmarks/search_rounds.py.)
    rng = np.random.default_rng(1)
    n = _LARGE[0] * _LARGE[1]
    scores = np.where(rng.random(n) < 0.3, 6e-5 * (1 + 0.5 * rng.random(n)),
                      0.036 * np.abs(rng.standard_normal(n))).astype(np.float32)
    keys = topology.candidate_keys(scores.reshape(_LARGE))
    k = int(0.6 * n)
    quadratic, q_pivots = _search_pivots(keys, k, topology._QUADRATIC_MIN_KEYS, monkeypatch)
    secant, s_pivots = _search_pivots(keys, k, (1 << 31) - 1, monkeypatch)
    np.testing.assert_array_equal(quadratic, secant)
    assert int(np.sum(quadratic)) == k
    assert q_pivots[0] == s_pivots[0]  # no replaced end yet: the secant's pivot
    assert q_pivots != s_pivots


def test_global_selection_over_a_list_equals_the_concatenated_reference():
    # Interleaved same-shaped layers (read in groups by top_k_over_layers), a 1-D and a
    # conv-shaped one; rounded scores tie at most thresholds.
    rng = np.random.default_rng(0)
    shapes = [(13, 7), (7, 5), (40,), (13, 7), (3, 3, 2, 4), (7, 5), (13, 7)]
    scores = [jnp.asarray(np.round(rng.standard_normal(s)), jnp.float32) for s in shapes]
    where = [jnp.asarray(rng.random(np.shape(x)) < 0.7) for x in scores]
    for tie_key in (None, jax.random.key(3)):
        # k traced: each implementation compiles once per tie_key.
        @jax.jit
        def all_three(k, tie_key=tie_key):
            by_layer = topology.top_k_over_layers(
                lambda layer, c: topology.candidate_keys(*layer), list(zip(scores, where)),
                shapes, k, tie_key=tie_key)
            return [*(topology.top_k_masks(scores, k, where=where, tie_key=tie_key, impl=impl)
                      for impl in ("sorting", "counting")),
                    [bitmask.unpack(m) for m in by_layer]]

        for k in (0, 1, 57, 200, 10_000):
            a, b, c = all_three(k)
            for x, y, z in zip(a, b, c):
                np.testing.assert_array_equal(x, y)
                np.testing.assert_array_equal(x, z)
            total = sum(int(np.sum(m)) for m in a)
            assert total == min(k, sum(int(np.sum(w)) for w in where))
    with pytest.raises(ValueError, match="unknown impl"):
        topology.top_k_masks(scores, 3, impl="heap")


def test_the_rule_is_chosen_per_platform():
    # platform_dependent: the TPU/GPU program sorts, the CPU program counts.
    f = jax.jit(lambda s, k: topology.top_k_mask(s, k))
    traced = f.trace(jnp.ones((20, 10)), 5)
    assert "sort" in traced.lower(lowering_platforms=("tpu",)).as_text()
    assert "sort" not in traced.lower(lowering_platforms=("cpu",)).as_text()


# top_k_threshold: the whole-array selection with the keys seen one block of columns at a
# time (ragged blocks), with and without a bracketing sample; same fixed shape as above.
_COLUMN_BLOCKS = ((0, 4), (4, 9), (9, _S))


@functools.partial(jax.jit, static_argnames="sampled")
def _threshold_selection(keys, ranks, k, sampled):
    def scan(part):
        outs = [part(keys[:, a:b], lambda a=a, b=b: ranks[:, a:b]) for a, b in _COLUMN_BLOCKS]
        return tuple(jnp.stack(o) for o in zip(*outs))

    sample = keys[::5, ::2] if sampled else None
    threshold = topology.top_k_threshold(scan, k, keys.size, sample=sample)
    return topology.in_top_k(keys, ranks, threshold)


@settings(deadline=None, max_examples=examples(30, nightly=1000))
@given(seed=st.integers(0, 2**31 - 1), kind=_KINDS, keyed=st.booleans(),
       sampled=st.booleans(), frac=st.floats(-0.1, 1.1))
def test_top_k_threshold_over_blocks_selects_as_top_k_keys(seed, kind, keyed, sampled, frac):
    rng = np.random.default_rng(seed)
    scores, where = _scores_of_kind(rng, kind)
    keys = topology.candidate_keys(scores, jnp.asarray(where))
    tie_key = jax.random.key(seed) if keyed else None
    ranks = topology.tie_ranks((_M, _S), tie_key, whole=True)
    k = int(frac * _M * _S)
    got = _threshold_selection(keys, ranks, k, sampled)
    np.testing.assert_array_equal(got, topology.top_k_keys(keys, k, tie_key=tie_key))
    ref = _numpy_top_k(np.asarray(keys).ravel(), np.asarray(ranks).ravel(), k)
    np.testing.assert_array_equal(np.asarray(got).ravel(), ref)


@functools.partial(jax.jit, static_argnames="keyed")
def _kept_by_thresholds(keys, seed, k, keyed):
    # The counting threshold (this CPU's) and the sorting reference's, each applied.
    tie_key = jax.random.key(seed) if keyed else None
    ranks = topology.whole_ranks(keys.shape, tie_key)
    counting = topology.top_k_keys_threshold(keys, k, tie_key=tie_key)
    sorting = topology._threshold_by_sorting(keys.reshape(-1), ranks.reshape(-1), k)
    # Without a tie at the cut, in_top_k's tied=False (no ranks computed) is the same set.
    untied = jnp.where(counting.tied, topology.in_top_k(keys, ranks, counting),
                       topology.in_top_k(keys, None, counting, tied=False))
    return (topology.in_top_k(keys, ranks, counting), topology.in_top_k(keys, ranks, sorting),
            untied, topology.top_k_keys(keys, k, tie_key=tie_key))


@settings(deadline=None, max_examples=examples(30, nightly=1000))
@_SELECTION_CASES
def test_top_k_keys_threshold_selects_as_top_k_keys(seed, kind, keyed, frac):
    # Kept as three scalars (SNFS, between its drop and grow passes) and applied later with
    # in_top_k: the same set as top_k_keys, by the counting search and by the sort.
    rng = np.random.default_rng(seed)
    scores, where = _scores_of_kind(rng, kind)
    keys = topology.candidate_keys(scores, jnp.asarray(where))
    k = int(frac * _M * _S)
    counting, sorting, untied, want = _kept_by_thresholds(keys, seed, k, keyed)
    np.testing.assert_array_equal(counting, want)
    np.testing.assert_array_equal(sorting, want)
    np.testing.assert_array_equal(untied, want)
    ranks = topology.whole_ranks(keys.shape, jax.random.key(seed) if keyed else None)
    ref = _numpy_top_k(np.asarray(keys).ravel(), np.asarray(ranks).ravel(), k)
    np.testing.assert_array_equal(np.asarray(want).ravel(), ref)


def test_top_k_keys_threshold_is_chosen_per_platform():
    traced = jax.jit(lambda x, k: topology.top_k_keys_threshold(x, k)).trace(
        jnp.ones((20, 10), jnp.uint32), 5)
    assert "sort" in traced.lower(lowering_platforms=("tpu",)).as_text()
    assert "sort" not in traced.lower(lowering_platforms=("cpu",)).as_text()


def test_selections_refuse_too_large_arrays():
    big = jax.ShapeDtypeStruct((2**16, 2**15), jnp.uint32)  # 2**31 keys, never allocated
    for select in (lambda: topology.top_k_threshold(lambda part: None, 1, 2**31),
                   lambda: jax.eval_shape(lambda x: topology.top_k_keys(x, 1), big),
                   lambda: jax.eval_shape(lambda x: topology.top_k_keys_threshold(x, 1), big)):
        with pytest.raises(ValueError, match="selections over >= 2\\*\\*31 entries"):
            select()


@pytest.mark.parametrize("per_neuron", [False, True])
@pytest.mark.parametrize("keyed", [False, True])
def test_selection_keeps_no_array_of_ranks_or_ties(per_neuron, keyed):
    # The tie-break search recomputes the tie masks and ranks inside each of its passes:
    # hoisted out of the loop (as XLA does with loop invariants) they were kept through it,
    # 5 bytes per key. Now the temporaries stay below one byte per key.
    shape = (512, 1024)
    k = 100 if per_neuron else 1000
    tie_key = jax.random.key(0) if keyed else None
    compiled = jax.jit(lambda keys: topology.top_k_keys(
        keys, k, tie_key=tie_key, per_neuron=per_neuron)).lower(
        jax.ShapeDtypeStruct(shape, jnp.uint32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 1.0 * np.prod(shape), temp / np.prod(shape)


@settings(deadline=None, max_examples=examples(25, nightly=500))
@given(seed=st.integers(0, 2**31 - 1), keyed=st.booleans(), spread=st.booleans())
def test_two_keys_tied_at_the_threshold(seed, keyed, spread):
    # Exactly two keys share the threshold and one is selected (the commonest tie of
    # continuous scores; the rank search decides between the two): equal to the sorting
    # reference and the numpy statement of the rule.
    rng = np.random.default_rng(seed)
    n = _M * _S
    values = 2 * rng.permutation(n).astype(np.float32)  # distinct, even
    low = np.flatnonzero(values < n)  # the lower half: the pair replaces none above it
    a, b = (low[0], low[-1]) if spread else sorted(rng.choice(low, 2, replace=False))
    k = int(rng.integers(1, n // 2))
    above = np.sort(values)[::-1][k - 2] if k > 1 else 2 * n  # the (k-1)-th largest
    values[[a, b]] = above - 1  # odd: exactly these two tie, straddling the cut at k
    keys = topology.candidate_keys(jnp.asarray(values.reshape(_M, _S)))
    assert (values > above - 1).sum() == k - 1 and (values == above - 1).sum() == 2
    tie_key = jax.random.key(seed) if keyed else None
    ranks = topology.whole_ranks((_M, _S), tie_key)
    got = _two_ways(keys, ranks, k)
    want = _numpy_top_k(np.asarray(keys).ravel(), np.asarray(ranks).ravel(), k)
    for g in got:
        np.testing.assert_array_equal(np.asarray(g).ravel(), want)
    np.testing.assert_array_equal(topology.top_k_keys(keys, k, tie_key=tie_key).ravel(), want)


@jax.jit
def _two_ways(keys, ranks, k):
    return (topology.select_by_sorting(keys, ranks, k, whole=True),
            topology.select_by_counting(keys, ranks, k, whole=True))
