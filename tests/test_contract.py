"""The contract every algorithm passes (one suite, run over all factories).

jit once across many topology updates; exact nonzero counts after every update; params exactly
masked after every step; grown weights zero; inner moments of grown weights zero; same key ->
same masks; dense leaves untouched; works inside chain and inject_hyperparams.
"""

from typing import Any, NamedTuple

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse
from jaxsparse.masks import is_none, path_to_str
from tests.helpers import lenient, loss_fn, make_step, run, tiny_batch, tiny_params

EVERY, END, STEPS = 3, 24, 28

ALGORITHMS = {
    "static": (lambda inner, key: jaxsparse.static(inner, 0.8, key=key, distribution="uniform"),
               "fixed", True),
    "set": (lambda inner, key: jaxsparse.set(inner, 0.8, key=key, end_step=END,
                                             update_every=EVERY), "fixed", True),
    "rigl": (lambda inner, key: jaxsparse.rigl(inner, 0.8, key=key, end_step=END,
                                               update_every=EVERY), "fixed", True),
    "rigl_uniform_const": (lambda inner, key: jaxsparse.rigl(
        inner, 0.7, key=key, end_step=END, update_every=EVERY, distribution="uniform",
        drop_fraction_decay="constant"), "fixed", True),
    "snfs": (lambda inner, key: jaxsparse.snfs(inner, 0.8, key=key, end_step=END,
                                               update_every=EVERY), "global", True),
    "magnitude": (lambda inner, key: jaxsparse.magnitude_pruning(
        inner, 0.8, end_step=END, update_every=EVERY), "pruning", False),
    "magnitude_global": (lambda inner, key: jaxsparse.magnitude_pruning(
        inner, 0.8, end_step=END, begin_step=2, update_every=EVERY, initial_sparsity=0.3,
        ranking="global"), "pruning", False),
    "random_pruning": (lambda inner, key: jaxsparse.random_pruning(
        inner, 0.8, key=key, end_step=END, update_every=EVERY), "pruning", True),
    "srigl": (lambda inner, key: jaxsparse.srigl(
        inner, 0.8, key=key, end_step=END, update_every=EVERY, gamma_sal=0.9), "fanin", True),
    "srigl_no_ablation": (lambda inner, key: jaxsparse.srigl(
        inner, 0.8, key=key, end_step=END, update_every=EVERY, ablation=False), "fixed", True),
    "nm_rigl": (lambda inner, key: jaxsparse.nm_rigl(
        inner, 1, 4, key=key, end_step=END, update_every=EVERY), "fixed", True),
    "nm_pruning": (lambda inner, key: jaxsparse.nm_pruning(
        inner, 1, 4, end_step=END, update_every=EVERY), "nm", False),
    "granet": (lambda inner, key: jaxsparse.granet(
        inner, 0.9, key=key, end_step=END, update_every=EVERY, initial_sparsity=0.5),
        "granet", True),
}
DST = ("set", "rigl", "rigl_uniform_const", "snfs", "srigl", "srigl_no_ablation", "nm_rigl",
       "granet")


class Recorded(NamedTuple):
    """One algorithm's recorded run (see :func:`recorded`)."""

    name: str
    kind: str
    random: bool
    tx: optax.GradientTransformation
    history: list
    step: Any
    pointers: list[int]  # the buffers of a fresh (masked params, state) pair


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def recorded(request) -> Recorded:
    name = request.param
    make, kind, random = ALGORITHMS[name]
    tx = make(lenient(optax.adam(1e-2)), jax.random.key(0))
    # Every run of this module goes through this one compiled step, which raises if it is
    # ever traced a second time (test_step_is_traced_once). chex counts traces per code
    # location: every algorithm's step starts from zero.
    chex.clear_trace_counter()
    # The step donates (params, state): XLA refuses a buffer donated twice, so a state leaf
    # that aliases a param, or two aliasing state leaves, fail the run
    # (test_state_shares_no_buffer_with_params checks the same before any step).
    step = jax.jit(chex.assert_max_traces(make_step(tx), n=1), donate_argnums=(0, 1))
    history, step = run(tx, STEPS, step=step)
    return Recorded(name, kind, random, tx, history, step, _buffer_pointers(tx))


def _buffer_pointers(tx) -> list[int]:
    """The device buffers of a fresh (masked params, state) pair, one entry per array leaf."""
    params = tiny_params()
    state = tx.init(params)
    params = jaxsparse.apply_masks(params, jaxsparse.get_masks(state))
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))
            if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]


