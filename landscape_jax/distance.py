"""The anchor-distance penalty and the anchor buffer it reads.

An *anchor* is a copy of the trainable parameters taken during training. From the
moment it is stored, the objective gains a Gaussian bump centred on it,

    penalty(θ) = s · (1/C) · Σ_c exp(−‖θ − θ_c‖² / σ²),

with strength ``s``, width ``σ²`` and ``C`` active anchors, so that gradient descent
is pushed away from every anchor. Anchors are kept in one pytree shaped like the
parameters with a leading slot axis ``K`` and a boolean mask of the slots in use:
the penalty for any number of anchors is one fused pass over the parameters, and
storing an anchor changes no shape, so the training step is compiled once.
"""

import jax
import jax.numpy as jnp

PyTree = object


def squared_distances(params: PyTree, anchors: PyTree) -> jax.Array:
    """Squared L2 distances from ``params`` to every anchor slot.

    Args:
      params: a pytree of arrays.
      anchors: a pytree with the structure of ``params`` whose leaves carry an extra
        leading axis of size ``K`` (one slot per anchor).

    Returns:
      f32[K]: ``‖params − anchors[k]‖²`` summed over all leaves, for each slot k.
    """

    def leaf_distances(param: jax.Array, anchor: jax.Array) -> jax.Array:
        difference = param[None].astype(jnp.float32) - anchor.astype(jnp.float32)
        return jnp.sum(jnp.square(difference).reshape(anchor.shape[0], -1), axis=1)

    per_leaf = jax.tree.leaves(jax.tree.map(leaf_distances, params, anchors))
    return sum(per_leaf[1:], per_leaf[0])


def penalty(
    params: PyTree,
    anchors: PyTree,
    *,
    strength: float | jax.Array,
    width: float | jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """The Gaussian anchor penalty ``s · mean_c exp(−‖θ − θ_c‖² / σ²)``.

    Args:
      params: the trainable parameters θ.
      anchors: stored anchors, ``params``-shaped leaves with a leading axis ``K``.
      strength: s, the height of each bump.
      width: σ², the squared width of each bump (in the units of ‖θ‖²).
      mask: bool[K], the slots that hold an anchor; all slots when None.

    Returns:
      f32[]: the penalty averaged over the active anchors; 0, with a zero gradient,
      when no anchor is active.
    """
    kernel = jnp.exp(-squared_distances(params, anchors) / width)
    if mask is None:
        return strength * jnp.mean(kernel)
    active = jnp.sum(mask)
    total = jnp.sum(jnp.where(mask, kernel, 0.0))
    return strength * total / jnp.maximum(active, 1)


def empty_anchors(params: PyTree, num_slots: int) -> tuple[PyTree, jax.Array]:
    """An anchor buffer with ``num_slots`` empty slots for ``params``.

    Args:
      params: the parameters the anchors will be copies of.
      num_slots: K, the most anchors the run will store (at least 1, so that the
        buffer keeps the same shapes whether or not a run uses anchors).

    Returns:
      ``(anchors, mask)``: zero-filled anchors with a leading axis K, and an
      all-False bool[K] mask.
    """
    num_slots = max(int(num_slots), 1)
    anchors = jax.tree.map(
        lambda leaf: jnp.zeros((num_slots, *leaf.shape), jnp.float32), params
    )
    return anchors, jnp.zeros((num_slots,), bool)


def add_anchor(
    anchors: PyTree, mask: jax.Array, params: PyTree
) -> tuple[PyTree, jax.Array]:
    """Stores ``params`` in the first free slot of the buffer.

    Shapes are unchanged, so a step compiled for the buffer serves after the call.
    When every slot is taken the buffer is returned unchanged; callers size the
    buffer from the run's anchor epochs so that this does not happen.

    Args:
      anchors: the anchor buffer, leaves with a leading axis K.
      mask: bool[K], the slots in use (filled from slot 0 upwards).
      params: the parameters to store.

    Returns:
      The updated ``(anchors, mask)``.
    """
    slot = jnp.sum(mask)
    has_room = slot < mask.shape[0]
    slot = jnp.minimum(slot, mask.shape[0] - 1)

    def store(buffer: jax.Array, leaf: jax.Array) -> jax.Array:
        updated = buffer.at[slot].set(leaf.astype(buffer.dtype))
        return jnp.where(has_room, updated, buffer)

    anchors = jax.tree.map(store, anchors, params)
    mask = jnp.where(has_room, mask.at[slot].set(True), mask)
    return anchors, mask
