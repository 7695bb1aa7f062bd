"""Snapshot ensembles of a run: restore the members, average them, measure diversity.

    python -m landscape_jax.ensemble --workdir=DIR [--split=test] [--batch_size=1000]

prints one JSON object with the accuracy of every member and of the ensemble, the
ensemble's NLL and calibration error, and how much the members agree.

The study's ensemble averages the softmax outputs of all snapshots of a run and of
its final model. The members of a run directory are, oldest first, its snapshots
(labelled by epoch) and the latest training state in ``WORKDIR/checkpoints``
(labelled ``'final'``). When the final state ends the same epoch as a snapshot (a
run whose last epoch stores an anchor or ends a cosine cycle), that snapshot *is*
the final model: it is counted once, under its epoch, and ``final_epoch`` says
which member is the final model.

The functions on predictions are pure ``jax.numpy``, so they can be called inside
jitted code as well as on NumPy arrays:

    probs = member_probabilities(model, [s.variables for s in snapshots], images)
    averaged = ensemble_probabilities(probs)  # f32[N, C]
    accuracy(averaged, labels), agreement(jnp.argmax(probs, -1))

Flags (for the command):
  --workdir: the run directory (required).
  --split: tfds split to evaluate on; default: the run's ``data.eval_split``.
  --batch_size: examples per forward pass (default 1000).
"""

import functools
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from flax import linen as nn

from landscape_jax import checkpoints, cli, data, models

PyTree = Any

# Label of the final model among the members of a run.
FINAL = 'final'

# What `evaluate_run` reports beyond the members, in this order.
_FIGURES = (
    'member_accuracy',
    'member_nll',
    'ensemble_accuracy',
    'nll',
    'ece',
    'agreement',
    'agreement_fraction',
    'disagreement',
    'normalized_disagreement',
    'pairwise_kl',
)

# This command's flags live in their own registry: `landscape_jax.main` defines a
# global --workdir too, and both modules must be importable in one process.
_FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'Run directory to evaluate.', flag_values=_FLAGS)
flags.DEFINE_string(
    'split', None, "tfds split; default: the run's data.eval_split.", flag_values=_FLAGS
)
flags.DEFINE_integer(
    'batch_size', 1000, 'Examples per forward pass.', lower_bound=1, flag_values=_FLAGS
)
flags.mark_flag_as_required('workdir', flag_values=_FLAGS)


class RunInputError(ValueError):
    """A run directory or split cannot be evaluated: bad input, not a bug.

    For example a directory without snapshots, an unknown split, or a data set
    that is not available here.
    """


# Restoring the members of a run.


def load_snapshots(workdir: str) -> list[checkpoints.Snapshot]:
    """Restores every snapshot of a run directory with orbax, oldest first.

    Args:
      workdir: the run directory.

    Returns:
      The snapshots in ``workdir/snapshots``, sorted by epoch; empty if none.
    """
    return [
        checkpoints.load_snapshot(workdir, epoch)
        for epoch in checkpoints.snapshot_epochs(workdir)
    ]


def load_final(workdir: str) -> checkpoints.Snapshot:
    """Restores the model of the latest training state of a run directory.

    Only ``params`` and ``batch_stats`` are read from ``workdir/checkpoints`` (an
    orbax partial restore); the optimizer state and the anchors stay on disk.

    Args:
      workdir: the run directory, as written by `train.train_and_evaluate`.

    Returns:
      A `checkpoints.Snapshot` whose ``epoch`` is the last epoch trained and whose
      ``meta`` holds ``model``, ``dtype`` (from ``config.json``), ``num_classes``
      (from the classifier), ``image_shape`` (from the newest snapshot; None when
      the run has none) and ``epoch``.

    Raises:
      FileNotFoundError: if ``workdir`` holds no training state or config.
    """
    directory = checkpoints.run_path(workdir) / checkpoints.CHECKPOINTS_DIR
    config = checkpoints.read_config(workdir)
    if config is None or not directory.exists():
        raise FileNotFoundError(
            f'workdir={workdir} holds no training state ({checkpoints.CONFIG_FILE} '
            f'and {checkpoints.CHECKPOINTS_DIR}/ are written by training).'
        )

    with ocp.CheckpointManager(
        directory,
        options=checkpoints.READ_ONLY,
        item_handlers=ocp.PyTreeCheckpointHandler(),
    ) as manager:
        epoch = manager.latest_step()
        if epoch is None:
            raise FileNotFoundError(f'{directory} holds no training state.')
        saved = manager.item_metadata(epoch).tree
        wanted = {name: saved[name] for name in ('params', 'batch_stats')}
        variables = manager.restore(
            epoch, args=checkpoints.local_restore_args(wanted, partial_restore=True)
        )

    epochs = checkpoints.snapshot_epochs(workdir)
    image_shape = _snapshot_meta(workdir, epochs[-1])['image_shape'] if epochs else None
    meta = {
        'model': config['model']['name'],
        'dtype': config['model']['dtype'],
        'num_classes': int(variables['params']['classifier']['bias'].shape[-1]),
        'image_shape': image_shape,
        'epoch': int(epoch),
    }
    return checkpoints.Snapshot(epoch=int(epoch), variables=variables, meta=meta)