def _sparse_items(masks):
    flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    return [(path_to_str(p), m) for p, m in flat if m is not None]


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_step_is_traced_once(recorded):
    # The recorded run crossed many topology updates and schedule changes through one step
    # wrapped in chex.assert_max_traces(n=1); run it further, from a fresh state.
    tx, history, step = recorded.tx, recorded.history, recorded.step
    assert int(jaxsparse.get_sparse_state(history[-1]["state"]).count) == STEPS
    params = tiny_params()
    state = tx.init(params)
    for t in range(3):
        params, state, _ = step(params, state, *tiny_batch(t))
    assert int(jaxsparse.get_sparse_state(state).count) == 3


def test_params_exactly_masked_after_every_step(recorded):
    history = recorded.history
    for t, snap in enumerate(history):
        for path, m in _sparse_items(snap["masks"]):
            w = _leaf(snap["params"], path)
            assert np.all(w[~m] == 0), f"step {t}: {path} has nonzero inactive weights"


def test_exact_counts_after_every_update(recorded):
    name, kind, history = recorded.name, recorded.kind, recorded.history
    first = {p: int(m.sum()) for p, m in _sparse_items(history[0]["masks"])}
    specs = jaxsparse.layer_specs(history[0]["params"])
    for t, snap in enumerate(history):
        counts = {p: int(m.sum()) for p, m in _sparse_items(snap["masks"])}
        if kind == "fixed":
            assert counts == first, f"step {t}"
        elif kind == "global":
            assert sum(counts.values()) == sum(first.values()), f"step {t}"
    if kind == "pruning":
        # After the last prune the counts are exactly the final budgets.
        final = jaxsparse.layer_budgets(specs, 0.8, "uniform")
        last = {p: int(m.sum()) for p, m in _sparse_items(history[-1]["masks"])}
        if name == "magnitude_global":
            assert sum(last.values()) == sum(final.values())
        else:
            assert last == final


def test_pruning_follows_schedule_exactly():
    tx = jaxsparse.magnitude_pruning(lenient(optax.sgd(0.1)), 0.9, end_step=20, begin_step=2,
                                     update_every=4, initial_sparsity=0.25)
    history, _ = run(tx, 24)
    specs = jaxsparse.layer_specs(history[0]["params"])
    budgets = jaxsparse.layer_budgets(specs, 0.9, "uniform")
    targets = jaxsparse.pruning_targets(specs, budgets, 0.25, 2, 20)
    prune_steps = {2, 6, 10, 14, 18, 20}
    expected = {s.path: s.size for s in specs}
    for t in range(24):
        if t in prune_steps:
            expected = dict(zip([s.path for s in specs], np.asarray(targets(t)).tolist()))
        got = {p: int(m.sum()) for p, m in _sparse_items(history[t + 1]["masks"])}
        assert got == expected, f"step {t}"
    # The integer ramp matches Zhu & Gupta's formula to within rounding.
    for t in prune_steps:
        s_t = 0.9 + (0.25 - 0.9) * (1 - min(1.0, (t - 2) / 18)) ** 3
        for s, n in zip(specs, np.asarray(targets(t))):
            assert abs(n - (1 - s_t) * s.size) <= 1.0


def test_topology_changes_only_on_update_steps(recorded):
    name, kind, history = recorded.name, recorded.kind, recorded.history
    changed_at = []
    for t in range(1, len(history)):
        prev, cur = history[t - 1]["masks"], history[t]["masks"]
        if any(not np.array_equal(a, b) for (_, a), (_, b) in
               zip(_sparse_items(prev), _sparse_items(cur))):
            changed_at.append(t - 1)  # the step index that produced snapshot t
    if name == "static":
        assert changed_at == []
        return
    if kind in ("pruning", "nm"):
        allowed = set(range(0, END + 1, EVERY)) | {END} | {2 + i * EVERY for i in range(10)}
    else:
        allowed = {t for t in range(EVERY, END, EVERY)}
    assert changed_at, "the topology never changed"
    assert set(changed_at) <= allowed, (changed_at, allowed)


