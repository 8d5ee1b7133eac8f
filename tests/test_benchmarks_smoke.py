"""Smoke tests of the benchmarks (experiments/benchmarks/scaling.py and others).

Checks that a tiny ``--quick`` run prints well-formed tables and writes its JSON record;
timings are never asserted.
"""

import contextlib
import functools
import io
import json
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import jaxsparse
from experiments.benchmarks import pass_layout, scaling, search_rounds
from jaxsparse import bitmask, topology


def _tables(text):
    """The markdown tables of ``text``: lists of rows, each a list of cells."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaling")
    path = tmp / "quick.json"
    out = io.StringIO()
    # optax's optimizers are not written for the suite's strict dtype promotion.
    with contextlib.redirect_stdout(out), jax.numpy_dtype_promotion("standard"):
        rows = scaling.main(["--quick", "--algorithms", "static", "--depths", "2",
                             "--sizes", "", "--json", str(path), "--plot", str(tmp / "q.png")])
    return out.getvalue(), rows, json.loads(path.read_text()), path


def test_measure_times_the_host_scheduled_plain_step_of_an_updating_algorithm():
    """RigL's row has the host-scheduled plain step's ratios; static (no update) has none."""
    spec = scaling.depth_spec("2")
    with jax.numpy_dtype_promotion("standard"):
        setup = scaling.make_setup(spec, "sgdm", 4, ["opt"])
        rigl, = scaling.measure(setup, "rigl", sparsity=0.9, update_every=10, repeats=1,
                                target_s=1e-3, parts=["opt"])
        static, = scaling.measure(setup, "static", sparsity=0.9, update_every=10, repeats=1,
                                  target_s=1e-3, parts=["opt"])
    assert rigl["host_ratio_median"] > 0 and rigl["host_cpu_ratio"] > 0
    assert set(rigl["times"]["wall"]) == {"dense", "plain", "update", "host",
                                         "dense (update rotation)", "dense (host rotation)"}
    assert static["host_ratio_median"] is None and "host" not in static["times"]["wall"]


def test_train_step_host_runner_takes_the_schedules_updates():
    """``train_step.py --schedule host`` runs the README's loop: the same masks after three
    update periods as the step that decides in a ``lax.cond``, params equal to float32
    rounding (XLA fuses the two programs differently)."""
    from experiments.benchmarks import train_step

    model = train_step.MODELS["lenet300"]()
    x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    y = jnp.arange(8) % 10
    params = model.init(jax.random.key(0), x)["params"]
    make = train_step.algorithms(3)["rigl"]
    with jax.numpy_dtype_promotion("standard"):
        cond, host = (train_step.Runner(model, make(optax.sgd(0.1, momentum=0.9)), params,
                                        x, y, host=h) for h in (False, True))
        for r in (cond, host):
            r.period(9)
    assert cond.t == host.t == 10
    masks = [jaxsparse.get_masks(r.state, r.params) for r in (cond, host)]
    chex.assert_trees_all_equal(*masks)
    initial = jaxsparse.get_masks(make(optax.sgd(0.1)).init(params), params)
    assert any(not jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks[1]),
                                                         jax.tree.leaves(initial)))
    chex.assert_trees_all_close(cond.params, host.params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_quick_run_prints_both_tables(quick):
    text, rows, _, _ = quick
    opt, full = _tables(text)
    assert tuple(opt[0]) == scaling.OPT_COLUMNS
    assert tuple(full[0]) == scaling.FULL_COLUMNS
    assert all(set(c) <= set("-") for c in opt[1]), "second line must be the separator"
    models = [scaling.depth_spec("2").label]
    for table, columns in [(opt, scaling.OPT_COLUMNS), (full, scaling.FULL_COLUMNS)]:
        body = [dict(zip(columns, r)) for r in table[2:]]
        assert all(len(r) == len(columns) for r in table[2:])
        assert [(r["model"], r["algorithm"], r["inner"]) for r in body] == [
            (m, "static", "sgdm") for m in models]
        for r in body:
            assert r["plain/dense med"].endswith("x") and float(r["plain/dense med"][:-1]) > 0
            # static never updates its topology
            assert r["update/dense med"] == r["update/dense min"] == r["update/dense CPU"] == "-"
            assert float(r["plain/dense CPU"][:-1]) > 0
            for column in ("compile s dense->sparse", "compile CPU s dense->sparse"):
                dense_s, sparse_s = (float(x) for x in r[column].split(" -> "))
                assert dense_s > 0 and sparse_s > 0
    body = [dict(zip(scaling.OPT_COLUMNS, r)) for r in opt[2:]]
    assert [int(r["kernels"]) for r in body] == [2]
    # one mask (at most a byte) per prunable weight, plus a counter and a key per model
    assert all(0 < float(r["state B/weight"]) <= 1.01 for r in body)
    assert len(rows) == 2


def test_selection_sorting_traces_the_sorting_reference():
    """``--selection sorting`` lowers a selection as GPUs and TPUs run it (a sort), the
    default as this CPU does (the counting search: no sort of the layer)."""
    keys = jnp.arange(1, 4097, dtype=jnp.uint32).reshape(64, 64)

    def lowered():
        return jax.jit(lambda x: topology.top_k_keys(x, 100)).lower(keys).as_text()

    with scaling.selections("platform"):
        assert "sort" not in lowered()
    with scaling.selections("sorting"):
        assert topology.COUNTING_PLATFORMS == ()
        assert "sort" in lowered()
    assert topology.COUNTING_PLATFORMS == ("cpu",)


def test_table_formats_update_columns():
    row = dict(model="m", series="size", params=2_000_000, kernels=4, algorithm="rigl",
               inner="adam", part="opt", dense_ms=1.5, plain_ratio_median=1.04,
               plain_ratio_best=1.01, update_ratio_median=12.34, update_ratio_best=10.0,
               plain_cpu_ratio=1.1, update_cpu_ratio=11.0, host_ratio_median=1.02,
               host_cpu_ratio=1.03, update_ms_per_mparam=9.25, compile_dense_s=0.1, compile_sparse_s=2.5,
               compile_dense_cpu_s=0.2, compile_sparse_cpu_s=3.0,
               compile_init_dense_s=0.05, compile_init_sparse_s=0.75,
               state_bytes_per_weight=2.0, temp_dense_bytes=0, temp_sparse_bytes=8_000_000,
               extra_temp_per_param_largest=16.0, extra_temp_per_param_model=4.0,
               fault_mb_per_call={"dense": 0.04, "plain": 12.44})
    (header, _, cells), = _tables(scaling.table([row, dict(row, part="full", batch=8)], "opt"))
    assert dict(zip(header, cells)) == {
        "model": "m", "params": "2.00M", "kernels": "4", "algorithm": "rigl", "inner": "adam",
        "dense ms": "1.500", "plain/dense med": "1.04x", "plain/dense min": "1.01x",
        "plain/dense CPU": "1.10x", "host plain/dense med": "1.02x",
        "host plain/dense CPU": "1.03x", "update/dense med": "12.3x", "update/dense min": "10.0x",
        "update/dense CPU": "11.0x", "update ms/M params": "9.25",
        "compile s dense->sparse": "0.10 -> 2.50",
        "compile CPU s dense->sparse": "0.20 -> 3.00",
        "init compile s dense->sparse": "0.05 -> 0.75", "state B/weight": "2.00",
        "temp MB dense->sparse": "0.0 -> 8.0", "extra temp B/param largest": "16.0",
        "extra temp B/param model": "4.00", "page faults MB/call dense / plain": "0.0 / 12.4"}


@pytest.mark.slow
def test_quick_run_writes_json_without_local_paths(quick):
    _, rows, record, path = quick
    assert (path.parent / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["part"] for r in record["rows"]] == [r["part"] for r in rows]
    assert record["args"]["algorithms"] == ["static"]
    assert "json" not in record["args"] and "plot" not in record["args"]
    opt = [r for r in record["rows"] if r["part"] == "opt"]
    assert [r["params"] for r in opt] == [scaling.depth_spec("2").n_params]
    assert all(len(r["times"][clock][variant]) == 2 for r in opt
               for clock in ("wall", "cpu") for variant in ("dense", "plain"))


@pytest.mark.slow
def test_load_reprints_the_recorded_tables(quick, capsys):
    text, _, _, path = quick
    scaling.main(["--load", str(path)])
    assert _tables(capsys.readouterr().out) == _tables(text)


def test_load_names_the_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="--load: cannot read a scaling record from .*bad.json"):
        scaling.main(["--load", str(bad)])


@pytest.mark.parametrize("text,blocks,d,ff", [
    ("1M", 2, 256, 1024), ("10M", 2, 768, 3072), ("50M", 11, 768, 3072),
    ("100M", 21, 768, 3072)])
def test_size_series_models(text, blocks, d, ff):
    spec = scaling.size_spec(text)
    assert (spec.blocks, spec.d_model, spec.d_ff) == (blocks, d, ff)
    shapes = jax.eval_shape(functools.partial(scaling.init_params, spec), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == spec.n_params
    assert abs(spec.n_params / scaling.parse_count(text, "--sizes") - 1) < 0.1


def test_depth_series_models():
    spec = scaling.depth_spec("96")
    shapes = jax.eval_shape(functools.partial(scaling.init_params, spec), jax.random.key(0))
    kernels = [x for x in jax.tree.leaves(shapes) if x.ndim == 2]
    assert len(kernels) == spec.n_kernels == 96
    assert {x.shape for x in kernels} == {(256, 256)}


class _State(NamedTuple):
    masks: dict
    count: jax.Array


def test_pin_count_sets_every_sparse_counter():
    inner = optax.ScaleByAdamState(jnp.asarray(3, jnp.int32), {}, {})
    state = (_State({"w": None}, jnp.asarray(1, jnp.int32)), inner,
             [_State({}, jnp.asarray(2, jnp.int32))])
    pinned = scaling.pin_count(state, jnp.asarray(7, jnp.uint32))
    assert [int(pinned[0].count), int(pinned[2][0].count)] == [7, 7]
    assert pinned[0].count.dtype == jnp.int32
    assert int(pinned[1].count) == 3  # the inner optimizer's own counter is left alone


@pytest.mark.parametrize("argv,option", [
    (["--sizes", "10Q"], "--sizes"),
    (["--depths", "3"], "--depths"),
    (["--algorithms", "rigl,nope"], "--algorithms"),
    (["--inner", "lamb"], "--inner"),
    (["--parts", "full"], "--parts"),
    (["--sizes", "", "--depths", ""], "--sizes"),
])
def test_bad_options_are_refused_by_name(argv, option, capsys):
    with pytest.raises(SystemExit):
        scaling.parse_args(argv)
    assert option in capsys.readouterr().err


def test_dense_optimizer_cannot_be_pinned():
    params = scaling.init_params(scaling.depth_spec("2"), jax.random.key(0))
    with pytest.raises(ValueError, match="no sparse state"):
        scaling.Runner(optax.sgd(0.1), params, sparse=True)


def test_unknown_algorithm_names_the_option():
    with pytest.raises(ValueError, match="--algorithms: unknown algorithm 'nope'"):
        scaling.make_sparse("nope", optax.sgd(0.1), 0.9, 10, jax.random.key(0))


def test_layermap_benchmark_compares_the_two_loop_shapes(capsys):
    from experiments.benchmarks import layermap as layermap_bench

    (row,) = layermap_bench.main(["--groups", "6x16x8", "--repeats", "1"])
    assert row["loop_shape"] == (2, 3)
    assert set(row["ms"]) == {"one loop", "nested"} and min(row["ms"].values()) > 0
    assert "| 6 x 16x8 | 0 | (2, 3) |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--groups"):
        layermap_bench.parse_group("6x16")


def test_interleaved_prepares_each_repetition_untimed_and_rotates():
    from experiments.benchmarks import _timing

    log = []
    variants = {name: (functools.partial(log.append, name), 2) for name in ("a", "b")}
    prepare = {"b": functools.partial(log.append, "prep b")}
    times = _timing.interleaved(variants, 2, prepare)
    # Repetition 0 runs a then b, repetition 1 b then a; b is prepared before each of its
    # repetitions and a never is.
    assert log == ["a", "a", "prep b", "b", "b", "prep b", "b", "b", "a", "a"]
    assert {k: len(v) for k, v in times["wall"].items()} == {"a": 2, "b": 2}


def test_untaken_branch_benchmark_times_each_count(capsys):
    from experiments.benchmarks import untaken_branch

    rows = untaken_branch.main(["--counts", "0,3", "--calls", "2", "--repeats", "1"])
    assert [r["reductions"] for r in rows] == [0, 3]
    assert all(r["us_min"] > 0 for r in rows)
    assert "| 3 |" in capsys.readouterr().out
    # The branch is not taken: the donated input comes back unchanged.
    x = jnp.arange(6.0).reshape(2, 3)
    assert jnp.array_equal(untaken_branch.program(3)(jnp.copy(x), jnp.asarray(False)), x)
    assert not jnp.array_equal(untaken_branch.program(3)(jnp.copy(x), jnp.asarray(True)), x)
    with pytest.raises(SystemExit):
        untaken_branch.main(["--counts", "a,b"])


def test_cond_barrier_benchmark_compares_equal_steps(capsys):
    """The barrier step computes what the dense step computes (its cond is never taken and
    adds zero): same params after a step from the same start; one row per size."""
    from experiments.benchmarks import cond_barrier, scaling

    rows = cond_barrier.main(["--sizes", "20K", "--repeats", "1", "--calls", "1",
                              "--batch", "4"])
    assert [r["batch"] for r in rows] == [4] and rows[0]["dense_ms"] > 0
    assert "| cond / dense med |" in capsys.readouterr().out
    spec = scaling.size_spec("20K")
    params = scaling.init_params(spec, jax.random.key(0))
    x, y = (jax.random.normal(k, (4, spec.d_model)) for k in jax.random.split(
        jax.random.key(1)))
    tx = scaling.INNER["sgdm"]()
    out = {k: jax.jit(f)(params, tx.init(params), x, y)[0]
           for k, f in cond_barrier.steps(tx).items()}
    chex.assert_trees_all_equal(out["dense"], out["barrier"])
    assert not jnp.array_equal(out["dense"]["block_00"]["up"]["kernel"],
                               params["block_00"]["up"]["kernel"])


def test_mask_select_benchmark_checks_its_variants_equal(capsys):
    """The three ways of applying a mask compute the same step (checked bit for bit before
    timing; a variant that differs raises); one row per variant, dense first."""
    from experiments.benchmarks import mask_select

    rows = mask_select.main(["--blocks", "1", "--repeats", "1"])
    assert [r["variant"] for r in rows] == ["dense", "bool select", "bits", "byte mask"]
    assert rows[0]["ratio_median"] == 1.0 and all(r["ms"] > 0 for r in rows)
    assert "| bits |" in capsys.readouterr().out
    broken = dict(mask_select.VARIANTS)
    # Gradients and momentum left unmasked: the momentum of inactive weights differs.
    broken["bits"] = (mask_select.masked_step(
        lambda k, a, b: a if b is None else bitmask.select(k, a, b),
        lambda k, p: bitmask.word_mask(k, p.dtype)), "packed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mask_select, "VARIANTS", broken)
        with pytest.raises(AssertionError):
            mask_select.main(["--blocks", "1", "--repeats", "1"])


@pytest.mark.slow
def test_lm_step_one_state_prints_one_row_per_variant(capsys, tmp_path):
    from experiments.benchmarks import lm_step

    lm_step.main(["--preset=tiny", "--seq_len=16", "--batch_size=8", "--algorithms=dense,rigl",
                  "--update_every=2", "--repeats=1", "--processes=1", "--one_state",
                  "--host_topology", f"--json_out={tmp_path / 'rows.json'}"])
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert [r["processes"] for r in saved] == [1]
    assert set(saved[0]["step_s"]) == {"dense", "rigl", "rigl-host"}
    out = capsys.readouterr().out
    rows = {r[1]: r for t in _tables(out) for r in t[2:] if len(r) == 7}
    assert set(rows) == {"dense", "rigl", "rigl-host"}
    # two compiled steps (plain, update) for the host-scheduled variant
    assert saved[0]["compile_cpu_s"]["rigl-host"] > saved[0]["compile_cpu_s"]["dense"]
    assert rows["dense"][4] == "1.00, 1.00" and float(rows["rigl"][2]) > 0
    assert "each from a fresh state (--one_state)" in out
    assert "1.000 bits/weight" in out  # packed masks: one bit per prunable weight


def test_no_timing_reports_memory_and_leaves_time_columns_empty():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), jax.numpy_dtype_promotion("standard"):
        rows = scaling.main(["--quick", "--algorithms", "rigl", "--depths", "2", "--sizes", "",
                             "--parts", "opt", "--no-timing"])
    (opt,) = _tables(out.getvalue())
    (r,) = [dict(zip(scaling.OPT_COLUMNS, cells)) for cells in opt[2:]]
    for column in ("dense ms", "plain/dense med", "update/dense CPU", "update ms/M params",
                   "page faults MB/call dense / plain"):
        assert r[column] == "-", (column, r[column])
    assert float(r["extra temp B/param largest"]) > 0 and float(r["state B/weight"]) > 0
    assert rows[0]["repeats"] == 0 and rows[0]["times"] is None


def test_allocator_names_a_preload_only_when_it_is_loaded(monkeypatch):
    """A preloaded jemalloc is named with its MALLOC_CONF; a preload the loader could not
    find (not in the process's memory map) is reported as glibc malloc, not as jemalloc."""
    from experiments.benchmarks import _timing

    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1")
    mapped = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert _timing.allocator(mapped) == "libjemalloc.so.2 (MALLOC_CONF=dirty_decay_ms:-1)"
    assert _timing.allocator("7f00-7f10 r-xp 0 08:01 1 /usr/lib/libc.so.6\n") == "glibc malloc"
    monkeypatch.delenv("LD_PRELOAD")
    assert _timing.allocator("") == "glibc malloc"


def test_search_rounds_benchmark_counts_both_estimates(capsys):
    with jax.numpy_dtype_promotion("standard"):
        rows = search_rounds.main(["--size", "200K", "--updates", "2", "--algorithms", "rigl",
                                   "--seeds", "1", "--shape", "64x512"])
    labels = [r[0] for r in rows]
    assert any("first update" in x for x in labels)
    assert any("update repeated (2)" in x for x in labels)
    assert sum("64x512 whole" in x for x in labels) == (
        len(search_rounds.KINDS) * len(search_rounds.CASES))
    first = next(r for r in rows if "first update" in r[0])
    assert first[1] > 0 and first[2] > 0 and first[3] > 0  # searches, rounds of each
    assert topology._search.__name__ == "_search"  # the counter is removed again
    table = _tables(capsys.readouterr().out)[0]
    assert table[0][:3] == ["selections", "searches", "rounds per search: quadratic"]
    assert len(table) == 2 + len(rows)

    with pytest.raises(SystemExit):
        search_rounds.main(["--shape", "768by3072"])
    assert "--shape" in capsys.readouterr().err


def test_search_rounds_benchmark_compares_the_per_neuron_hint(capsys):
    with jax.numpy_dtype_promotion("standard"):
        rows = search_rounds.main(["--compare", "hint", "--size", "200K", "--updates", "1",
                                   "--algorithms", "srigl", "--seeds", "1", "--shape",
                                   "64x512"])
    srigl = [r for r in rows if r[0].startswith("srigl") and "per neuron" in r[0]]
    assert srigl and all(r[1] > 0 and r[2] > 0 and r[3] > 0 for r in srigl)
    assert sum("64x512 per neuron" in r[0] for r in rows) == (
        len(search_rounds.KINDS) * len(search_rounds.CASES))
    assert topology._sample_hint.__name__ == "_sample_hint"  # restored
    table = _tables(capsys.readouterr().out)[0]
    assert table[0][2:4] == ["rounds per search: hint", "no hint"]


@pytest.mark.parametrize("bench, last", [(search_rounds, "quadratic / dense"),
                                         (pass_layout, "library / dense")])
def test_timed_benchmarks_time_both_settings_beside_dense(bench, last, capsys):
    with jax.numpy_dtype_promotion("standard"):
        rows = bench.main(["--timed", "200K", "--algorithms", "rigl", "--repeats", "1",
                           "--warm", "1"])
    (label, dense, first, second), = rows
    assert label.startswith("rigl") and min(dense, first, second) > 0
    table = _tables(capsys.readouterr().out)[0]
    assert table[0][-1] == last and len(table) == 3


def test_pass_layout_benchmark_times_every_layout_with_one_result(capsys):
    rows = pass_layout.main(["--shapes", "64x512,512x8", "--repeats", "2"])
    assert [shape for shape, _ in rows] == [(64, 512), (512, 8)]
    for _, t in rows:
        assert t["equal"] and min(t[n] for n in pass_layout.LAYOUTS) > 0
    table = _tables(capsys.readouterr().out)[0]
    assert table[0][1] == "library ms" and len(table) == 4
    assert topology._ROWS_FIRST_MIN_SIZE == 1 << 21 and topology._WIDE == 64  # restored
    with pytest.raises(SystemExit):
        pass_layout.main(["--shapes", "64by512"])
    assert "--shapes" in capsys.readouterr().err