def load_members(workdir: str) -> dict[int | str, checkpoints.Snapshot]:
    """The members of a run's snapshot ensemble: its snapshots and final model.

    The final model is added under `FINAL` unless a snapshot of the same epoch
    exists: then that snapshot holds the same variables (it is saved from the same
    state) and stands for the final model, so that no model is counted twice. If
    the variables differ after all, both are kept and a warning is logged.

    Args:
      workdir: the run directory.

    Returns:
      Members by label (epoch, or `FINAL`), in order: snapshots oldest first, then
      the final model. Without a training state, only the snapshots.
    """
    members: dict[int | str, checkpoints.Snapshot] = {
        snapshot.epoch: snapshot for snapshot in load_snapshots(workdir)
    }
    try:
        final = load_final(workdir)
    except FileNotFoundError as err:
        logging.warning('No final model: %s', err)
        return members

    twin = members.get(final.epoch)
    if twin is not None and _same_variables(twin.variables, final.variables):
        return members
    if twin is not None:
        logging.warning(
            'The snapshot and training state of epoch %d differ; keeping both.',
            final.epoch,
        )
    members[FINAL] = final
    return members


# Predictions of the members.


def predict_logits(
    model: nn.Module, variables: PyTree, images: jax.Array, batch_size: int = 1000
) -> jax.Array:
    """The logits of a model on many images, in fixed-size batches.

    Args:
      model: a flax module called as ``model.apply(variables, x, train=False)``.
      variables: ``{'params': ..., 'batch_stats': ...}``.
      images: f32[N, H, W, C] model inputs (normalized images).
      batch_size: examples per forward pass; the last batch is padded.

    Returns:
      f32[N, C] logits.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}.')
    num_examples = images.shape[0]
    return _predict_logits(
        model, variables, jnp.asarray(images), min(batch_size, num_examples)
    )


def member_probabilities(
    model: nn.Module,
    variables_list: list[PyTree],
    images: jax.Array,
    batch_size: int = 1000,
) -> jax.Array:
    """The softmax outputs of each member on the same images.

    Args:
      model: the members' common flax module.
      variables_list: M variable dicts (``params`` and ``batch_stats``).
      images: f32[N, H, W, C] model inputs (normalized images).
      batch_size: examples per forward pass.

    Returns:
      f32[M, N, C] class probabilities.
    """
    return jnp.stack(
        [
            jax.nn.softmax(predict_logits(model, variables, images, batch_size))
            for variables in variables_list
        ]
    )


# Pure figures of an ensemble, jittable.


def ensemble_probabilities(
    probs: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Model averaging: the (weighted) mean of the members' softmax outputs.

    Args:
      probs: f32[M, N, C] probabilities of M members.
      weights: optional f[M] non-negative member weights, normalized here to sum
        to 1; None weighs members equally. Values are checked unless traced.

    Returns:
      f32[N, C] ensemble probabilities.

    Raises:
      ValueError: if ``weights`` has the wrong shape, a negative or non-finite
        entry, or sums to zero.
    """
    probs = jnp.asarray(probs)
    if weights is None:
        return jnp.mean(probs, axis=0)

    weights = jnp.asarray(weights)
    if weights.shape != probs.shape[:1]:
        raise ValueError(
            f'weights must have shape {probs.shape[:1]} (one per member), got '
            f'{weights.shape}.'
        )
    concrete = _concrete(weights)
    if concrete is not None and not (
        np.all(np.isfinite(concrete)) and np.all(concrete >= 0) and concrete.sum() > 0
    ):
        raise ValueError(
            'weights must be finite, non-negative and not all zero, got '
            f'{concrete.tolist()}.'
        )
    weights = weights.astype(probs.dtype) / jnp.sum(weights)
    return jnp.sum(weights[:, None, None] * probs, axis=0)


