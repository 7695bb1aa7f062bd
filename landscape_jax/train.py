"""Training with anchor-distance penalties: the pure step functions and the loop.

The pure functions (`create_train_state`, `train_step`, `eval_step`) are what a
notebook composes; `train_and_evaluate` is the whole run behind the main command.
The run keeps both data splits on the device, runs each step as one compiled call
that gathers, augments and normalizes its batch, and accumulates the step metrics on
the device, so that the host waits for the device once per epoch. The pieces of its
loop that do not depend on how many runs train at once (`load_data`, `build_model`,
`planned_snapshot_epochs`, `run_train_steps`, `evaluate_split`, `SnapshotEnsemble`,
`anchor_metrics`) are shared with the vectorized sweep of `landscape_jax.sweep`.
"""

import collections
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh
from tqdm import auto as tqdm

from landscape_jax import (
    checkpoints,
    config_validation,
    conv,
    data,
    distance,
    ensemble,
    metric_writers,
    models,
    optim,
    parallel,
    schedules,
)

PyTree = Any
Metrics = dict[str, jax.Array]

# The metrics of `train_step`, summed over the steps of an epoch by the loop.
TRAIN_METRICS = (
    'train_loss',
    'penalty',
    'l2',
    'objective',
    'train_accuracy',
    'grad_norm',
)