def test_grown_weights_are_zero_and_moments_reset(recorded):
    name, history = recorded.name, recorded.history
    grew = 0
    for t in range(1, len(history)):
        old = dict(_sparse_items(history[t - 1]["masks"]))
        state = history[t]["state"]
        inner = jaxsparse.get_sparse_state(state).inner_state
        mu, nu = optax.tree.get(inner, "mu"), optax.tree.get(inner, "nu")
        for path, new in _sparse_items(history[t]["masks"]):
            grown = new & ~old[path]
            grew += int(grown.sum())
            assert np.all(_leaf(history[t]["params"], path)[grown] == 0)
            assert np.all(_leaf(mu, path)[grown] == 0), f"{name} step {t}: mu not reset"
            assert np.all(_leaf(nu, path)[grown] == 0), f"{name} step {t}: nu not reset"
    if name in DST:
        assert grew > 0


def test_same_key_same_masks_different_key_different(recorded):
    name, random, history, step = (recorded.name, recorded.random, recorded.history,
                                   recorded.step)
    make = ALGORITHMS[name][0]
    # A fresh optimizer with the same key, run through the recorded compiled step (the key
    # lives in the state), then one with another key.
    again, _ = run(make(lenient(optax.adam(1e-2)), jax.random.key(0)), STEPS, step=step)
    for (_, a), (_, b) in zip(_sparse_items(history[-1]["masks"]),
                              _sparse_items(again[-1]["masks"])):
        np.testing.assert_array_equal(a, b)
    if random:
        other, _ = run(make(lenient(optax.adam(1e-2)), jax.random.key(1)), STEPS, step=step)
        assert any(not np.array_equal(a, b) for (_, a), (_, b) in
                   zip(_sparse_items(history[-1]["masks"]), _sparse_items(other[-1]["masks"])))


# Variants of a rule already here (a schedule, a distribution) run in the slow tier.
VARIANTS = ("rigl_uniform_const", "srigl_no_ablation")


def _fast_or_slow(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in VARIANTS else n for n in names]


@pytest.mark.parametrize("name", _fast_or_slow(DST + ("magnitude",)))
def test_kept_weights_take_the_inner_update_and_dense_leaves_are_untouched(name):
    make = ALGORITHMS[name][0]
    lr = 0.1
    tx = make(lenient(optax.sgd(lr)), jax.random.key(0))
    history, _ = run(tx, STEPS)
    for t in range(1, len(history)):
        g, before, after = history[t]["grads"], history[t - 1]["params"], history[t]["params"]
        old = dict(_sparse_items(history[t - 1]["masks"]))
        new = dict(_sparse_items(history[t]["masks"]))
        for p_path in ("dense0/bias", "norm/scale", "dense1/bias"):
            np.testing.assert_allclose(_leaf(after, p_path),
                                       _leaf(before, p_path) - lr * _leaf(g, p_path),
                                       rtol=1e-5, atol=1e-7)
        for path in old:
            kept = old[path] & new[path]
            np.testing.assert_allclose(_leaf(after, path)[kept],
                                       (_leaf(before, path) - lr * _leaf(g, path))[kept],
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wrap", ["chain", "inject_inner", "inject_outer", "multisteps_outer",
                                  "multisteps_inner"])
def test_composes_with_optax_wrappers(wrap):
    key = jax.random.key(0)
    if wrap == "chain":
        tx = optax.chain(lenient(optax.clip_by_global_norm(1.0)),
                         jaxsparse.rigl(lenient(optax.adam(1e-2)), 0.8, key=key, end_step=END,
                                        update_every=EVERY))
    elif wrap == "inject_inner":
        inner = lenient(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))
        tx = jaxsparse.rigl(inner, 0.8, key=key, end_step=END, update_every=EVERY)
    elif wrap == "inject_outer":
        tx = lenient(jaxsparse.inject_hyperparams(jaxsparse.rigl)(
            inner=optax.adam(1e-2), sparsity=0.8, key=key, end_step=END, update_every=EVERY,
            drop_fraction=optax.linear_schedule(0.3, 0.1, STEPS)))
    elif wrap == "multisteps_outer":
        tx = lenient(optax.MultiSteps(jaxsparse.rigl(optax.adam(1e-2), 0.8, key=key,
                                                     end_step=END, update_every=EVERY),
                                      every_k_schedule=2))
    else:
        tx = jaxsparse.rigl(lenient(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)), 0.8,
                            key=key, end_step=END, update_every=EVERY)
    history, _ = run(tx, STEPS)
    first = {p: int(m.sum()) for p, m in _sparse_items(history[0]["masks"])}
    changed = False
    for t, snap in enumerate(history):
        assert {p: int(m.sum()) for p, m in _sparse_items(snap["masks"])} == first
        for path, m in _sparse_items(snap["masks"]):
            assert np.all(_leaf(snap["params"], path)[~m] == 0), f"{wrap} step {t}"
        if t and any(not np.array_equal(a, b) for (_, a), (_, b) in zip(
                _sparse_items(history[t - 1]["masks"]), _sparse_items(snap["masks"]))):
            changed = True
    assert changed
    if wrap == "inject_outer":
        hp = history[-1]["state"].hyperparams
        assert "drop_fraction" in hp