@jax.jit
def accuracy(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of examples whose highest-scoring class is the label.

    Args:
      scores: f32[..., N, C] probabilities or logits, e.g. of M members at once.
      labels: int[N] class indices.

    Returns:
      f32[...] accuracies (a scalar for f32[N, C] scores).
    """
    correct = jnp.argmax(scores, axis=-1) == jnp.asarray(labels)
    return jnp.mean(correct, axis=-1, dtype=jnp.float32)


@jax.jit
def agreement(predictions: jax.Array) -> jax.Array:
    """The number of examples on which all members predict the same class.

    This is the count of the study's Table 4.1.

    Args:
      predictions: int[M, N] predicted classes of M members.

    Returns:
      int32 scalar in [0, N].
    """
    predictions = jnp.asarray(predictions)
    unanimous = jnp.all(predictions == predictions[:1], axis=0)
    return jnp.sum(unanimous, dtype=jnp.int32)


@jax.jit
def disagreement(predictions: jax.Array) -> jax.Array:
    """Mean pairwise disagreement: how often two different members differ.

    ``(1 / (M (M - 1))) Σ_{i ≠ j} (1/N) Σ_n [pred_i(n) ≠ pred_j(n)]``.

    Args:
      predictions: int[M, N] predicted classes of M ≥ 2 members.

    Returns:
      f32 scalar in [0, 1].

    Raises:
      ValueError: if there are fewer than two members.
    """
    predictions = jnp.asarray(predictions)
    num_members = predictions.shape[0]
    if predictions.ndim != 2 or num_members < 2:
        raise ValueError(
            'predictions must be int[M, N] with M >= 2 members, got shape '
            f'{predictions.shape}.'
        )
    differ = predictions[:, None, :] != predictions[None, :, :]
    pairwise = jnp.mean(differ, axis=-1, dtype=jnp.float32)  # Zero diagonal.
    return jnp.sum(pairwise) / (num_members * (num_members - 1))


@jax.jit
def normalized_disagreement(predictions: jax.Array, labels: jax.Array) -> jax.Array:
    """Pairwise disagreement relative to the members' error rate.

    ``disagreement(predictions) / ē`` with ``ē = (1/M) Σ_i (1/N) Σ_n [pred_i(n) ≠
    label(n)]`` the mean error rate of the members (Fort et al. 2019, *Deep
    ensembles: a loss landscape perspective*, normalize the fraction of differing
    predictions by the error rate in the same way). Two members can differ only
    where at least one errs, so the value lies in [0, 2]: 0 for identical
    predictions, 2 when their errors never coincide and never overlap with a
    correct prediction of the other. Defined as 0 when no member errs.

    Args:
      predictions: int[M, N] predicted classes of M ≥ 2 members.
      labels: int[N] true classes.

    Returns:
      f32 scalar.
    """
    error = 1.0 - jnp.mean(_prediction_accuracy(predictions, labels))
    pairwise = disagreement(predictions)
    return jnp.where(error > 0, pairwise / jnp.where(error > 0, error, 1.0), 0.0)


@jax.jit
def pairwise_kl(probs: jax.Array) -> jax.Array:
    """Mean KL divergence between the predictive distributions of member pairs.

    ``KL[i, j] = (1/N) Σ_n Σ_c p_i(c|n) (log p_i(c|n) − log p_j(c|n))``, with
    probabilities clipped below at the smallest normal float before the log.

    Args:
      probs: f32[M, N, C] probabilities of M members.

    Returns:
      f32[M, M], zero on the diagonal and for identical members; not symmetric.
    """
    probs = jnp.asarray(probs)
    log_probs = jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))

    # One row at a time: f32[M, N, C] of memory rather than f32[M, M, N, C]. The
    # log-ratio is zero wherever two members agree, so identical members (and
    # the diagonal) give exactly zero.
    def row(member: tuple[jax.Array, jax.Array]) -> jax.Array:
        member_probs, member_log_probs = member
        log_ratio = member_log_probs[None] - log_probs
        return jnp.mean(jnp.sum(member_probs[None] * log_ratio, axis=-1), axis=-1)

    return jax.lax.map(row, (probs, log_probs))


@jax.jit
def nll(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of the labels.

    Args:
      probs: f32[..., N, C] probabilities (clipped below at the smallest normal
        float, so a zero probability costs about 87 nats, not infinity).
      labels: int[N] true classes.

    Returns:
      f32[...] mean NLL in nats.
    """
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels)
    label_probs = jnp.take_along_axis(
        probs, jnp.broadcast_to(labels[:, None], (*probs.shape[:-1], 1)), axis=-1
    )[..., 0]
    tiny = jnp.finfo(probs.dtype).tiny
    return -jnp.mean(jnp.log(jnp.maximum(label_probs, tiny)), axis=-1)


