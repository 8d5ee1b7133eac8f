"""Small Flax linen models for the experiments (fast on CPU).

Every model takes ``uint8`` or float images ``[B, H, W, C]`` (uint8 is scaled to [0, 1]) and
returns logits ``[B, num_classes]``. Kernels are named ``kernel`` so jaxsparse prunes them by
default; biases, norms, embeddings and the class token stay dense.

* ``lenet300``: LeNet-300-100 (784-300-100-10 on MNIST; the input size follows the data).
* ``lenet5``: two 5x5 convs (6, 16 channels) with average pooling, then 120-84-classes.
* ``vgg``: a small VGG-style CNN (3x3 convs, max pooling) for 28x28 or 32x32 inputs.
* ``vit``: a ViT-tiny (patch embedding, pre-norm attention + MLP blocks, mean pooling). Its
  attention projections are 2-D ``Dense`` kernels (see :class:`SelfAttention`), so that a
  SRigL neuron (the kernel's last axis) is one (head, feature) output unit, as in the paper.
  ``mlp="condensed"`` with ``mlp_sparsity=s`` (``model_config("vit", mlp="condensed",
  mlp_sparsity=0.9)``) trains each block's two MLP layers in condensed form
  (:class:`jaxsparse.condensed.training.CondensedTrainDense`, constant fan-in ``k = max(1,
  round((1 - s) * n_in))`` as for the byte LM, :func:`experiments.lm.model.mlp_fan_in`):
  ``params`` hold ``values [n_out, k]`` and ``bias`` under the dense layers' names
  (``Dense_0``, ``Dense_1``), the ``sparsity`` collection their ``indices``
  (:func:`init_variables`); ``jaxsparse.condensed.expand_params`` gives the masked dense
  ViT's params.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from experiments.lm.model import MLP_KINDS, mlp_fan_in
from jaxsparse.condensed.training import CondensedTrainDense

MODELS = ("lenet300", "lenet5", "vgg", "vit")


def _avg_pool(x, window):
    # nn.avg_pool divides by an int window size: an implicit int->float promotion that
    # jax_numpy_dtype_promotion="strict" rejects.
    summed = nn.pool(x, 0.0, jax.lax.add, window, window, "VALID")
    return summed / float(window[0] * window[1])


def _as_float(x):
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): a 300-100 ReLU MLP."""

    hidden: Sequence[int] = (300, 100)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = _as_float(x).reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
    """LeNet-5: conv(6, 5x5, same) - pool - conv(16, 5x5, valid) - pool - 120 - 84."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = _as_float(x)
        x = nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x))
        x = _avg_pool(x, (2, 2))
        # VALID as in LeNet-5; SAME when the map is too small for it (8x8 digits).
        pad = "VALID" if x.shape[1] >= 5 else "SAME"
        x = nn.relu(nn.Conv(16, (5, 5), padding=pad)(x))
        if x.shape[1] >= 2:
            x = _avg_pool(x, (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(self.num_classes)(x)


class VGGSmall(nn.Module):
    """VGG-style CNN: ``stages`` of 3x3 conv blocks, each followed by 2x2 max pooling, then
    global average pooling and a dense classifier. With the default (32, 64, 128) it maps
    28x28 to 3x3 and 32x32 to 4x4 before pooling."""

    stages: Sequence[Sequence[int]] = ((32, 32), (64, 64), (128,))
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = _as_float(x)
        for stage in self.stages:
            for width in stage:
                x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
            if x.shape[1] >= 2:
                x = nn.max_pool(x, (2, 2), (2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class MlpBlock(nn.Module):
    """GELU MLP ``d -> mlp_dim -> d``; ``mlp="condensed"``: both layers condensed at
    ``mlp_sparsity`` (module docstring), named as the dense ones."""

    mlp_dim: int
    mlp: str = "dense"
    mlp_sparsity: float = 0.0

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")

        def layer(features, n_in, name):
            if self.mlp == "dense":
                return nn.Dense(features, name=name)
            return CondensedTrainDense(features, k=mlp_fan_in(n_in, self.mlp_sparsity),
                                       name=name)

        x = nn.gelu(layer(self.mlp_dim, d, "Dense_0")(x))
        return layer(d, self.mlp_dim, "Dense_1")(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with 2-D ``Dense`` kernels ``query``, ``key``, ``value``
    (``[dim, dim]``, heads split by a reshape of the output) and ``out`` (``[dim, dim]``).

    The math is that of ``flax.linen.MultiHeadDotProductAttention`` (biases, softmax of
    ``q k^T / sqrt(head_dim)``, heads concatenated before ``out``), but Flax's module keeps
    q/k/v as 3-D ``[dim, heads, head_dim]`` kernels. jaxsparse's structured rules (SRigL)
    count neurons on a kernel's last axis with every other axis as fan-in, so a 3-D kernel
    would make a "neuron" one feature index pooled over all heads (fan-in ``dim * heads``).
    Here every output unit (head, feature) of q, k and v is its own neuron with fan-in
    ``dim``, as for the 2-D ``in_proj`` of torchvision's ViT used by the SRigL paper
    (Lasby et al. 2024); ``out`` has fan-in ``heads * head_dim`` either way."""

    num_heads: int

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"dim {d} is not divisible by num_heads {self.num_heads}")
        split = (b, n, self.num_heads, d // self.num_heads)
        q, k, v = (nn.Dense(d, name=name)(x).reshape(split)
                   for name in ("query", "key", "value"))
        y = nn.dot_product_attention(q, k, v)
        return nn.Dense(d, name="out")(y.reshape(b, n, d))


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    mlp: str = "dense"
    mlp_sparsity: float = 0.0

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = SelfAttention(self.num_heads)(y)
        x = x + y
        y = nn.LayerNorm()(x)
        return x + MlpBlock(self.mlp_dim, self.mlp, self.mlp_sparsity)(y)


class ViT(nn.Module):
    """ViT-tiny (Dosovitskiy et al. 2021): non-overlapping patches, learned position
    embeddings, pre-norm transformer blocks, mean-pooled head. ``mlp="condensed"``: the MLP
    blocks in condensed form at ``mlp_sparsity`` (module docstring)."""

    patch: int = 4
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 10
    mlp: str = "dense"
    mlp_sparsity: float = 0.0

    @nn.compact
    def __call__(self, x):
        x = _as_float(x)
        if x.shape[1] % self.patch or x.shape[2] % self.patch:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch {self.patch}")
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, name="embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, d))
        x = x + pos
        for _ in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.mlp, self.mlp_sparsity)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


