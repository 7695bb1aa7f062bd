"""Probes of the loss landscape around snapshots: distances, straight paths, planes.

Pure functions on variables (``{'params': ..., 'batch_stats': ...}``) and arrays,
meant for a notebook:

    datasets = data.load_datasets(config.data)
    eval_data = probes.model_inputs(datasets.eval, datasets.mean, datasets.std)
    train_data = probes.model_inputs(
        datasets.train, datasets.mean, datasets.std, num_examples=2048
    )
    path = probes.linear_path(
        model, first.variables, second.variables, np.linspace(0, 1, 11),
        eval_data, train_data,
    )
    path['loss'], path['barrier']

Batch statistics. Averaged weights do not match any stored BatchNorm statistics,
so wherever parameters are combined the statistics are recomputed on training
images (`recompute_batch_stats`): the model runs in training mode on consecutive
batches, each BatchNorm layer's statistics of every batch are recovered from its
running-average update, and the result is their plain mean over the batches (a
cumulative average: running statistics restarted from zero with no decay, as is
usual for stochastic weight averaging). At the endpoints of a path the stored
statistics of the snapshots are used instead, unless asked otherwise, so that the
endpoints reproduce their own loss exactly.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax import flatten_util

from landscape_jax import data, ensemble, models

PyTree = Any
Examples = dict[str, jax.Array]


def model_inputs(
    split: data.DeviceData,
    mean: jax.Array,
    std: jax.Array,
    num_examples: int | None = None,
) -> Examples:
    """Normalized images and labels of a split, ready for the probes.

    Args:
      split: a split of `data.load_datasets` (uint8 images on the device).
      mean: f32[C] per-channel mean of the training split.
      std: f32[C] per-channel standard deviation of the training split.
      num_examples: keep only the first this many examples; None keeps all.

    Returns:
      ``{'image': f32[N, H, W, C], 'label': int32[N]}``.
    """
    images, labels = split.images, split.labels
    if num_examples is not None:
        images, labels = images[:num_examples], labels[:num_examples]
    return {'image': data.normalize(images, mean, std), 'label': labels}


def distance_matrix(params_list: Sequence[PyTree]) -> jax.Array:
    """L2 distances between parameter pytrees of the same structure.

    Pass ``params`` (not batch statistics) to measure what the anchor penalty
    measures.

    Args:
      params_list: M pytrees with the same structure and shapes.

    Returns:
      f32[M, M] with ``D[i, j] = ‖θ_i − θ_j‖``: symmetric, zero on the diagonal.

    Raises:
      ValueError: if the pytrees differ in structure or shapes.
    """
    structure = jax.tree.structure(params_list[0])
    for index, params in enumerate(params_list):
        if jax.tree.structure(params) != structure:
            raise ValueError(
                f'params_list[{index}] has a different structure from params_list[0].'
            )
    flat = jnp.stack([flatten_util.ravel_pytree(p)[0] for p in params_list])
    rows = [jnp.sqrt(jnp.sum((flat - flat[i]) ** 2, axis=-1)) for i in range(len(flat))]
    return jnp.stack(rows)


def interpolate(params_a: PyTree, params_b: PyTree, alpha: float | jax.Array) -> PyTree:
    """The point ``(1 − α) θ_a + α θ_b`` of the line through two pytrees.

    Exact at the endpoints: α = 0 gives ``params_a`` and α = 1 ``params_b``.

    Args:
      params_a: the pytree at α = 0.
      params_b: the pytree at α = 1, of the same structure.
      alpha: the position on the line; outside [0, 1] it extrapolates.

    Returns:
      The interpolated pytree.
    """
    return jax.tree.map(lambda a, b: (1 - alpha) * a + alpha * b, params_a, params_b)


def evaluate(
    model: nn.Module, variables: PyTree, eval_data: Examples, batch_size: int = 1000
) -> dict[str, jax.Array]:
    """Mean cross-entropy and accuracy of a model with fixed variables.

    Args:
      model: a flax module called as ``model.apply(variables, x, train=False)``.
      variables: ``{'params': ..., 'batch_stats': ...}``.
      eval_data: ``{'image': f32[N, H, W, C], 'label': int[N]}`` model inputs.
      batch_size: examples per forward pass.

    Returns:
      ``{'loss': f32 scalar, 'accuracy': f32 scalar}`` on the device.
    """
    logits = ensemble.predict_logits(model, variables, eval_data['image'], batch_size)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, eval_data['label'])
    return {
        'loss': jnp.mean(losses),
        'accuracy': ensemble.accuracy(logits, eval_data['label']),
    }


def recompute_batch_stats(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    batch_size: int = 128,
    momentum: float = models.BATCH_NORM_MOMENTUM,
) -> PyTree:
    """BatchNorm statistics of ``variables['params']``, estimated on training images.

    The images are cut into ``len(images) // batch_size`` full batches (the rest
    is dropped). On each batch the model runs in training mode with its running
    statistics set to zero, so that the update ``momentum · 0 + (1 − momentum) ·
    batch statistic`` reveals the batch's mean and (biased) variance of every
    BatchNorm input; the result is the mean of these over the batches.

    Args:
      model: a flax module with BatchNorm layers in the ``batch_stats``
        collection, called as ``model.apply(..., train=True, mutable=...)``.
      variables: ``params`` to estimate statistics for; ``batch_stats`` gives
        only the structure (its values are ignored).
      images: f32[N, H, W, C] training images (normalized), N ≥ batch_size.
      batch_size: examples per batch.
      momentum: the BatchNorm momentum of ``model`` (flax convention: the
        weight of the old running value).

    Returns:
      The recomputed ``batch_stats`` pytree.

    Raises:
      ValueError: if there is no full batch or ``momentum`` is not in [0, 1).
    """
    if batch_size < 1 or images.shape[0] < batch_size:
        raise ValueError(
            f'batch_size must be in [1, {images.shape[0]}] (the number of '
            f'training images), got {batch_size}.'
        )
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f'momentum must be in [0, 1), got {momentum}.')
    return _recompute_batch_stats(
        model, variables, jnp.asarray(images), batch_size, float(momentum)
    )


def linear_path(
    model: nn.Module,
    variables_a: PyTree,
    variables_b: PyTree,
    alphas: Sequence[float] | np.ndarray,
    eval_data: Examples,
    train_data: Examples,
    *,
    batch_size: int = 1000,
    bn_batch_size: int = 128,
    endpoint_stats: bool = True,
    momentum: float = models.BATCH_NORM_MOMENTUM,
) -> dict[str, Any]:
    """Loss and accuracy along the straight line between two snapshots.

    At each α the parameters are ``interpolate(params_a, params_b, α)`` and the
    batch statistics are recomputed on ``train_data`` (see
    `recompute_batch_stats`); with ``endpoint_stats`` the points α = 0 and α = 1
    use the snapshots' own variables instead, so they reproduce exactly the
    snapshots' loss. The barrier is ``max_α [L(α) − ((1 − α) L(0) + α L(1))]``
    over the alphas in [0, 1]: how far the loss rises above the chord between
    the endpoints (0 when it never does, as in a convex basin).

    Args:
      model: the snapshots' flax module.
      variables_a: ``{'params', 'batch_stats'}`` at α = 0.
      variables_b: ``{'params', 'batch_stats'}`` at α = 1.
      alphas: positions on the line; must include 0 and 1, may extend beyond.
      eval_data: ``{'image', 'label'}`` on which loss and accuracy are measured.
      train_data: ``{'image': ...}`` training images for batch statistics.
      batch_size: examples per forward pass during evaluation.
      bn_batch_size: examples per batch when recomputing batch statistics.
      endpoint_stats: use the stored statistics at α = 0 and α = 1.
      momentum: the BatchNorm momentum of ``model``.

    Returns:
      ``alpha``, ``loss`` and ``accuracy`` (f32 NumPy arrays, one entry per
      alpha), ``barrier`` and ``barrier_alpha`` (where it is reached), floats.

    Raises:
      ValueError: if ``alphas`` lacks 0 or 1.
    """
    alphas = np.asarray(alphas, dtype=np.float32).reshape(-1)
    if not (np.any(alphas == 0.0) and np.any(alphas == 1.0)):
        raise ValueError(f'alphas must include 0 and 1, got {alphas.tolist()}.')

    metrics = []
    for alpha in alphas:
        if endpoint_stats and alpha in (0.0, 1.0):
            variables = variables_a if alpha == 0.0 else variables_b
        else:
            params = interpolate(
                variables_a['params'], variables_b['params'], jnp.float32(alpha)
            )
            variables = {'params': params, 'batch_stats': variables_a['batch_stats']}
            variables['batch_stats'] = recompute_batch_stats(
                model, variables, train_data['image'], bn_batch_size, momentum
            )
        metrics.append(evaluate(model, variables, eval_data, batch_size))
    metrics = jax.device_get(metrics)

    loss = np.array([m['loss'] for m in metrics], np.float32)
    accuracy = np.array([m['accuracy'] for m in metrics], np.float32)
    start, end = loss[alphas == 0.0][0], loss[alphas == 1.0][0]
    inside = (alphas >= 0.0) & (alphas <= 1.0)
    excess = loss[inside] - ((1 - alphas[inside]) * start + alphas[inside] * end)
    peak = int(np.argmax(excess))
    return {
        'alpha': alphas,
        'loss': loss,
        'accuracy': accuracy,
        'barrier': float(excess[peak]),
        'barrier_alpha': float(alphas[inside][peak]),
    }


def filter_normalize(direction: PyTree, weights: PyTree) -> PyTree:
    """Rescales each filter of a direction to the norm of the same filter of weights.

    Filter normalization (Li et al. 2018, *Visualizing the loss landscape of
    neural nets*) makes directions comparable across layers and networks whose
    weights differ in scale. A filter is a slice along the last axis (an output
    channel of a flax conv kernel ``[H, W, in, out]``, an output unit of a dense
    kernel ``[in, out]``); one-dimensional leaves (biases, BatchNorm scales and
    offsets) and scalars count as one filter each. Filters of zero norm in the
    direction stay zero.

    Args:
      direction: a pytree shaped like ``weights``.
      weights: the parameters the direction starts from.

    Returns:
      The normalized direction, same structure.
    """

    def normalize(d: jax.Array, w: jax.Array) -> jax.Array:
        axes = tuple(range(d.ndim - 1)) if d.ndim >= 2 else None
        d_norm = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
        w_norm = jnp.sqrt(jnp.sum(w**2, axis=axes, keepdims=True))
        safe = jnp.where(d_norm > 0, d_norm, 1.0)
        return jnp.where(d_norm > 0, d * (w_norm / safe), 0.0)

    return jax.tree.map(normalize, direction, weights)


def plane_directions(
    params_list: Sequence[PyTree], filter_normalized: bool = True
) -> tuple[PyTree, PyTree]:
    """The two directions from the first of three snapshots to the others.

    Args:
      params_list: three parameter pytrees θ_0, θ_1, θ_2; θ_0 is the origin.
      filter_normalized: rescale each direction with `filter_normalize` against
        θ_0. The plane then no longer passes exactly through θ_1 and θ_2 (see
        ``snapshot_coordinates`` of `plane`); without it, θ_1 and θ_2 lie at
        (1, 0) and (0, 1).

    Returns:
      ``(θ_1 − θ_0, θ_2 − θ_0)``, filter-normalized if asked.
    """
    if len(params_list) != 3:
        raise ValueError(
            f'params_list must hold three snapshots, got {len(params_list)}.'
        )
    origin, first, second = params_list
    directions = tuple(
        jax.tree.map(jnp.subtract, params, origin) for params in (first, second)
    )
    if filter_normalized:
        directions = tuple(filter_normalize(d, origin) for d in directions)
    return directions


def plane(
    model: nn.Module,
    variables_list: Sequence[PyTree],
    xs: Sequence[float] | np.ndarray,
    ys: Sequence[float] | np.ndarray,
    eval_data: Examples,
    train_data: Examples,
    *,
    filter_normalized: bool = True,
    batch_size: int = 1000,
    bn_batch_size: int = 128,
    momentum: float = models.BATCH_NORM_MOMENTUM,
) -> dict[str, Any]:
    """Loss and accuracy on a grid in the plane through three snapshots.

    The point at coordinates (x, y) has parameters ``θ_0 + x d_1 + y d_2`` with
    ``d_1, d_2`` from `plane_directions`; its batch statistics are recomputed on
    ``train_data`` (see `recompute_batch_stats`), also at the origin, so that
    every grid point is treated alike.

    Args:
      model: the snapshots' flax module.
      variables_list: three ``{'params', 'batch_stats'}``; the first is the
        origin.
      xs: coordinates along d_1.
      ys: coordinates along d_2.
      eval_data: ``{'image', 'label'}`` on which loss and accuracy are measured.
      train_data: ``{'image': ...}`` training images for batch statistics.
      filter_normalized: filter-normalize the directions (Li et al. 2018).
      batch_size: examples per forward pass during evaluation.
      bn_batch_size: examples per batch when recomputing batch statistics.
      momentum: the BatchNorm momentum of ``model``.

    Returns:
      ``x`` f32[X], ``y`` f32[Y], ``loss`` and ``accuracy`` f32[Y, X] (row y,
      column x, as for ``matplotlib.pyplot.contour(x, y, loss)``), and
      ``snapshot_coordinates`` f32[3, 2] and ``snapshot_residuals`` f32[3]: the
      least-squares coordinates of the three snapshots in the plane and their
      distance from it (zero without filter normalization).
    """
    params_list = [variables['params'] for variables in variables_list]
    directions = plane_directions(params_list, filter_normalized)
    origin = params_list[0]
    template = variables_list[0]['batch_stats']
    xs = np.asarray(xs, np.float32).reshape(-1)
    ys = np.asarray(ys, np.float32).reshape(-1)

    metrics = []
    for y in ys:
        for x in xs:
            params = _plane_point(origin, *directions, jnp.float32(x), jnp.float32(y))
            variables = {'params': params, 'batch_stats': template}
            variables['batch_stats'] = recompute_batch_stats(
                model, variables, train_data['image'], bn_batch_size, momentum
            )
            metrics.append(evaluate(model, variables, eval_data, batch_size))
    metrics = jax.device_get(metrics)
    shape = (len(ys), len(xs))

    coordinates, residuals = _plane_coordinates(params_list, directions)
    return {
        'x': xs,
        'y': ys,
        'loss': np.array([m['loss'] for m in metrics], np.float32).reshape(shape),
        'accuracy': np.array([m['accuracy'] for m in metrics], np.float32).reshape(
            shape
        ),
        'snapshot_coordinates': coordinates,
        'snapshot_residuals': residuals,
    }


@functools.partial(jax.jit, static_argnames=('model', 'batch_size', 'momentum'))
def _recompute_batch_stats(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    batch_size: int,
    momentum: float,
) -> PyTree:
    """The mean over full batches of each BatchNorm layer's batch statistics."""
    num_batches = images.shape[0] // batch_size
    batches = images[: num_batches * batch_size].reshape(
        num_batches, batch_size, *images.shape[1:]
    )
    zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])

    def batch_statistics(batch: jax.Array) -> PyTree:
        _, updates = model.apply(
            {'params': variables['params'], 'batch_stats': zeros},
            batch,
            train=True,
            mutable=['batch_stats'],
        )
        return jax.tree.map(lambda s: s / (1 - momentum), updates['batch_stats'])

    per_batch = jax.lax.map(batch_statistics, batches)
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), per_batch)


@jax.jit
def _plane_point(
    origin: PyTree, first: PyTree, second: PyTree, x: jax.Array, y: jax.Array
) -> PyTree:
    """θ_0 + x d_1 + y d_2."""
    return jax.tree.map(lambda o, a, b: o + x * a + y * b, origin, first, second)


def _plane_coordinates(
    params_list: Sequence[PyTree], directions: tuple[PyTree, PyTree]
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coordinates of each snapshot in the plane, and its residual."""
    basis = np.stack(
        [np.asarray(flatten_util.ravel_pytree(d)[0], np.float64) for d in directions],
        axis=1,
    )
    origin = np.asarray(flatten_util.ravel_pytree(params_list[0])[0], np.float64)
    coordinates, residuals = [], []
    for params in params_list:
        offset = np.asarray(flatten_util.ravel_pytree(params)[0], np.float64) - origin
        solution = np.linalg.lstsq(basis, offset, rcond=None)[0]
        coordinates.append(solution)
        residuals.append(np.linalg.norm(offset - basis @ solution))
    return np.asarray(coordinates, np.float32), np.asarray(residuals, np.float32)