@functools.partial(jax.jit, static_argnames='num_bins')
def ece(probs: jax.Array, labels: jax.Array, num_bins: int = 15) -> jax.Array:
    """Expected calibration error over equal-width confidence bins.

    The confidence of an example is its highest probability; bin ``b`` (of
    ``num_bins``) holds the examples with confidence in ``(b/B, (b+1)/B]``. Then
    ``ECE = Σ_b (n_b / N) |accuracy_b − mean confidence_b|`` (Guo et al. 2017).

    Args:
      probs: f32[N, C] probabilities.
      labels: int[N] true classes.
      num_bins: number of bins B (static under jit).

    Returns:
      f32 scalar in [0, 1].
    """
    probs = jnp.asarray(probs)
    confidence = jnp.max(probs, axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == jnp.asarray(labels)).astype(probs.dtype)
    bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, None)
    bins = jnp.minimum(bins, num_bins - 1)
    gaps = jax.ops.segment_sum(correct - confidence, bins, num_segments=num_bins)
    return jnp.sum(jnp.abs(gaps)) / probs.shape[0]


# A whole run.


def evaluate_run(
    workdir: str, split: str | None = None, batch_size: int = 1000
) -> dict[str, Any]:
    """Evaluates the snapshot ensemble of a run directory on its evaluation split.

    The data set and split come from the run's ``config.json``; images are
    normalized with the statistics of its training split, as in training.

    Args:
      workdir: the run directory.
      split: tfds split to evaluate on; None for the run's ``data.eval_split``.
      batch_size: examples per forward pass.

    Returns:
      A JSON-serializable dict: ``workdir``, ``split``, ``num_examples``,
      ``members`` (epochs, and `FINAL` for the final model when it is not also a
      snapshot), ``final_epoch`` (None without a training state),
      ``member_accuracy``, ``member_nll`` (per member), ``ensemble_accuracy``,
      ``nll`` and ``ece`` (of the ensemble's averaged softmax), ``agreement``
      (examples on which all members predict the same class),
      ``agreement_fraction``, ``disagreement`` and ``normalized_disagreement``
      (None for a single member) and ``pairwise_kl`` (M x M nested lists).

    Raises:
      RunInputError: if ``workdir`` holds no snapshots, or its data set or
        ``split`` cannot be loaded.
    """
    if not epath.Path(workdir).is_dir():
        raise RunInputError(f'workdir={workdir} is not a directory.')
    if not checkpoints.snapshot_epochs(workdir):
        raise RunInputError(
            f'workdir={workdir} holds no ensemble snapshots (no '
            f'{checkpoints.SNAPSHOTS_DIR}/ checkpoints); train with '
            'config.distance.anchor_epochs or a cosine schedule to save some.'
        )
    members = load_members(workdir)
    config = ml_collections.ConfigDict(checkpoints.read_config(workdir))
    data_config = config.data
    if split is not None:
        data_config.eval_split = split
    try:
        datasets = data.load_datasets(data_config)
    except (ValueError, data.DatasetUnavailableError) as err:
        raise RunInputError(str(err)) from err
    images = data.normalize(datasets.eval.images, datasets.mean, datasets.std)
    labels = datasets.eval.labels

    meta = next(iter(members.values())).meta
    model = models.create_model(
        meta['model'], meta['num_classes'], dtype=jnp.dtype(meta['dtype'])
    )
    variables_list = [member.variables for member in members.values()]
    probs = member_probabilities(model, variables_list, images, batch_size)
    figures = _figures(probs, labels)

    return {
        'workdir': str(workdir),
        'split': data_config.eval_split,
        'num_examples': int(labels.shape[0]),
        'members': list(members),
        'final_epoch': checkpoints.latest_state_epoch(workdir),
        **figures,
    }


def main(argv: list[str]) -> None:
    """Prints `evaluate_run` of ``--workdir`` as one JSON object on stdout.

    Bad input (a flag that does not parse, a run without snapshots, an unknown
    split) ends the command with exit status 2 and ``error: <problem>`` lines on
    stderr, like ``landscape_jax.main``.

    Args:
      argv: the command line, program name first (this command's flags are
        parsed here; see the module docstring).
    """
    if _FLAGS.is_parsed():  # Called again in the same process, as in tests.
        _FLAGS.unparse_flags()
    try:
        extra = _FLAGS(argv)[1:]
    except flags.Error as err:
        cli.exit_with_error(str(err))
    if extra:
        cli.exit_with_error(f'unexpected arguments: {" ".join(extra)}')
    try:
        results = evaluate_run(
            _FLAGS.workdir, split=_FLAGS.split, batch_size=_FLAGS.batch_size
        )
    except RunInputError as err:
        cli.exit_with_error(str(err))
    json.dump(results, sys.stdout)
    sys.stdout.write('\n')


