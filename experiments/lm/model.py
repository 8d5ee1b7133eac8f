"""A decoder-only transformer language model (GPT-2 style, pre-LayerNorm) in Flax linen.

Every parameter carries *logical* axis names (``nn.with_logical_partitioning``) so a mesh
and a table of rules (:data:`DEFAULT_RULES`) decide how it is sharded; nothing in the model
names a mesh axis. Attention and MLP weights are plain 2-D ``Dense`` kernels named
``kernel`` (so jaxsparse prunes them by default); the token and position embeddings, biases
and LayerNorm scales stay dense. The output projection is tied to the token embedding, as in
GPT-2 (Radford et al. 2019), so the vocabulary matrix is never pruned.

Sizes (``vocab=256``, ``seq_len=256``; "prunable" = the six 2-D kernels of each block):

==========  ======  =======  =====  ======  ============  ============
preset      layers  d_model  heads  d_ff    params        prunable
==========  ======  =======  =====  ======  ============  ============
``tiny``    2       64       4      256     132,864       98,304
``1m``      4       128      4      512     858,880       786,432
``10m``     6       384      6      1536    10,844,160    10,616,832
``125m``    12      768      12     3072    85,449,216    84,934,656
==========  ======  =======  =====  ======  ============  ============

(``125m`` is GPT-2 small's body; with GPT-2's 50,257-token vocabulary it would be 124M.)

Condensed MLP (issue 18): ``mlp="condensed"`` with ``mlp_sparsity=s`` makes each block's
two MLP layers :class:`jaxsparse.condensed.training.CondensedTrainDense` with constant
fan-in ``k = max(1, round((1 - s) * n_in))`` (:func:`mlp_fan_in`; the same ``k`` as
``jaxsparse.srigl(..., distribution="uniform")`` gives those kernels): ``params`` hold
``values [n_out, k]`` and ``bias`` in place of ``kernel``, the ``sparsity`` collection the
``indices [n_out, k]`` (:func:`init_variables`). Attention and embeddings are unchanged.
The values' rows carry the neurons' logical axis (``mlp`` for ``fc``, ``embed`` for
``proj``), the slot axis none; the condensed layers run the C++ CPU kernels and are tested
on one device only (the sharded trainer, :mod:`experiments.lm.trainer`, refuses them).

Example:
  >>> cfg = lm_config("1m")
  >>> model = TransformerLM(**cfg)
  >>> params = init_params(model, jax.random.key(0), batch=2)
  >>> logits = model.apply({"params": params}, tokens)          # [B, T, 256]
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxsparse.condensed.training import CondensedTrainDense

# Logical axis -> mesh axis. "batch" rows go to the data axis; the wide axes of attention
# (the concatenated heads, "qkv") and of the MLP ("mlp") to the model axis (Megatron-style
# tensor parallelism: the first matmul splits columns, the second rows, one all-reduce each).
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("seq", None),
    ("embed", None),
    ("qkv", "model"),
    ("mlp", "model"),
    ("vocab", None),
)

PRESETS = {
    "tiny": dict(num_layers=2, d_model=64, num_heads=4, d_ff=256),
    "1m": dict(num_layers=4, d_model=128, num_heads=4, d_ff=512),
    "10m": dict(num_layers=6, d_model=384, num_heads=6, d_ff=1536),
    "125m": dict(num_layers=12, d_model=768, num_heads=12, d_ff=3072),
}


def lm_config(preset: str = "1m", **overrides) -> ml_collections.ConfigDict:
    """Model hyperparameters of a preset (see the module table) with ``overrides``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LM preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = ml_collections.ConfigDict(dict(vocab_size=256, seq_len=256, **PRESETS[preset]))
    c.update(overrides)
    return c


def _dense(features: int, axes: tuple[str, str], name: str, std: float = 0.02):
    return nn.Dense(
        features,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
    )


MLP_KINDS = ("dense", "condensed")