def test_non_finite_gradients_never_corrupt_masks():
    tx = jaxsparse.rigl(lenient(optax.sgd(0.1)), 0.8, key=jax.random.key(0), end_step=END,
                        update_every=EVERY)
    params = tiny_params()
    state = tx.init(params)
    params = jaxsparse.apply_masks(params, jaxsparse.get_masks(state))
    step = jax.jit(make_step(tx))
    for t in range(EVERY):
        params, state, _ = step(params, state, *tiny_batch(t))
    before = jaxsparse.get_masks(state)
    grads = jax.tree.map(jnp.ones_like, params)
    grads["dense0"]["kernel"] = grads["dense0"]["kernel"].at[0, 0].set(jnp.nan)
    assert bool(jaxsparse.schedules.periodic(EVERY, END)(jaxsparse.get_sparse_state(state).count))
    _, state = jax.jit(tx.update)(grads, state, params)
    after = jaxsparse.get_masks(state)
    for (_, a), (_, b) in zip(_sparse_items(before), _sparse_items(after)):
        np.testing.assert_array_equal(a, b)


def test_update_without_params_is_a_clear_error():
    tx = jaxsparse.rigl(lenient(optax.sgd(0.1)), 0.8, key=jax.random.key(0), end_step=END)
    params = tiny_params()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"tx.update\(grads, state, params\)"):
        tx.update(params, state)


def test_host_scheduling_refuses_what_it_cannot_check():
    """``topology_due`` needs the sparse transform itself (or its rule) and a host int;
    ``topology_update`` must be static (a flag that disagrees with the schedule:
    test_check_sparse)."""
    tx = jaxsparse.rigl(lenient(optax.sgd(0.1)), 0.8, key=jax.random.key(0), end_step=END,
                        update_every=EVERY)
    assert [jaxsparse.topology_due(tx, t) for t in range(7)] == [
        False, False, False, True, False, False, True]
    with pytest.raises(TypeError, match="before chaining"):
        jaxsparse.topology_due(optax.chain(tx, optax.scale(1.0)), 3)
    with pytest.raises(TypeError, match="count must be a Python int"):
        jaxsparse.topology_due(tx, jnp.asarray(3))
    params = tiny_params()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(TypeError, match="topology_update must be None .* or a Python bool"):
        tx.update(grads, state, params, topology_update=jnp.asarray(True))


@pytest.mark.parametrize("name", ["rigl", "magnitude", "nm_pruning", "static"])
def test_topology_due_is_the_rules_schedule_at_any_count(name):
    """Evaluated by blocks of counts on the host: the same flags as the rule's own
    ``is_update_step`` wherever a loop starts, jumps (a resumed run) or crosses a block."""
    make, _, _ = ALGORITHMS[name]
    tx = make(optax.sgd(0.1), jax.random.key(0))
    rule = jaxsparse.transform._RULES[tx.update]
    block = jaxsparse.transform._SCHEDULE_BLOCK
    counts = ([5000, 4999, 0, 1, 2, 23, 24, 25, block - 1, block, block + 1, 3, 2 * block]
              + list(range(block - 4, block + 4)) + [2**31 - block - 2, 7 * block + 17])
    expected = [bool(rule.is_update_step(jnp.int32(t))) for t in counts]
    assert [jaxsparse.topology_due(tx, t) for t in counts] == expected
    # Loops in several threads sharing the transform, each at its own count.
    from concurrent.futures import ThreadPoolExecutor
    spread = [t + 5 * block * i for t in range(0, 3 * block, 7) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: jaxsparse.topology_due(tx, t), spread))
    assert got == [bool(x) for x in jax.vmap(rule.is_update_step)(jnp.asarray(spread))]
    for bad in (-1, 2**31 - block - 1):
        with pytest.raises(ValueError, match="count must be a step counter"):
            jaxsparse.topology_due(tx, bad)