def _figures(probs: jax.Array, labels: jax.Array) -> dict[str, Any]:
    """Every ensemble figure of f32[M, N, C] member probabilities, as Python."""
    values = jax.device_get(_figure_arrays(probs, labels))
    return {
        name: None if values[name] is None else _to_python(values[name])
        for name in _FIGURES
    }


def _to_python(value: Any) -> Any:
    """An array as Python numbers (nested lists); float32 as its shortest decimal.

    A float32 such as 0.502 becomes the float 0.502 rather than the double it
    converts to exactly (0.5020000338554382), which is what JSON would show.
    """
    array = np.asarray(value)
    if array.dtype != np.float32:
        return array.tolist()
    shortest = [float(str(element)) for element in array.flat]
    return np.array(shortest, dtype=object).reshape(array.shape).tolist()


@jax.jit
def _figure_arrays(probs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """The figures of `evaluate_run` in one compiled call (keys as `_FIGURES`)."""
    predictions = jnp.argmax(probs, axis=-1)
    averaged = ensemble_probabilities(probs)
    several = probs.shape[0] >= 2
    return {
        'member_accuracy': accuracy(probs, labels),
        'member_nll': nll(probs, labels),
        'ensemble_accuracy': accuracy(averaged, labels),
        'nll': nll(averaged, labels),
        'ece': ece(averaged, labels),
        'agreement': agreement(predictions),
        'agreement_fraction': jnp.mean(
            jnp.all(predictions == predictions[:1], axis=0), dtype=jnp.float32
        ),
        'disagreement': disagreement(predictions) if several else None,
        'normalized_disagreement': (
            normalized_disagreement(predictions, labels) if several else None
        ),
        'pairwise_kl': pairwise_kl(probs),
    }


def _prediction_accuracy(predictions: jax.Array, labels: jax.Array) -> jax.Array:
    """f32[...]: the fraction of int[..., N] predicted classes equal to the labels."""
    return jnp.mean(
        jnp.asarray(predictions) == jnp.asarray(labels), axis=-1, dtype=jnp.float32
    )


@functools.partial(jax.jit, static_argnames=('model', 'batch_size'))
def _predict_logits(
    model: nn.Module, variables: PyTree, images: jax.Array, batch_size: int
) -> jax.Array:
    """Logits in batches of ``batch_size``: one compiled loop over padded batches."""
    num_examples = images.shape[0]
    num_batches = -(-num_examples // batch_size)
    padding = num_batches * batch_size - num_examples
    padded = jnp.pad(images, ((0, padding),) + ((0, 0),) * (images.ndim - 1))
    batches = padded.reshape(num_batches, batch_size, *images.shape[1:])
    logits = jax.lax.map(
        lambda batch: model.apply(variables, batch, train=False), batches
    )
    return logits.reshape(num_batches * batch_size, -1)[:num_examples]


def _snapshot_meta(workdir: str, epoch: int) -> dict[str, Any]:
    """Only the ``meta`` item of a snapshot."""
    directory = checkpoints.run_path(workdir) / checkpoints.SNAPSHOTS_DIR
    with ocp.CheckpointManager(
        directory,
        options=checkpoints.READ_ONLY,
        item_handlers={'meta': ocp.JsonCheckpointHandler()},
    ) as manager:
        restored = manager.restore(
            epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
    return restored.meta


def _same_variables(first: PyTree, second: PyTree) -> bool:
    """Whether two variable trees have the same structure and equal arrays."""
    if jax.tree.structure(first) != jax.tree.structure(second):
        return False
    leaves = zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)


def _concrete(array: jax.Array) -> np.ndarray | None:
    """The value of ``array`` on the host, or None while it is traced."""
    try:
        return np.asarray(array)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _parse_absl_flags(argv: list[str]) -> list[str]:
    """Parses absl's own flags (logging); leaves this command's to `main`."""
    try:
        return flags.FLAGS(argv, known_only=True)
    except flags.Error as err:
        cli.exit_with_error(str(err))


if __name__ == '__main__':
    app.run(main, flags_parser=_parse_absl_flags)
