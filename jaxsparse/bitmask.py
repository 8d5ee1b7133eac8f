"""Bit-packed masks: one bit per weight in the optimizer state.

A sparse optimizer's state holds its masks as :class:`PackedMask` leaves: the mask's last
axis (the neuron axis of a Flax kernel) packed eight entries to a ``uint8``. That is 1/8 of a
bool array in memory, in checkpoints and in every copy XLA makes of the state. Unpacking
is a shift and an ``and`` per weight, which XLA fuses into the elementwise loops that read
the mask (the masked gradient, the masked update), so a training step reads 1/8 byte of
mask per weight instead of 1 byte. The sparse step unpacks to :func:`word_mask` words (all
ones where set) and masks values with :func:`select`, integer ``and``/``or`` on their bits:
``jnp.where`` bit for bit, and vectorized by XLA:CPU, where a select on bools is not.

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


def _bit_values(packed: PackedMask, word) -> jax.Array:
    """The mask's bits as 0 / 1 of the unsigned integer type ``word``, in its shape."""
    bits = packed.bits
    shifts = jnp.arange(_BITS, dtype=word).reshape((1,) * bits.ndim + (_BITS,))
    on = jnp.right_shift(bits[..., None].astype(word), shifts) & word(1)
    on = on.reshape(*bits.shape[:-1], bits.shape[-1] * _BITS)
    return on[..., : packed.shape[-1]].reshape(packed.shape)


def unpack(packed: PackedMask) -> jax.Array:
    """The bool mask of a :class:`PackedMask` (fuses into the consumer under ``jit``)."""
    return _bit_values(packed, jnp.uint8).astype(jnp.bool_)


def _word(itemsize: int):
    """The unsigned integer of ``itemsize`` bytes, or ``None`` (8 bytes need x64)."""
    if itemsize == 8 and not jax.config.jax_enable_x64:
        return None
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}.get(itemsize)


def word_mask(packed: PackedMask, dtype) -> jax.Array:
    """The mask as unsigned words of ``dtype``'s width (``uint32`` for ``float32``): all
    ones where it is set, zero elsewhere, for :func:`select`. Widths without an unsigned
    integer (complex64 without x64) get ``uint32``. Computed once per leaf and fused by XLA
    into each elementwise loop that reads it (no array of words is stored)."""
    word = _word(jnp.dtype(dtype).itemsize) or jnp.uint32
    return word(0) - _bit_values(packed, word)


def select(words: jax.Array, a, b=None) -> jax.Array:
    """``jnp.where(mask, a, b)`` (``b`` zero when ``None``) for a mask given as
    :func:`word_mask` words, bit for bit: ``(a & words) | (b & ~words)`` on the values' bits
    (NaN payloads and signed zeros kept).

    XLA:CPU vectorizes these integer operations but not a select on unpacked bools: a
    masked SGD step over 47M weights ran 1.4x a dense one with the select and 1.05x with
    the bits (BENCHMARKS.md). Any backend computes the same values. Bool and complex values
    (no integer of their width) take ``jnp.where``; words of another width than ``a``'s are
    converted (all ones stay all ones)."""
    a = jnp.asarray(a)
    if not jnp.issubdtype(words.dtype, jnp.unsignedinteger):
        raise TypeError(f"select: the mask must be word_mask words (unsigned), got "
                        f"{words.dtype}")
    if words.shape != a.shape:
        raise ValueError(f"select: the values have shape {a.shape}, the mask {words.shape}")
    word = _word(a.dtype.itemsize)
    if word is None or a.dtype == jnp.bool_ or jnp.issubdtype(a.dtype, jnp.complexfloating):
        return jnp.where(words != 0, a, jnp.zeros((), a.dtype) if b is None else b)
    if words.dtype != word:
        # Through signed integers: -1 (all ones) stays -1 at any width.
        signed = jnp.dtype(f"int{8 * words.dtype.itemsize}")
        wide = jnp.dtype(f"int{8 * a.dtype.itemsize}")
        words = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(words, signed).astype(wide), word)
    out = jax.lax.bitcast_convert_type(a, word) & words
    if b is not None:
        b = jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape)
        out = out | (jax.lax.bitcast_convert_type(b, word) & ~words)
    return jax.lax.bitcast_convert_type(out, a.dtype)


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