def mlp_fan_in(n_in: int, sparsity: float) -> int:
    """Constant fan-in of a condensed MLP layer: ``max(1, round((1 - sparsity) * n_in))``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"mlp_sparsity must be in [0, 1), got {sparsity!r}")
    return max(1, min(n_in, round((1.0 - sparsity) * n_in)))


def _mlp_layer(kind: str, features: int, n_in: int, sparsity: float,
               axes: tuple[str, str], name: str, std: float = 0.02):
    if kind == "dense":
        return _dense(features, axes, name, std)
    return CondensedTrainDense(features, k=mlp_fan_in(n_in, sparsity), name=name,
                               values_init=nn.initializers.normal(std), out_axis=axes[1])


def _layer_norm(name: str):
    return nn.LayerNorm(
        name=name,
        epsilon=1e-5,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
    )


def _constrain(x, axes: Sequence[str | None]):
    # A no-op without a mesh / rules context; under one it pins activations to the rules.
    return nn.with_logical_constraint(x, tuple(axes))


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention then a GELU MLP, both residual."""

    d_model: int
    num_heads: int
    d_ff: int
    resid_std: float
    mlp: str = "dense"
    mlp_sparsity: float = 0.0

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        h = _layer_norm("ln_attn")(x)
        q = _dense(d, ("embed", "qkv"), "query")(h)
        k = _dense(d, ("embed", "qkv"), "key")(h)
        v = _dense(d, ("embed", "qkv"), "value")(h)
        head = d // self.num_heads

        def heads(z):
            return _constrain(z.reshape(b, t, self.num_heads, head), ("batch", "seq", "qkv", None))

        att = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        att = _constrain(att.reshape(b, t, d), ("batch", "seq", "qkv"))
        x = x + _dense(d, ("qkv", "embed"), "attn_out", self.resid_std)(att)
        x = _constrain(x, ("batch", "seq", "embed"))
        h = _layer_norm("ln_mlp")(x)
        h = nn.gelu(_mlp_layer(self.mlp, self.d_ff, d, self.mlp_sparsity, ("embed", "mlp"),
                               "fc")(h))
        h = _constrain(h, ("batch", "seq", "mlp"))
        x = x + _mlp_layer(self.mlp, d, self.d_ff, self.mlp_sparsity, ("mlp", "embed"), "proj",
                           self.resid_std)(h)
        return _constrain(x, ("batch", "seq", "embed"))


class TransformerLM(nn.Module):
    """Decoder-only LM: ``tokens int32[B, T] -> logits float32[B, T, vocab]``.

    Learned position embeddings, ``num_layers`` pre-LN blocks, a final LayerNorm and logits
    through the (tied) token embedding. Residual projections start with std
    ``0.02 / sqrt(2 * num_layers)`` (GPT-2). ``mlp="condensed"``: condensed MLP layers at
    ``mlp_sparsity`` (module docstring); apply with ``{"params", "sparsity"}``.
    """

    vocab_size: int = 256
    seq_len: int = 256
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 512
    mlp: str = "dense"
    mlp_sparsity: float = 0.0

    @nn.compact
    def __call__(self, tokens):
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"tokens have length {t} > seq_len={self.seq_len}")
        embed = nn.Embed(
            self.vocab_size, self.d_model, name="token_embed",
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), ("seq", "embed")), (self.seq_len, self.d_model))
        x = embed(tokens.astype(jnp.int32)) + pos[None, :t, :]
        x = _constrain(x, ("batch", "seq", "embed"))
        resid_std = 0.02 / (2.0 * self.num_layers) ** 0.5
        for i in range(self.num_layers):
            x = Block(self.d_model, self.num_heads, self.d_ff, resid_std, self.mlp,
                      self.mlp_sparsity, name=f"block_{i}")(x)
        x = _layer_norm("ln_final")(x)
        logits = embed.attend(x)
        return _constrain(logits, ("batch", "seq", "vocab"))


def make_model(c: ml_collections.ConfigDict) -> TransformerLM:
    """The model described by a config from :func:`lm_config`."""
    return TransformerLM(
        vocab_size=int(c.vocab_size), seq_len=int(c.seq_len), num_layers=int(c.num_layers),
        d_model=int(c.d_model), num_heads=int(c.num_heads), d_ff=int(c.d_ff),
        mlp=str(c.get("mlp", "dense")), mlp_sparsity=float(c.get("mlp_sparsity", 0.0)))


def _init_boxed(model: TransformerLM, key: jax.Array):
    return _init_all(model, key)["params"]


def _init_all(model: TransformerLM, key: jax.Array):
    tokens = jnp.zeros((1, model.seq_len), jnp.int32)
    return model.init(key, tokens)


def init_variables(model: TransformerLM, key: jax.Array) -> dict:
    """All (unboxed) variables: ``{"params"}``, plus ``"sparsity"`` (the condensed MLP
    layers' indices) with ``mlp="condensed"``."""
    return jax.jit(lambda k: dict(nn.unbox(_init_all(model, k))))(key)


def logical_axes(model: TransformerLM):
    """The params' logical axis names: a tree of ``PartitionSpec`` of logical names."""
    boxed = jax.eval_shape(lambda k: _init_boxed(model, k), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def init_params(model: TransformerLM, key: jax.Array, shardings=None):
    """Plain (unboxed) params (a condensed MLP's indices: :func:`init_variables`); with ``shardings`` (a tree of ``NamedSharding``, e.g. from
    :func:`jaxsparse.sharding.logical_shardings`) created directly in place on the mesh."""

    def init(k):
        return nn.unbox(_init_boxed(model, k))

    if shardings is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=shardings)(key)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
