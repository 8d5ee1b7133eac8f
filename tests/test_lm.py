"""The byte LM's model, corpus loader and config checks (no training here: see
tests/test_lm_train.py and tests/test_multiprocess.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import lm_tiny
from experiments.lm import data as data_lib
from experiments.lm import model as model_lib


@pytest.fixture(scope="module")
def tiny():
    c = model_lib.lm_config("tiny", seq_len=16)
    model = model_lib.make_model(c)
    params = model_lib.init_params(model, jax.random.key(0))
    return model, params


def test_presets_and_param_counts():
    counts = {}
    for p in ("tiny", "1m", "10m", "125m"):
        m = model_lib.make_model(model_lib.lm_config(p))
        shapes = jax.eval_shape(lambda k, m=m: model_lib.init_params(m, k), jax.random.key(0))
        counts[p] = model_lib.count_params(shapes)
    assert counts["tiny"] < counts["1m"] < counts["10m"] < counts["125m"]
    assert 0.5e6 < counts["1m"] < 1.5e6 and 80e6 < counts["125m"] < 130e6
    with pytest.raises(ValueError, match="unknown LM preset 'huge'"):
        model_lib.lm_config("huge")


def test_every_param_has_logical_axes_and_kernels_are_prunable(tiny):
    model, params = tiny
    axes = model_lib.logical_axes(model)
    p_leaves = jax.tree.leaves(params)
    a_leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(p_leaves) == len(a_leaves)
    for p, a in zip(p_leaves, a_leaves):
        assert len(a) == p.ndim
    import jaxsparse
    prunable = jaxsparse.masks.prunable_paths(params)
    # q, k, v, attention out, fc, proj per block; embeddings stay dense (tied output).
    assert len(prunable) == 6 * model.num_layers
    assert not any("embed" in p for p in prunable)


def test_forward_is_causal(tiny):
    model, params = tiny
    tokens = jnp.asarray(np.arange(2 * 16).reshape(2, 16) % 256, jnp.int32)
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, tokens)
    assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
    changed = tokens.at[:, 10].set(7)
    logits2 = apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :10]), np.asarray(logits2[:, :10]))
    assert not np.allclose(np.asarray(logits[:, 10:]), np.asarray(logits2[:, 10:]))
    with pytest.raises(ValueError, match="seq_len=16"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_stdlib_corpus_split_by_file():
    train, valid, test = data_lib.stdlib_files()
    assert len(train) == len(data_lib.STDLIB_TRAIN) and len(valid) == len(data_lib.STDLIB_VALID)
    assert len(test) == len(data_lib.STDLIB_TEST)
    names = [{f.name for f in split} for split in (train, valid, test)]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    corpus = data_lib.load_corpus("stdlib")
    assert corpus.train.dtype == np.uint8 and corpus.train.size > 10 * corpus.valid.size > 0
    assert corpus.train.size > 10 * corpus.test.size > 0
    assert bytes(corpus.valid[:200]).decode("utf-8", "replace").strip()
    assert bytes(corpus.test).startswith(test[0].read_bytes())
    assert [f.rsplit("/", 1)[-1] for f in corpus.test_files] == [f.name for f in test]


def test_text_dir_loader_and_errors(tmp_path):
    for i, text in enumerate(["alpha " * 20, "beta " * 20, "gamma " * 20]):
        (tmp_path / f"f{i}.txt").write_text(text)
    (tmp_path / "skip.bin").write_bytes(b"\x00" * 10)
    c = data_lib.load_text_dir(tmp_path, valid_fraction=0.3)
    assert [f.rsplit("/", 1)[-1] for f in c.train_files] == ["f0.txt", "f1.txt"]
    assert [f.rsplit("/", 1)[-1] for f in c.valid_files] == ["f2.txt"]
    assert bytes(c.valid).startswith(b"gamma")
    assert c.test.size == 0 and c.test_files == ()  # no test split unless asked for
    c = data_lib.load_corpus("text_dir", tmp_path, valid_fraction=0.3, test_fraction=0.3)
    assert [[f.rsplit("/", 1)[-1] for f in files]
            for files in (c.train_files, c.valid_files, c.test_files)] == [
                ["f0.txt"], ["f1.txt"], ["f2.txt"]]
    assert bytes(c.valid).startswith(b"beta") and bytes(c.test).startswith(b"gamma")
    with pytest.raises(data_lib.CorpusError, match="need at least 4"):
        data_lib.load_text_dir(tmp_path, valid_fraction=0.5, test_fraction=0.3)
    with pytest.raises(data_lib.CorpusError, match="test_fraction must be in"):
        data_lib.load_text_dir(tmp_path, test_fraction=1.0)
    with pytest.raises(data_lib.CorpusError, match="missing_dir"):
        data_lib.load_text_dir(tmp_path / "missing_dir")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("x")
    with pytest.raises(data_lib.CorpusError, match="holds 1 file"):
        data_lib.load_text_dir(tmp_path / "one")
    with pytest.raises(data_lib.CorpusError, match="unknown corpus 'wiki'"):
        data_lib.load_corpus("wiki")
    with pytest.raises(data_lib.CorpusError, match="needs data_dir"):
        data_lib.load_corpus("text_dir")


def test_batches_depend_only_on_key_and_step():
    data = jnp.asarray(np.arange(1000) % 251, jnp.uint8)
    key = jax.random.key(3)
    a = data_lib.get_batch(data, key, 5, batch=4, seq_len=8)
    b = jax.jit(data_lib.get_batch, static_argnums=(3, 4))(data, key, jnp.int32(5), 4, 8)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (4, 9) and a.dtype == jnp.int32
    # Each row is a contiguous window of the corpus.
    rows = np.asarray(a)
    assert np.all((np.diff(rows, axis=1) % 251) == 1)
    c = data_lib.get_batch(data, key, 6, batch=4, seq_len=8)
    assert not np.array_equal(rows, np.asarray(c))
    w = data_lib.eval_windows(np.arange(100, dtype=np.uint8), seq_len=10, max_windows=3)
    assert w.shape == (3, 11) and w[1, 0] == 10 and w[0, -1] == w[1, 0]
    with pytest.raises(data_lib.CorpusError, match="shorter than seq_len"):
        data_lib.eval_windows(np.arange(5, dtype=np.uint8), seq_len=10)


def test_setup_refuses_bad_mesh_and_batch():
    from experiments.lm import trainer
    c = lm_tiny.get_config()
    c.mesh_shape = (3, 2)
    with pytest.raises(ValueError, match=r"mesh shape \(3, 2\) needs 6 devices but 8"):
        trainer.make_setup(c)
    c = lm_tiny.get_config()
    c.batch_size = 6
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 devices"):
        trainer.make_setup(c)
    c = lm_tiny.get_config()
    c.model.d_ff = 66
    c.mesh_shape = (2, 4)
    with pytest.raises(ValueError, match=r"leaf 'block_0/fc/bias'.*not divisible by mesh axes"):
        trainer.make_setup(c)