def test_topology_due_does_not_wait_for_the_step_in_flight():
    """A host-scheduled loop reads the next flag while its last step still runs: a flag
    computed per call would wait for it (on a CPU backend the flag's computation queues
    behind the step: BENCHMARKS.md, stop 40), and the loop's steps would no longer overlap
    their dispatch. The schedule comes back by blocks of counts: within a block already
    read, reading a flag leaves a long computation in flight still running."""
    tx = jaxsparse.rigl(optax.sgd(0.1), 0.8, key=jax.random.key(0), end_step=10**6,
                        update_every=7)
    block = jaxsparse.transform._SCHEDULE_BLOCK
    assert not jaxsparse.topology_due(tx, 3 * block + 3)  # reads this block

    @jax.jit
    def busy(x, n):  # dispatched asynchronously; n = 2000: about half a second here
        return jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ x), x)

    x = busy(jnp.full((256, 256), 0.01), 1).block_until_ready()
    pending = busy(x, 2000)
    if pending.is_ready():  # a runtime that ran it before returning: nothing in flight
        pytest.skip("this runtime executed the computation synchronously")
    got = [jaxsparse.topology_due(tx, t) for t in range(3 * block, 4 * block)]
    still_running = not pending.is_ready()
    pending.block_until_ready()
    assert still_running, "topology_due waited for a computation dispatched before it"
    assert got == [t % 7 == 0 for t in range(3 * block, 4 * block)]


def test_itop_rate_grows_for_dst_and_is_tracked_in_state():
    tx = jaxsparse.set(lenient(optax.sgd(0.1)), 0.8, key=jax.random.key(0), end_step=END,
                       update_every=EVERY)
    history, _ = run(tx, STEPS)
    rates = [float(jaxsparse.itop_rate(jaxsparse.get_ever_active(s["state"]))) for s in history]
    assert rates[0] == pytest.approx(0.2, abs=0.02)
    assert all(b >= a for a, b in zip(rates, rates[1:]))
    assert rates[-1] > rates[0] + 0.05


def test_donating_the_state_keeps_the_factory_usable():
    key = jax.random.key(0)
    tx = jaxsparse.rigl(lenient(optax.sgd(0.1)), 0.8, key=key, end_step=END, update_every=EVERY)
    params = tiny_params()
    state = tx.init(params)
    step = jax.jit(make_step(tx), donate_argnums=(0, 1))
    for t in range(4):
        params, state, _ = step(params, state, *tiny_batch(t))
    # The key given to the factory is still alive, and a fresh init still works.
    assert jax.random.key_data(key).shape == (2,)
    tx.init(tiny_params())


def test_host_scheduled_steps_equal_the_cond_step(recorded):
    """The same run with each step's ``topology_update`` given from the host
    (``jaxsparse.topology_due``): two compiled steps, neither holding the update's
    ``lax.cond``, and every param, mask and state leaf equal to the recorded run's, bit for
    bit, after every step."""
    tx, history = recorded.tx, recorded.history
    if recorded.name in VARIANTS:
        pytest.skip("a variant of an algorithm checked here already")

    def step(params, state, x, y, topology_update):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params, topology_update=topology_update)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, static_argnames="topology_update")
    params = tiny_params()
    state = tx.init(params)
    params = jaxsparse.apply_masks(params, jaxsparse.get_masks(state))
    due = [jaxsparse.topology_due(tx, t) for t in range(STEPS)]
    assert not all(due) and any(due) == (recorded.name != "static")
    for t in range(STEPS):
        params, state = jitted(params, state, *tiny_batch(t), topology_update=due[t])
        want = history[t + 1]
        chex.assert_trees_all_equal(jax.device_get(params), want["params"])
        chex.assert_trees_all_equal(jax.device_get(jaxsparse.get_masks(state)), want["masks"])
        got_state = jax.device_get(state)
        for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want["state"])):
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jitted._cache_size() == len(set(due))
    # The compiled plain step holds no conditional (the lowering's per-platform choices,
    # jax.lax.platform_dependent, are constant and folded away).
    hlo = jitted.lower(params, state, *tiny_batch(0), topology_update=False).compile()
    assert "conditional(" not in hlo.as_text()