def model_config(name: str = "lenet300", **overrides) -> ml_collections.ConfigDict:
    """Default hyper-parameters of ``name`` (a ConfigDict to put in ``config.model``), with
    ``overrides`` set on top (e.g. ``model_config("vit", mlp="condensed",
    mlp_sparsity=0.9)``; an option the model does not have is refused by
    :func:`create_model`)."""
    cfg = _default_config(name)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _default_config(name: str) -> ml_collections.ConfigDict:
    if name == "lenet300":
        return ml_collections.ConfigDict({"name": name, "hidden": (300, 100)})
    if name == "lenet5":
        return ml_collections.ConfigDict({"name": name})
    if name == "vgg":
        return ml_collections.ConfigDict({"name": name, "stages": ((32, 32), (64, 64), (128,))})
    if name == "vit":
        return ml_collections.ConfigDict(
            {"name": name, "patch": 4, "dim": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128}
        )
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def create_model(config, num_classes: int = 10) -> nn.Module:
    """Builds the model described by ``config`` (a :func:`model_config`-style mapping)."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    classes = {"lenet300": LeNet300, "lenet5": LeNet5, "vgg": VGGSmall, "vit": ViT}
    if name not in classes:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    for k in ("hidden",):
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    if "stages" in cfg:
        cfg["stages"] = tuple(tuple(s) for s in cfg["stages"])
    try:
        return classes[name](num_classes=num_classes, **cfg)
    except TypeError as e:
        raise ValueError(f"bad options for model {name!r}: {e}") from None


def init_params(model: nn.Module, image_shape: Sequence[int], key: jax.Array):
    """Initial params for inputs of ``image_shape`` (H, W, C)."""
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]


def init_variables(model: nn.Module, image_shape: Sequence[int], key: jax.Array) -> dict:
    """All initial variables: ``{"params"}``, plus ``"sparsity"`` (the condensed MLP layers'
    indices) for a ViT with ``mlp="condensed"``."""
    return dict(model.init(key, jnp.zeros((1, *image_shape), jnp.float32)))


def condensed_n_in(model: nn.Module) -> dict[str, int]:
    """Input width of each condensed MLP layer of a :class:`ViT`, by layer path (what
    ``jaxsparse.condensed.expand_params`` needs)."""
    out = {}
    for i in range(model.depth):
        out[f"EncoderBlock_{i}/MlpBlock_0/Dense_0"] = model.dim
        out[f"EncoderBlock_{i}/MlpBlock_0/Dense_1"] = model.mlp_dim
    return out


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
