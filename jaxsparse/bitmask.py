"""Bit-packed masks: one bit per weight in the optimizer state.

A sparse optimizer's state holds its masks as :class:`PackedMask` leaves: the mask's last
axis (the neuron axis of a Flax kernel) packed eight entries to a ``uint8``. That is 1/8 of a
bool array in memory, in checkpoints and in every copy XLA makes of the state. Unpacking
is a shift and an ``and`` per weight, which XLA fuses into the elementwise loops that read
the mask (the masked gradient, the masked update), so a training step reads 1/8 byte of
mask per weight instead of 1 byte.

Packing keeps every axis but the last, so a mask's ``NamedSharding`` carries over to its
bits unchanged when the packed last axis still divides by its mesh axis (a 3072-wide kernel
packs to 384 bytes per row).

Example:
  >>> pm = pack(jnp.array([[True, False, True]]))
  >>> pm.bits, pm.shape
  (Array([[5]], dtype=uint8), (1, 3))
  >>> unpack(pm)
  Array([[ True, False,  True]], dtype=bool)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BITS = 8


class PackedMask:
    """A bool mask of static ``shape`` stored as ``uint8`` ``bits`` (last axis packed).

    A pytree node whose only leaf is ``bits``: it checkpoints, shards and passes through
    ``jit``, ``lax.cond`` and tree maps like any array leaf.
    """

    __slots__ = ("bits", "shape")

    def __init__(self, bits, shape: tuple[int, ...]):
        self.bits = bits
        self.shape = tuple(int(d) for d in shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __repr__(self) -> str:
        return f"PackedMask(shape={self.shape}, bits={getattr(self.bits, 'shape', self.bits)})"


def _flatten(m: PackedMask):
    return (m.bits,), m.shape


def _unflatten(shape, children) -> PackedMask:
    # The shape was normalized when the node was first built: no ``__init__`` here. A
    # compiled step rebuilds every mask of its output state on every call (a few
    # microseconds of Python each, a few hundred per step at 100 layers).
    m = object.__new__(PackedMask)
    (m.bits,) = children
    m.shape = shape
    return m


jax.tree_util.register_pytree_node(PackedMask, _flatten, _unflatten)


def is_packed(x) -> bool:
    """``is_leaf`` predicate for trees of packed masks (``None`` leaves stay visible too)."""
    return x is None or isinstance(x, PackedMask)


def packed_width(n: int) -> int:
    """Bytes per row for a last axis of ``n`` entries."""
    return -(-n // _BITS)


def pack(mask: jax.Array) -> PackedMask:
    """Packs a bool mask (rank >= 1) along its last axis, eight entries per ``uint8``."""
    mask = jnp.asarray(mask)
    if mask.ndim == 0:
        raise ValueError("pack needs a mask of rank >= 1, got a scalar")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"pack needs a bool mask, got dtype {mask.dtype}")
    n = mask.shape[-1]
    pad = packed_width(n) * _BITS - n
    m = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
    m = m.reshape(*mask.shape[:-1], -1, _BITS).astype(jnp.uint8)
    weights = jnp.left_shift(jnp.uint8(1), jnp.arange(_BITS, dtype=jnp.uint8))
    bits = jnp.sum(m * weights.reshape((1,) * (m.ndim - 1) + (_BITS,)), axis=-1,
                   dtype=jnp.uint8)
    return PackedMask(bits, mask.shape)


def unpack(packed: PackedMask) -> jax.Array:
    """The bool mask of a :class:`PackedMask` (fuses into the consumer under ``jit``)."""
    bits = packed.bits
    shifts = jnp.arange(_BITS, dtype=jnp.uint8).reshape((1,) * bits.ndim + (_BITS,))
    m = (jnp.right_shift(bits[..., None], shifts) & jnp.uint8(1)).astype(jnp.bool_)
    m = m.reshape(*bits.shape[:-1], bits.shape[-1] * _BITS)
    return m[..., : packed.shape[-1]].reshape(packed.shape)


# The unsigned integer of each float width: a select on the bits of a float.
_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}

# Platforms where :func:`select` combines bits (measured faster there: BENCHMARKS.md); every
# other platform selects on the unpacked bools, the reference.
BITWISE_SELECT_PLATFORMS = ("cpu",)


def select(packed: PackedMask, a, b=None) -> jax.Array:
    """``jnp.where(unpack(packed), a, b)`` (``b`` zero when ``None``), bit for bit.

    On :data:`BITWISE_SELECT_PLATFORMS` each mask bit is widened to a word of ``a``'s width,
    all ones or all zeros, and the result is ``(a & word) | (b & ~word)`` on the values'
    bits (NaN payloads and signed zeros kept). XLA:CPU vectorizes those integer operations,
    but not a select on unpacked bools: a masked SGD step over 47M weights ran 1.4x a dense
    one with the select and 1.05x with the bits (BENCHMARKS.md). Elsewhere, and for dtypes
    without an unsigned integer of their width (bool, complex), the reference
    ``jnp.where``. Chosen at lowering time (``jax.lax.platform_dependent``).
    """
    a = jnp.asarray(a)
    if jnp.shape(a) != packed.shape:
        raise ValueError(f"select: the values have shape {jnp.shape(a)}, the mask "
                         f"{packed.shape}")
    args = (packed.bits, a) if b is None else (
        packed.bits, a, jnp.broadcast_to(jnp.asarray(b, a.dtype), packed.shape))

    def reference(bits, a, b=None):
        return jnp.where(unpack(PackedMask(bits, packed.shape)), a,
                         jnp.zeros((), a.dtype) if b is None else b)

    word = _WORDS.get(a.dtype.itemsize)
    if word is None or a.dtype == jnp.bool_ or jnp.issubdtype(a.dtype, jnp.complexfloating):
        return reference(*args)

    def by_bits(bits, a, b=None):
        shifts = jnp.arange(_BITS, dtype=word).reshape((1,) * bits.ndim + (_BITS,))
        on = jnp.right_shift(bits[..., None].astype(word), shifts) & word(1)
        on = on.reshape(*bits.shape[:-1], bits.shape[-1] * _BITS)
        ones = word(0) - on[..., : packed.shape[-1]].reshape(packed.shape)  # 0 or ~0
        out = jax.lax.bitcast_convert_type(a, word) & ones
        if b is not None:
            out = out | (jax.lax.bitcast_convert_type(b, word) & ~ones)
        return jax.lax.bitcast_convert_type(out, a.dtype)

    return jax.lax.platform_dependent(*args, default=reference,
                                      **{p: by_bits for p in BITWISE_SELECT_PLATFORMS})


def pack_tree(masks):
    """Packs every bool leaf of a mask tree; ``None`` and already packed leaves pass
    through."""
    return jax.tree.map(lambda m: m if is_packed(m) else pack(m), masks, is_leaf=is_packed)


def unpack_tree(packed):
    """Unpacks every :class:`PackedMask` of a tree; ``None`` and bool leaves pass through."""
    return jax.tree.map(lambda m: unpack(m) if isinstance(m, PackedMask) else m, packed,
                        is_leaf=is_packed)


def or_packed(a: PackedMask, b: PackedMask) -> PackedMask:
    """Union of two packed masks of one shape (bitwise, no unpacking)."""
    return PackedMask(a.bits | b.bits, a.shape)


def and_packed(a: PackedMask, b: PackedMask) -> PackedMask:
    """Intersection of two packed masks of one shape (bitwise, no unpacking)."""
    return PackedMask(a.bits & b.bits, a.shape)


def complement(a: PackedMask) -> PackedMask:
    """The packed mask of ``~unpack(a)`` (bitwise; the padding bits are never unpacked)."""
    return PackedMask(~a.bits, a.shape)


def select_packed(pred, a: PackedMask, b: PackedMask) -> PackedMask:
    """``a`` where the scalar ``pred`` holds, else ``b``."""
    return PackedMask(jnp.where(pred, a.bits, b.bits), a.shape)