def test_state_shares_no_buffer_with_params(recorded):
    # A train step that donates (params, state) fails if any buffer appears twice: the
    # recorded run donated both through all its topology updates; here the fresh pair.
    pointers = recorded.pointers
    assert len(pointers) == len(set(pointers)), recorded.name


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "adagrad": lambda: optax.adagrad(1e-2, initial_accumulator_value=0.1),
    "rmsprop": lambda: optax.rmsprop(1e-2, momentum=0.9),
    "lion": lambda: optax.lion(1e-3),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
}


# Adam-like, momentum-like and accumulating states in the fast tier; the rest in the slow one.
@pytest.mark.parametrize("opt", [o if o in ("adamw", "sgd_momentum", "multisteps")
                                 else pytest.param(o, marks=pytest.mark.slow)
                                 for o in sorted(OPTIMIZERS)])
def test_every_param_shaped_moment_of_grown_weights_is_zero(opt):
    # Moments are zeroed before the inner step (a grown weight's masked gradient is zero):
    # afterwards every param-shaped leaf of the inner state is zero at grown and at inactive
    # positions, for optimizers with non-zero initial state (Adagrad) and accumulators
    # (MultiSteps) too.
    tx = jaxsparse.rigl(lenient(OPTIMIZERS[opt]()), 0.8, key=jax.random.key(0), end_step=END,
                        update_every=EVERY)
    history, _ = run(tx, STEPS)
    grew = 0
    for t in range(1, len(history)):
        old = dict(_sparse_items(history[t - 1]["masks"]))
        inner = jaxsparse.get_sparse_state(history[t]["state"]).inner_state
        for path, new in _sparse_items(history[t]["masks"]):
            grown = new & ~old[path]
            grew += int(grown.sum())
            leaves = [leaf for leaf in jax.tree.leaves(inner)
                      if np.shape(leaf) == grown.shape]
            assert leaves, opt
            for leaf in leaves:
                assert np.all(np.asarray(leaf)[grown] == 0), f"{opt} step {t} {path}"
                # Outside the mask the state is zero too: the step zeroes every weight
                # outside old & new before the inner update (dropped ones included).
                assert np.all(np.asarray(leaf)[~new] == 0), f"{opt} step {t} {path} inactive"
    assert grew > 0


def _rule_counting_updates():
    """A rule whose topology update rewrites its extra state (counts its updates)."""
    return jaxsparse.transform.SparsityRule(
        init_masks=lambda params, key: jaxsparse.get_masks(
            jaxsparse.static(optax.sgd(0.1), 0.8, key=key).init(params)),
        is_update_step=jaxsparse.schedules.periodic(EVERY, END),
        update_masks=lambda x: x.masks,
        update_extra=lambda x, new_masks: x.extra + 1,
        init_extra=lambda params, masks: jnp.zeros((), jnp.int32),
    )


def test_a_rule_may_rewrite_its_extra_state_at_updates():
    tx = jaxsparse.sparse_transform(lenient(optax.sgd(0.1)), _rule_counting_updates(),
                                    key=jax.random.key(0))
    history, _ = run(tx, 10)
    is_update = jaxsparse.schedules.periodic(EVERY, END)
    for snap in history:
        sparse = jaxsparse.get_sparse_state(snap["state"])
        done = sum(bool(is_update(t)) for t in range(int(sparse.count)))
        assert int(sparse.extra) == done
    assert int(jaxsparse.get_sparse_state(history[-1]["state"]).extra) == 3
    # A non-finite gradient leaves the extra state alone.
    state = history[-1]["state"]
    while not bool(jaxsparse.schedules.periodic(EVERY, END)(
            jaxsparse.get_sparse_state(state).count)):
        _, state = tx.update(jax.tree.map(jnp.zeros_like, history[-1]["params"]), state,
                             history[-1]["params"])
    before = int(jaxsparse.get_sparse_state(state).extra)
    bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), history[-1]["params"])
    _, state = jax.jit(tx.update)(bad, state, history[-1]["params"])
    assert int(jaxsparse.get_sparse_state(state).extra) == before


def _count_primitive(jaxpr, name):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_primitive(sub, name)
    return n


def _primitives_under_cond(jaxpr, counts=None, inside=False):
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        if inside:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitives_under_cond(sub, counts, inside or eqn.primitive.name == "cond")
    return counts