# How many steps the host may dispatch ahead of the device. Enough to keep the
# device busy; few enough that the progress bar shows finished steps.
_STEPS_AHEAD = 4


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, batch statistics and the anchor buffer.

    Attributes:
      batch_stats: BatchNorm running statistics (not trainable, not penalized).
      anchors: stored anchors, leaves shaped like ``params`` with a leading slot
        axis K (see `landscape_jax.distance`).
      anchor_mask: bool[K], the slots that hold an anchor.
      rng: the run's PRNG key; each step folds in its step number.
    """

    batch_stats: PyTree
    anchors: PyTree
    anchor_mask: jax.Array
    rng: jax.Array


@struct.dataclass
class PenaltyConfig:
    """The coefficients of the objective beyond cross-entropy.

    A pytree of scalars: passed to a jitted step they are traced, so one
    compilation serves every value (and a sweep can vmap over them).

    Attributes:
      strength: s, the height of each anchor's Gaussian bump.
      width: σ², its squared width.
      weight_decay: the coupled L2 coefficient the optimizer applies; the step
        only reports the matching loss term ``weight_decay / 2 · ‖θ‖²``.
    """

    strength: float
    width: float
    weight_decay: float


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    image_shape: tuple[int, int, int],
    optimizer: optax.GradientTransformation,
    num_anchor_slots: int,
) -> TrainState:
    """Initializes a model, its optimizer state and an empty anchor buffer.

    Args:
      rng: PRNG key; split into initialization and training keys.
      model: a flax module called as ``model.apply(variables, x, train=...)``.
      image_shape: (H, W, C) of one input image.
      optimizer: the optax transformation to train with.
      num_anchor_slots: how many anchors the run may store.

    Returns:
      The initial `TrainState` at step 0.
    """
    init_rng, train_rng = jax.random.split(rng)
    # Jitted: unjitted, every small initializer op would compile on its own.
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(init_rng, jnp.zeros((1, *image_shape)))
    params = variables['params']
    anchors, anchor_mask = distance.empty_anchors(params, num_anchor_slots)
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optimizer,
        batch_stats=variables.get('batch_stats', {}),
        anchors=anchors,
        anchor_mask=anchor_mask,
        rng=train_rng,
    )
    # An array from the start (not the Python int 0), so that the first step
    # and every later one share one compilation.
    return state.replace(step=jnp.zeros((), jnp.int32))


def train_step(
    state: TrainState, batch: dict[str, jax.Array], penalty_config: PenaltyConfig
) -> tuple[TrainState, Metrics]:
    """One SGD step on cross-entropy plus the anchor penalty.

    Args:
      state: the current training state.
      batch: ``image`` f32[B, H, W, C] (augmented and normalized) and ``label``
        int32[B].
      penalty_config: strength, width and weight decay of the run.

    Returns:
      The new state and this step's metrics: ``train_loss`` (cross-entropy),
      ``penalty``, ``l2``, ``objective`` (their sum), ``train_accuracy`` and
      ``grad_norm``.
    """

    def loss_fn(params):
        variables = {'params': params, 'batch_stats': state.batch_stats}
        logits, updates = state.apply_fn(
            variables, batch['image'], train=True, mutable=['batch_stats']
        )
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
            logits, batch['label']
        ).mean()
        anchor_penalty = distance.penalty(
            params,
            state.anchors,
            strength=penalty_config.strength,
            width=penalty_config.width,
            mask=state.anchor_mask,
        )
        return cross_entropy + anchor_penalty, (
            cross_entropy,
            anchor_penalty,
            logits,
            updates['batch_stats'],
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (cross_entropy, anchor_penalty, logits, batch_stats)), grads = grad_fn(
        state.params
    )
    l2 = 0.5 * penalty_config.weight_decay * optax.tree.norm(state.params, squared=True)
    metrics = {
        'train_loss': cross_entropy,
        'penalty': anchor_penalty,
        'l2': l2,
        'objective': cross_entropy + anchor_penalty + l2,
        'train_accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
        'grad_norm': optax.tree.norm(grads),
    }
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> Metrics:
    """Sums of loss and correct predictions over the real examples of a batch.

    Args:
      state: the training state to evaluate.
      batch: ``image`` f32[B, H, W, C] (normalized), ``label`` int32[B] and
        ``mask`` bool[B], False on padding.

    Returns:
      ``loss_sum``, ``correct`` and ``count`` over the examples where mask holds,
      and ``probabilities`` f32[B, num_classes], the softmax outputs.
    """
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    logits = state.apply_fn(variables, batch['image'], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    correct = jnp.argmax(logits, -1) == batch['label']
    mask = batch['mask']
    return {
        'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0)),
        'correct': jnp.sum(correct & mask),
        'count': jnp.sum(mask),
        'probabilities': jax.nn.softmax(logits),
    }


def store_anchor(state: TrainState) -> TrainState:
    """Stores the current parameters as a new anchor."""
    anchors, anchor_mask = distance.add_anchor(
        state.anchors, state.anchor_mask, state.params
    )
    return state.replace(anchors=anchors, anchor_mask=anchor_mask)


def anchor_distances(state: TrainState) -> jax.Array:
    """f32[K]: the L2 distance ‖θ − θ_k‖ to every anchor slot."""
    return jnp.sqrt(distance.squared_distances(state.params, state.anchors))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
) -> TrainState:
    """Trains and evaluates a model as ``config`` describes, writing to ``workdir``.

    Per epoch, one line is appended to ``workdir/metrics.jsonl`` and the same
    numbers go to TensorBoard events in ``workdir``. At the end of each epoch in
    ``config.distance.anchor_epochs`` a snapshot of the model is saved and then the
    parameters are stored as an anchor; with a cosine schedule a snapshot is also
    saved at the end of each cycle. Snapshots (kept for good) go to
    ``workdir/snapshots/``, the latest training state to ``workdir/checkpoints/``,
    from which a rerun of the same command resumes.

    Args:
      config: the run's configuration (see ``configs/default.py``).
      workdir: the run directory; created if missing.
      allow_config_change: continue a run in ``workdir`` that was made with a
        different configuration (for example to train it for more epochs);
        without it such a workdir is refused with the differing fields.

    Returns:
      The final training state.
    """
    config_validation.validate_config(config)
    run = _setup(config, workdir, allow_config_change)
    state = run.state
    start_epoch = run.start_epoch
    if start_epoch:
        logging.info('Resuming after epoch %d from %s.', start_epoch, workdir)

    for epoch in sorted(e for e in run.snapshot_epochs if e <= start_epoch):
        snapshot = checkpoints.load_snapshot(workdir, epoch)
        snapshot_state = parallel.replicate(
            state.replace(**snapshot.variables), run.mesh
        )
        _, probabilities = _evaluate(run, snapshot_state)
        run.ensemble.add(probabilities)

    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        state, epoch_metrics, probabilities = _run_epoch(run, state, epoch)
        if not metric_writers.is_finite(epoch_metrics):
            run.checkpointer.close()
            raise FloatingPointError(
                f'Training diverged in epoch {epoch}: {epoch_metrics}. The state '
                f'saved after epoch {epoch - 1} and all snapshots are kept in '
                f'{workdir}.'
            )
        is_snapshot = epoch in run.snapshot_epochs
        if is_snapshot:
            run.checkpointer.save_snapshot(epoch, state)
            run.ensemble.add(probabilities)
        ensemble_accuracy = run.ensemble.accuracy(probabilities, is_snapshot)
        if ensemble_accuracy is not None:
            epoch_metrics['ensemble_accuracy'] = float(ensemble_accuracy)
        if epoch in run.anchor_epochs:
            state = run.store_anchor(state)
        distances, active = jax.device_get((anchor_distances(state), state.anchor_mask))
        epoch_metrics.update(anchor_metrics(distances, active))
        run.writer.write(epoch, epoch_metrics)
        run.checkpointer.save_state(epoch, state)

    run.checkpointer.close()
    run.writer.close()
    return state


@dataclasses.dataclass
class _Run:
    """Everything a run sets up once before its first epoch."""

    config: ml_collections.ConfigDict
    datasets: data.Datasets
    state: TrainState
    start_epoch: int
    steps_per_epoch: int
    schedule: optax.Schedule
    anchor_epochs: frozenset[int]
    snapshot_epochs: frozenset[int]
    penalty_config: PenaltyConfig
    mesh: Mesh
    train_step: Any
    eval_batch: Any
    store_anchor: Any
    checkpointer: checkpoints.RunCheckpointer
    writer: metric_writers.MetricWriter
    ensemble: 'SnapshotEnsemble'


def _setup(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> _Run:
    """Loads data, builds the model, optimizer and state, and restores a resume."""
    anchor_epochs = tuple(int(epoch) for epoch in config.distance.anchor_epochs)
    datasets, steps_per_epoch = load_data(config)
    model, model_meta = build_model(config, datasets)
    schedule = schedules.create_schedule(config, steps_per_epoch)
    optimizer = optim.create_optimizer(config, steps_per_epoch)
    state = create_train_state(
        jax.random.PRNGKey(config.seed),
        model,
        tuple(model_meta['image_shape']),
        optimizer,
        num_anchor_slots=len(anchor_epochs),
    )
    checkpointer = checkpoints.RunCheckpointer(
        workdir,
        config,
        model_meta,
        max_to_keep=config.checkpoints_to_keep,
        allow_config_change=allow_config_change,
    )
    state, start_epoch = checkpointer.restore_state(state)
    writer = metric_writers.MetricWriter(workdir, resume_after_epoch=start_epoch)

    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh)
    state = parallel.replicate(state, mesh)
    train_data, eval_data, mean, std = parallel.replicate(
        (datasets.train, datasets.eval, datasets.mean, datasets.std), mesh
    )
    datasets = data.Datasets(train=train_data, eval=eval_data, mean=mean, std=std)

    penalty_config = PenaltyConfig(
        strength=float(config.distance.strength),
        width=float(config.distance.width),
        weight_decay=float(config.optimizer.weight_decay),
    )
    return _Run(
        config=config,
        datasets=datasets,
        state=state,
        start_epoch=start_epoch,
        steps_per_epoch=steps_per_epoch,
        schedule=schedule,
        anchor_epochs=frozenset(anchor_epochs),
        snapshot_epochs=planned_snapshot_epochs(config),
        penalty_config=penalty_config,
        mesh=mesh,
        train_step=compile_train_step(mesh),
        eval_batch=compile_eval_batch(mesh),
        store_anchor=jax.jit(store_anchor, donate_argnums=0),
        checkpointer=checkpointer,
        writer=writer,
        ensemble=SnapshotEnsemble(datasets.eval.labels),
    )


def load_data(config: ml_collections.ConfigDict) -> tuple[data.Datasets, int]:
    """Loads a run's data splits onto the default device.

    Args:
      config: the run's configuration; reads ``config.data`` and
        ``config.batch_size``.

    Returns:
      ``(datasets, steps_per_epoch)``: both splits with the training split's
      channel statistics, and the number of full batches in the training split.

    Raises:
      ValueError: if ``config.batch_size`` exceeds the training examples, or as
        `data.load_datasets` raises.
    """
    datasets = data.load_datasets(config.data)
    steps_per_epoch = datasets.train.num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f'batch_size={config.batch_size} is larger than the '
            f'{datasets.train.num_examples} training examples; '
            'it must be at most the size of data.train_split.'
        )
    return datasets, steps_per_epoch


def build_model(
    config: ml_collections.ConfigDict, datasets: data.Datasets
) -> tuple[nn.Module, dict[str, Any]]:
    """The model ``config.model`` names, for the classes and images of ``datasets``.

    Args:
      config: the run's configuration; reads ``config.model``.
      datasets: the run's data, from `load_data`.

    Returns:
      ``(model, model_meta)``: the flax module and what a reader of a snapshot
      needs to rebuild it (``model``, ``dtype``, ``num_classes`` and
      ``image_shape``, a list [H, W, C]; see `checkpoints.RunCheckpointer`).
    """
    model = models.create_model(
        config.model.name,
        datasets.train.num_classes,
        dtype=jnp.dtype(config.model.dtype),
        conv_impl=conv.resolve(config.model.conv_impl),
    )
    model_meta = {
        'model': config.model.name,
        'dtype': config.model.dtype,
        'num_classes': datasets.train.num_classes,
        'image_shape': list(datasets.train.images.shape[1:]),
    }
    return model, model_meta


def planned_snapshot_epochs(config: ml_collections.ConfigDict) -> frozenset[int]:
    """The epochs at whose end a run saves a snapshot.

    Those of ``config.distance.anchor_epochs`` (a snapshot precedes each anchor)
    and, with a cosine schedule, the ends of its cycles up to
    ``config.num_epochs``.
    """
    epochs = {int(epoch) for epoch in config.distance.anchor_epochs}
    epochs.update(schedules.cycle_end_epochs(config, config.num_epochs))
    return frozenset(epochs)


def epoch_order(seed: int, epoch: int, num_examples: int, batch_size: int) -> jax.Array:
    """int32[steps, batch_size]: the shuffled example indices of one epoch.

    A function of the seed and the epoch alone, so a resumed run sees the same
    order as one never interrupted.
    """
    rng = jax.random.fold_in(jax.random.PRNGKey(seed + 1), epoch)
    return data.epoch_permutation(rng, num_examples, batch_size)


def prepare_batch(
    train_data: data.DeviceData,
    order: jax.Array,
    step: jax.Array,
    rng: jax.Array,
    mean: jax.Array,
    std: jax.Array,
) -> dict[str, jax.Array]:
    """The training batch of ``step``: gathered, augmented and normalized.

    Args:
      train_data: the training split on the device.
      order: int32[steps, B] from `epoch_order`; row ``step % steps`` is used.
      step: the global step count.
      rng: the run's key; the step number is folded in for the augmentation.
      mean: f32[C] per-channel mean of the training split.
      std: f32[C] per-channel standard deviation.

    Returns:
      ``image`` f32[B, H, W, C] and ``label`` int32[B].
    """
    batch = data.take_batch(train_data, order[step % order.shape[0]])
    augment_rng = jax.random.fold_in(rng, step)
    batch['image'] = data.normalize(
        data.augment(augment_rng, batch['image']), mean, std
    )
    return batch


def compile_train_step(
    mesh: Mesh | None = None, compiler_options: dict[str, str] | None = None
) -> Callable[..., Any]:
    """The training loop's step as one compiled call.

    It gathers, augments and normalizes the batch (`prepare_batch`), runs
    `train_step` and adds the step's metrics to running totals on the device.

    Args:
      mesh: a mesh from `parallel.create_mesh`: the batch is split over its
        devices and everything else is replicated (every argument should be
        replicated with `parallel.replicate`). None: one device.
      compiler_options: XLA options for ``jax.jit``; None for
        `conv.compiler_options` (XLA's own convolutions on a multi-core CPU).

    Returns:
      ``step(state, totals, train_data, order, mean, std, penalty_config) ->
      (state, totals, step_count)``, donating ``state`` and ``totals``.
    """

    def fused_train_step(state, totals, train_data, order, mean, std, penalty_config):
        batch = prepare_batch(train_data, order, state.step, state.rng, mean, std)
        if mesh is not None:
            batch = parallel.constrain_batch(batch, mesh)
        state, metrics = train_step(state, batch, penalty_config)
        totals = jax.tree.map(jnp.add, totals, metrics)
        # A small output that is not donated: the host waits on it to pace the
        # progress bar without draining the device's queue.
        return state, totals, state.step

    if compiler_options is None:
        compiler_options = conv.compiler_options()
    if mesh is None:
        return jax.jit(
            fused_train_step,
            donate_argnums=(0, 1),
            compiler_options=compiler_options,
        )
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(
        fused_train_step,
        in_shardings=replicated,
        out_shardings=replicated,
        donate_argnums=(0, 1),
        compiler_options=compiler_options,
    )


def compile_eval_batch(mesh: Mesh | None = None) -> Callable[..., Any]:
    """Evaluation of one batch, added to running sums, as one compiled call.

    Args:
      mesh: as for `compile_train_step`; None for one device.

    Returns:
      ``eval_batch(state, totals, batch, mean, std) -> (totals, probabilities)``:
      the batch (uint8 images with ``label`` and ``mask``, see
      `data.eval_batches`) is normalized and evaluated with `eval_step`; its
      ``loss_sum``, ``correct`` and ``count`` are added to ``totals``.
    """

    def eval_batch(state, totals, batch, mean, std):
        if mesh is not None:
            batch = parallel.constrain_batch(batch, mesh)
        batch = dict(batch, image=data.normalize(batch['image'], mean, std))
        metrics = eval_step(state, batch)
        probabilities = metrics.pop('probabilities')
        return jax.tree.map(jnp.add, totals, metrics), probabilities

    options = conv.compiler_options()
    if mesh is None:
        return jax.jit(eval_batch, compiler_options=options)
    return jax.jit(
        eval_batch,
        out_shardings=parallel.replicated_sharding(mesh),
        compiler_options=options,
    )


def run_train_steps(
    train_step: Callable[..., Any],
    state: PyTree,
    totals: PyTree,
    step_args: tuple[Any, ...],
    num_steps: int,
    description: str,
) -> tuple[PyTree, PyTree, float]:
    """Runs a compiled step ``num_steps`` times behind a progress bar.

    The host dispatches up to `_STEPS_AHEAD` steps ahead of the device and reads
    the metric sums once, at the end.

    Args:
      train_step: a step from `compile_train_step` (or the sweep's), called as
        ``train_step(state, totals, *step_args) -> (state, totals, step)``.
      state: the state to start from; donated to the first step.
      totals: the metric sums to add to, on the device; donated likewise.
      step_args: the step's other arguments, the same for every step.
      num_steps: how many steps to run.
      description: the progress bar's label.

    Returns:
      ``(state, totals, seconds)``: the state after the last step, the metric
      sums on the host, and the wall time until they arrived.
    """
    start = time.perf_counter()
    in_flight = collections.deque()
    with tqdm.tqdm(
        total=num_steps, desc=description, leave=False, unit='step'
    ) as progress:
        for _ in range(num_steps):
            state, totals, step_done = train_step(state, totals, *step_args)
            in_flight.append(step_done)
            if len(in_flight) > _STEPS_AHEAD:
                in_flight.popleft().block_until_ready()
                progress.update()
        totals = jax.device_get(totals)
        progress.update(len(in_flight))
    return state, totals, time.perf_counter() - start


def evaluate_split(
    eval_batch: Callable[..., Any],
    state: PyTree,
    datasets: data.Datasets,
    batch_size: int,
    *,
    num_members: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[dict[str, np.ndarray], jax.Array]:
    """Loss, accuracy and softmax outputs of a model on the eval split.

    Args:
      eval_batch: from `compile_eval_batch`, or one that takes and returns the
        same with a leading member axis on the sums and the outputs.
      state: the state to evaluate (stacked for a sweep).
      datasets: the run's data; ``datasets.eval`` is evaluated.
      batch_size: examples per evaluated batch.
      num_members: M for a sweep's stacked state; None for one run.
      mesh: the mesh that ``eval_batch`` expects its sums replicated over; None
        for one device.

    Returns:
      ``(metrics, probabilities)``: ``eval_loss`` and ``eval_accuracy`` as
      float64 arrays of shape [] (one run) or [M] (a sweep), on the host, and
      the softmax outputs f32[N, num_classes] or f32[M, N, num_classes], on the
      device.
    """
    shape = () if num_members is None else (num_members,)
    totals = {
        'loss_sum': jnp.zeros(shape, jnp.float32),
        'correct': jnp.zeros(shape, jnp.int32),
        'count': jnp.zeros(shape, jnp.int32),
    }
    if mesh is not None:
        totals = parallel.replicate(totals, mesh)
    probabilities = []
    for batch in data.eval_batches(datasets.eval, batch_size):
        totals, batch_probabilities = eval_batch(
            state, totals, batch, datasets.mean, datasets.std
        )
        probabilities.append(batch_probabilities)
    # The example axis is the one before the classes, with or without members.
    probabilities = jnp.concatenate(probabilities, axis=-2)
    probabilities = probabilities[..., : datasets.eval.num_examples, :]
    totals = jax.device_get(totals)
    count = np.asarray(totals['count'])
    metrics = {
        'eval_loss': np.asarray(totals['loss_sum'], np.float64) / count,
        'eval_accuracy': np.asarray(totals['correct'], np.float64) / count,
    }
    return metrics, probabilities


class SnapshotEnsemble:
    """The running sum of the snapshots' softmax outputs on the eval split.

    The ensemble of an epoch averages every snapshot taken so far and the current
    model; at a snapshot's own epoch the current model is that snapshot. The
    outputs may carry leading axes, such as a sweep's members, which are kept
    apart: each member's ensemble is of its own snapshots.

    Args:
      labels: int[N] labels of the eval split.
    """

    def __init__(self, labels: jax.Array):
        self._labels = labels
        self._sum = None
        self._count = 0

    def add(self, probabilities: jax.Array) -> None:
        """Adds a snapshot's outputs, f32[..., N, num_classes]."""
        self._sum = probabilities if self._sum is None else self._sum + probabilities
        self._count += 1

    def accuracy(self, current: jax.Array, is_snapshot: bool) -> jax.Array | None:
        """Ensemble accuracy with the current model's outputs; None before any.

        Args:
          current: the current model's outputs, shaped as those added.
          is_snapshot: whether ``current`` is the snapshot added last.

        Returns:
          f32[...]: the accuracy, one per leading index of the outputs (a scalar
          for f32[N, num_classes]); None while no snapshot has been added.
        """
        if self._sum is None:
            return None
        total, members = self._sum, self._count
        if not is_snapshot:
            total, members = total + current, members + 1
        return ensemble.accuracy(total / members, self._labels)


def anchor_metrics(distances: np.ndarray, active: np.ndarray) -> dict[str, float]:
    """How many anchors are stored and the L2 distance to each, by slot.

    Args:
      distances: f32[K], the distance to every slot (`anchor_distances`), on the
        host.
      active: bool[K], the slots that hold an anchor.

    Returns:
      ``anchors`` (the count) and ``distance/{slot}`` for every active slot.
    """
    metrics = {'anchors': int(active.sum())}
    for slot, (value, is_active) in enumerate(zip(distances, active, strict=True)):
        if is_active:
            metrics[f'distance/{slot}'] = float(value)
    return metrics


def _run_epoch(
    run: _Run, state: TrainState, epoch: int
) -> tuple[TrainState, dict[str, float], jax.Array]:
    """Trains one epoch and evaluates.

    Returns:
      The new state, the epoch's metrics (on the host) and the softmax outputs
      on the eval split (on the device).
    """
    train, stats = run.datasets.train, run.datasets
    order, totals = parallel.replicate(
        (
            epoch_order(
                run.config.seed, epoch, train.num_examples, run.config.batch_size
            ),
            zero_train_totals(),
        ),
        run.mesh,
    )
    step_args = (train, order, stats.mean, stats.std, run.penalty_config)
    state, totals, epoch_time = run_train_steps(
        run.train_step, state, totals, step_args, run.steps_per_epoch, f'epoch {epoch}'
    )

    eval_start = time.perf_counter()
    metrics = {
        name: float(value) / run.steps_per_epoch for name, value in totals.items()
    }
    eval_metrics, eval_probabilities = _evaluate(run, state)
    metrics.update(eval_metrics)
    metrics['learning_rate'] = float(run.schedule((epoch - 1) * run.steps_per_epoch))
    metrics['epoch_time'] = epoch_time
    metrics['eval_time'] = time.perf_counter() - eval_start
    return state, metrics, eval_probabilities


def zero_train_totals(shape: tuple[int, ...] = ()) -> Metrics:
    """Zero sums of `TRAIN_METRICS`, of ``shape`` (a sweep's is ``(M,)``)."""
    return {name: jnp.zeros(shape, jnp.float32) for name in TRAIN_METRICS}


def _evaluate(run: _Run, state: TrainState) -> tuple[dict[str, float], jax.Array]:
    """Loss and accuracy on the eval split, and its softmax outputs (on device)."""
    metrics, probabilities = evaluate_split(
        run.eval_batch,
        state,
        run.datasets,
        run.config.eval_batch_size,
        mesh=run.mesh,
    )
    return {name: float(value) for name, value in metrics.items()}, probabilities