def _top_level_conds(jaxpr):
    # Not the per-platform choices (jax.lax.platform_dependent, a cond over platforms that
    # the lowering resolves): the conds that run.
    return [e for e in jaxpr.eqns
            if e.primitive.name == "cond" and e.params.get("branches_platforms") is None]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_one_update_cond_that_carries_only_packed_masks(name):
    # The topology update is the only lax.cond at the top of a step, and what goes through
    # it is the bit-packed masks (uint8, 1/8 byte per weight): no param-sized float state
    # (SNFS's momentum, optimizer moments) is copied through it on a plain step. A rule
    # whose schedule does not depend on the step (static: never) has no cond at all.
    tx = ALGORITHMS[name][0](optax.sgd(0.1, momentum=0.9), jax.random.key(0))
    params = tiny_params()
    state = tx.init(params)
    conds = _top_level_conds(jax.make_jaxpr(tx.update)(params, state, params).jaxpr)
    if name == "static":
        assert conds == []
        return
    assert len(conds) == 1
    out_dtypes = {str(v.aval.dtype) for v in conds[0].outvars}
    assert out_dtypes <= {"uint8"}, out_dtypes


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_no_float_matmul_in_the_step(name):
    # Default-precision matrix products run in bf16 on TPU and TF32 on recent GPUs: the
    # library counts and sums with exact reductions, never with dot products.
    tx = ALGORITHMS[name][0](optax.sgd(0.1, momentum=0.9), jax.random.key(0))
    params = tiny_params()
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
    assert _count_primitive(jaxpr, "dot_general") == 0


def test_the_update_lowers_for_tpu_with_the_sorting_selection():
    # jax.lax.platform_dependent picks the selection per platform at lowering time: the
    # TPU program holds the sort (the reference), the CPU program the counting search.
    tx = ALGORITHMS["rigl"][0](optax.sgd(0.1, momentum=0.9), jax.random.key(0))
    params = tiny_params()
    state = tx.init(params)
    traced = jax.jit(tx.update).trace(params, state, params)
    tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "stablehlo.sort" in tpu and "stablehlo.sort" not in cpu
    # Both loop over same-shaped layers (map_layers); only the CPU one has the searches.
    assert tpu.count("stablehlo.while") < cpu.count("stablehlo.while")


def test_frequency_is_a_deprecated_alias_of_update_every():
    with pytest.warns(DeprecationWarning, match="update_every"):
        old = jaxsparse.magnitude_pruning(optax.sgd(0.1), 0.5, end_step=10, frequency=4)
    new = jaxsparse.magnitude_pruning(optax.sgd(0.1), 0.5, end_step=10, update_every=4)
    masks = []
    for tx in (old, new):
        params = tiny_params()
        params, state = jaxsparse.init_masked(tx, params)
        step = jax.jit(tx.update)
        counts = []
        for _ in range(6):
            _, state = step(params, state, params)
            counts.append(sum(jaxsparse.count_active(jaxsparse.get_masks(state)).values()))
        masks.append(counts)
    assert masks[0] == masks[1] and masks[0][0] > masks[0][-1]  # pruned at the same steps
    with pytest.raises(ValueError, match="update_every must be a positive integer"):
        jaxsparse.magnitude_pruning(optax.sgd(0.1), 0.5, end_step=10, update_every=0)


def _compiled_rigl_step_text(depth: int) -> str:
    params = {f"layer_{i:02d}": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros((8,))}
              for i in range(depth)}
    tx = jaxsparse.rigl(optax.sgd(0.1, momentum=0.9), 0.5, key=jax.random.key(0),
                        end_step=10, update_every=2, distribution="uniform")
    state = tx.init(params)
    return jax.jit(tx.update).lower(params, state, params).compile().as_text()


def _fused_computation_sizes(hlo: str) -> list[int]:
    blocks = hlo.split("\n%")
    return [b.count("\n") for b in blocks if b.startswith("fused_computation")]


@pytest.mark.slow
def test_the_compiled_step_grows_linearly_with_depth():
    # A flag summed from per-leaf scalars in Python was fused into every leaf's mask select:
    # each of those kernels held a chain over all leaves, so the compiled program (and the
    # compile time) grew with the square of the depth. No kernel may grow with depth, and
    # each added layer adds a bounded number of instructions.
    sizes = {d: _compiled_rigl_step_text(d) for d in (4, 8, 12)}
    largest = {d: max(_fused_computation_sizes(t)) for d, t in sizes.items()}
    assert largest[12] <= largest[4] + 2, largest
    lines = {d: t.count("\n") for d, t in sizes.items()}
    assert lines[12] - lines[8] <= 1.2 * (lines[8] - lines[4]) + 20, lines
