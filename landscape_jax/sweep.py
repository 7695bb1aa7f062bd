"""Vectorized sweeps: M training runs as one compiled program.

The members of a sweep share the model, the data, the batch size, the schedule's
shape and the anchor epochs, and differ in any of `SWEEPABLE_FIELDS`: the seed,
the penalty's strength and width, the learning rate and the weight decay. Their
training states are stacked (every leaf of a `train.TrainState` gains a leading
member axis M) and `jax.vmap` maps `train.train_step` over that axis:

* seed: each member is initialized from its own ``PRNGKey(seed)`` and draws its
  own augmentation from its state's rng; `epoch_orders` gives it the data order
  of a single run with that seed. A member therefore sees the batches that its
  own run of ``train.train_and_evaluate`` would see.
* strength, width: the `train.PenaltyConfig` holds f32[M] leaves (see
  `Members.penalty_config`); the step already traces them.
* learning rate, weight decay: the optimizer is `sweep_optimizer`, SGD with
  coupled L2 whose learning-rate scale and weight decay are hyperparameters kept
  in the optimizer state (``optax.inject_hyperparams``), so they are data with a
  member axis like everything else. Member m follows
  ``learning_rate_scales[m] * schedule(step)``: the whole schedule is scaled,
  which is the schedule of learning rate ``scale * lr0`` for the constant and
  step schedules and for cosine with ``end_value=0``.

Each member's step equals its own run's step up to float rounding: vmapped
convolutions are grouped convolutions, which XLA may sum in another order. On a
multi-core CPU, where `conv.compiler_options` hands plain convolutions to XLA's
own kernels and grouped ones are lowered another way, the two roundings differ
more: a few steps of a tiny run then differ by ~1e-4 of the parameters, about
what the same single run differs by between those two convolution libraries.

`train_and_evaluate_sweep` is the whole sweep: it writes into each member's run
directory what ``train.train_and_evaluate`` writes there, so that every member can
be read, evaluated, resumed or extended as a run of its own. A sweep runs on one
device.

    train_and_evaluate_sweep(configs, ['runs/s1', 'runs/s10', 'runs/s100'])

Its pieces, for a loop of one's own:

    members = members_from_configs(configs)
    schedule = schedules.create_schedule(configs[0], steps_per_epoch)
    state = create_sweep_state(members, model, image_shape, schedule,
                               momentum=0.9, num_anchor_slots=1)
    step = compile_train_step()
    orders = epoch_orders(members.seeds, epoch, num_examples, batch_size)
    state, totals, _ = step(state, totals, datasets.train, orders, datasets.mean,
                            datasets.std, members.penalty_config())
    member_state = unstack(state, 2)
"""

import dataclasses
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import linen as nn

from landscape_jax import (
    checkpoints,
    config_validation,
    conv,
    data,
    metric_writers,
    optim,
    schedules,
    train,
)

Metrics = dict[str, jax.Array]

# The config fields in which the members of a sweep may differ.
SWEEPABLE_FIELDS = (
    'seed',
    'distance.strength',
    'distance.width',
    'optimizer.learning_rate',
    'optimizer.weight_decay',
)


@dataclasses.dataclass(frozen=True)
class Members:
    """The per-member hyperparameters of a sweep, one entry per member.

    Attributes:
      seeds: the seed of each member's run (initialization, augmentation and,
        through `epoch_orders`, data order).
      strengths: the penalty strength s of each member.
      widths: the penalty width σ² of each member, > 0.
      learning_rate_scales: the factor by which each member scales the shared
        schedule, >= 0.
      weight_decays: the coupled L2 coefficient of each member, >= 0.
    """

    seeds: tuple[int, ...]
    strengths: tuple[float, ...]
    widths: tuple[float, ...]
    learning_rate_scales: tuple[float, ...]
    weight_decays: tuple[float, ...]

    def __post_init__(self):
        fields = [field.name for field in dataclasses.fields(self)]
        lengths = {name: len(getattr(self, name)) for name in fields}
        if len(set(lengths.values())) != 1 or not lengths['seeds']:
            raise ValueError(
                f'Every field of Members needs one entry per member, got {lengths}.'
            )
        for name in fields:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_each('seeds', self.seeds, _is_int, 'an integer')
        _check_each('strengths', self.strengths, math.isfinite, 'finite')
        _check_each('widths', self.widths, _is_positive, '> 0 and finite')
        _check_each(
            'learning_rate_scales',
            self.learning_rate_scales,
            _is_non_negative,
            '>= 0 and finite',
        )
        _check_each(
            'weight_decays', self.weight_decays, _is_non_negative, '>= 0 and finite'
        )

    @property
    def num_members(self) -> int:
        """M, the number of members."""
        return len(self.seeds)

    def penalty_config(self) -> train.PenaltyConfig:
        """The members' penalty coefficients, each an f32[M] array."""
        return train.PenaltyConfig(
            strength=jnp.asarray(self.strengths, jnp.float32),
            width=jnp.asarray(self.widths, jnp.float32),
            weight_decay=jnp.asarray(self.weight_decays, jnp.float32),
        )


def members_from_configs(configs: Sequence[ml_collections.ConfigDict]) -> Members:
    """The members of a sweep whose runs are described by ``configs``.

    Member m is ``configs[m]``. Learning rates become scales of the learning
    rate of ``configs[0]``, whose schedule the sweep should be built with.

    Args:
      configs: one full configuration per member; they may differ only in
        `SWEEPABLE_FIELDS`.

    Returns:
      The members' hyperparameters.

    Raises:
      ValueError: if ``configs`` is empty, two configs differ in another field,
        or the learning rates differ where scaling the schedule of
        ``configs[0]`` cannot give them (its learning rate is 0, or its cosine
        schedule has a nonzero ``end_value``).
    """
    if not configs:
        raise ValueError('A sweep needs at least one member config, got none.')
    base = _flatten(configs[0].to_dict())
    for index, config in enumerate(configs[1:], start=1):
        flat = _flatten(config.to_dict())
        for field in sorted(set(base) | set(flat)):
            if field not in SWEEPABLE_FIELDS and base.get(field) != flat.get(field):
                raise ValueError(
                    f'The members of a sweep may differ only in {SWEEPABLE_FIELDS}, '
                    f'but {field} is {base.get(field)!r} in config 0 and '
                    f'{flat.get(field)!r} in config {index}.'
                )

    learning_rates = [config.optimizer.learning_rate for config in configs]
    base_rate = learning_rates[0]
    if len(set(learning_rates)) > 1:
        if not base_rate > 0:
            raise ValueError(
                'Members with different optimizer.learning_rate scale the schedule '
                f'of config 0, whose learning_rate must be > 0, got {base_rate!r}.'
            )
        schedule = configs[0].schedule
        if schedule.name == 'cosine' and schedule.end_value != 0:
            raise ValueError(
                'Members with different optimizer.learning_rate scale the whole '
                'cosine schedule, end value included; schedule.end_value must be 0, '
                f'got {schedule.end_value!r}.'
            )
    return Members(
        seeds=tuple(config.seed for config in configs),
        strengths=tuple(float(config.distance.strength) for config in configs),
        widths=tuple(float(config.distance.width) for config in configs),
        learning_rate_scales=tuple(
            1.0 if rate == base_rate else rate / base_rate for rate in learning_rates
        ),
        weight_decays=tuple(float(config.optimizer.weight_decay) for config in configs),
    )


def sweep_optimizer(
    schedule: optax.Schedule, momentum: float
) -> optax.GradientTransformation:
    """`optim.sgd_coupled_l2` with its learning-rate scale and weight decay as data.

    The optimizer state is ``optax.inject_hyperparams``'s: ``hyperparams`` holds
    ``learning_rate_scale`` and ``weight_decay`` as f32 scalars (1 and 0 after
    ``init``; `create_sweep_state` sets each member's), and ``inner_state`` is
    the state of ``optim.sgd_coupled_l2(scale * schedule, momentum,
    weight_decay)``.

    Args:
      schedule: the learning rate of a member with scale 1, a function of the
        update count.
      momentum: the momentum coefficient, in [0, 1), shared by all members.

    Returns:
      The optax transformation.

    Raises:
      ValueError: if ``momentum`` is outside [0, 1).
    """
    if not (_is_real(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f'momentum must be in [0, 1), got {momentum!r}.')
    return optax.inject_hyperparams(
        _scaled_sgd_coupled_l2, static_args=('schedule', 'momentum')
    )(learning_rate_scale=1.0, weight_decay=0.0, schedule=schedule, momentum=momentum)


def create_sweep_state(
    members: Members,
    model: nn.Module,
    image_shape: tuple[int, int, int],
    schedule: optax.Schedule,
    momentum: float,
    num_anchor_slots: int,
) -> train.TrainState:
    """Initializes the stacked training state of every member.

    Each member is initialized by ``train.create_train_state(PRNGKey(seed), ...)``,
    exactly as its own run is, and the states are stacked. (Vmapping the
    initialization over the seeds gives the same values, but on CPU it takes
    several times longer than initializing the members one after another.)

    Args:
      members: the members' hyperparameters.
      model: the flax module all members train.
      image_shape: (H, W, C) of one input image.
      schedule: the shared schedule (see `sweep_optimizer`).
      momentum: the shared momentum coefficient.
      num_anchor_slots: how many anchors each member may store.

    Returns:
      A `train.TrainState` whose array leaves have a leading axis M and whose
      optimizer is `sweep_optimizer`.
    """
    optimizer = sweep_optimizer(schedule, momentum)
    states = [
        train.create_train_state(
            jax.random.PRNGKey(seed), model, image_shape, optimizer, num_anchor_slots
        )
        for seed in members.seeds
    ]
    state = _stack(states)
    hyperparams = {
        'learning_rate_scale': jnp.asarray(members.learning_rate_scales, jnp.float32),
        'weight_decay': jnp.asarray(members.weight_decays, jnp.float32),
    }
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def sweep_train_step(
    state: train.TrainState,
    batch: dict[str, jax.Array],
    penalty_config: train.PenaltyConfig,
) -> tuple[train.TrainState, Metrics]:
    """`train.train_step` for every member at once; pure and jittable.

    Args:
      state: the stacked state from `create_sweep_state`.
      batch: each member's batch: ``image`` f32[M, B, H, W, C] (augmented and
        normalized) and ``label`` int32[M, B]. For one batch shared by all
        members, call ``jax.vmap(train.train_step, in_axes=(0, None, 0))``.
      penalty_config: a `train.PenaltyConfig` with f32[M] leaves.

    Returns:
      The new stacked state and the metrics of `train.train_step`, each f32[M].
    """
    return jax.vmap(train.train_step)(state, batch, penalty_config)


def store_anchor(state: train.TrainState) -> train.TrainState:
    """Stores every member's current parameters as a new anchor of that member."""
    return jax.vmap(train.store_anchor)(state)


def anchor_distances(state: train.TrainState) -> jax.Array:
    """f32[M, K]: each member's L2 distance to each of its anchor slots."""
    return jax.vmap(train.anchor_distances)(state)


def unstack(
    state: train.TrainState,
    index: int,
    optimizer: optax.GradientTransformation | None = None,
) -> train.TrainState:
    """The training state of one member.

    Args:
      state: the stacked state from `create_sweep_state`.
      index: the member, in [0, M).
      optimizer: None to keep the sweep's optimizer and state. Otherwise the
        member's own ``optim.sgd_coupled_l2`` (its learning-rate schedule,
        momentum and weight decay): the result is then the state of that
        member's single run, which ``train`` can save, resume and evaluate.

    Returns:
      The member's `train.TrainState`, without the member axis.
    """
    num_members = jax.tree.leaves(state)[0].shape[0]
    if not 0 <= index < num_members:
        raise ValueError(f'index must be in [0, {num_members}), got {index}.')
    member = jax.tree.map(lambda leaf: leaf[index], state)
    if optimizer is None:
        return member
    return member.replace(tx=optimizer, opt_state=member.opt_state.inner_state)


def epoch_orders(
    seeds: Sequence[int], epoch: int, num_examples: int, batch_size: int
) -> jax.Array:
    """Each member's shuffled batches for one epoch, as its own run draws them.

    Member m gets `train.epoch_order` of its seed, as its own run would.

    Args:
      seeds: the members' seeds.
      epoch: the epoch, counted from 1.
      num_examples: examples in the training split.
      batch_size: examples per batch.

    Returns:
      int32[M, num_examples // batch_size, batch_size] example indices.
    """
    return jnp.stack(
        [train.epoch_order(seed, epoch, num_examples, batch_size) for seed in seeds]
    )


def compile_train_step(
    compiler_options: dict[str, str] | None = None,
) -> Callable[..., Any]:
    """The training loop's fused step (`train.compile_train_step`) for a sweep.

    Args:
      compiler_options: XLA options for ``jax.jit``; None for
        `conv.compiler_options`.

    Returns:
      ``step(state, totals, train_data, orders, mean, std, penalty_config) ->
      (state, totals, step)``, jitted, donating ``state`` and ``totals``:
      ``orders`` is int32[M, steps, B] from `epoch_orders`, ``totals`` and the
      result's metrics sums are f32[M] per metric, the returned ``step`` is
      int32[M]; ``train_data``, ``mean`` and ``std`` are shared.
    """
    member_batches = jax.vmap(train.prepare_batch, in_axes=(None, 0, 0, 0, None, None))

    def fused_train_step(state, totals, train_data, orders, mean, std, penalty_config):
        batch = member_batches(train_data, orders, state.step, state.rng, mean, std)
        state, metrics = sweep_train_step(state, batch, penalty_config)
        totals = jax.tree.map(jnp.add, totals, metrics)
        return state, totals, state.step

    if compiler_options is None:
        compiler_options = conv.compiler_options()
    return jax.jit(
        fused_train_step, donate_argnums=(0, 1), compiler_options=compiler_options
    )


def compile_eval_batch() -> Callable[..., tuple[Metrics, Metrics]]:
    """Evaluation of one shared batch by every member, added to running sums.

    Returns:
      ``eval_batch(state, totals, batch, mean, std) -> (totals, outputs)``,
      jitted: the batch (from `data.eval_batches`) is normalized and evaluated
      by each member with `train.eval_step`. Its results named in ``totals``
      (``loss_sum``, ``correct``, ``count``, each of shape [M]) are added to
      ``totals``; ``outputs`` holds the rest, per member and example (such as
      ``probabilities`` f32[M, B, num_classes]).
    """

    def eval_batch(state, totals, batch, mean, std):
        batch = dict(batch, image=data.normalize(batch['image'], mean, std))
        results = dict(jax.vmap(train.eval_step, in_axes=(0, None))(state, batch))
        totals = {name: total + results.pop(name) for name, total in totals.items()}
        return totals, results

    return jax.jit(eval_batch, compiler_options=conv.compiler_options())


def train_and_evaluate_sweep(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str | os.PathLike[str]],
    *,
    allow_config_change: bool = False,
) -> list[train.TrainState]:
    """Trains the runs of ``configs`` as one vmapped program, each in its workdir.

    Member m writes into ``workdirs[m]`` what ``train.train_and_evaluate(configs[m],
    workdirs[m])`` writes there: ``config.json``; per epoch one line of
    ``metrics.jsonl`` with the same metrics, and TensorBoard events; a snapshot at
    the end of each anchor epoch (before the anchor is stored) and of each cosine
    cycle; and after each epoch its training state, saved as the state of a single
    run. So `ensemble.load_snapshots` reads a member's snapshots, and
    ``train.train_and_evaluate`` resumes or extends a member on its own. The
    numbers equal those of the member's own run up to float rounding (see the
    module docstring), except ``epoch_time`` and ``eval_time``: those are the
    wall times of the whole sweep's epoch and evaluation, the same for every
    member.

    The sweep runs on one device, the default one: unlike
    ``train.train_and_evaluate`` it does not split batches over a mesh.

    A rerun resumes: when every workdir holds a training state of the same epoch,
    all members continue from it; when none holds one, the sweep starts afresh.

    Args:
      configs: one configuration per member; they may differ only in
        `SWEEPABLE_FIELDS` (see `members_from_configs`).
      workdirs: the run directory of each member, all distinct; created if
        missing.
      allow_config_change: continue members whose workdir was made with a
        different configuration, as for ``train.train_and_evaluate``.

    Returns:
      The final training state of each member, as its own run returns it (with
      the member's own optimizer, see `unstack`).

    Raises:
      ValueError: if a config is invalid, the configs differ in a field that is
        not sweepable, ``workdirs`` does not hold one distinct directory per
        config, or some workdirs hold a training state and others none or one of
        another epoch.
      FloatingPointError: if the metrics of a member are not finite after an
        epoch. Nothing of that epoch is saved for any member; every workdir
        keeps its state of the epoch before and its snapshots.
    """
    workdirs = [os.fspath(workdir) for workdir in workdirs]
    _check_workdirs(configs, workdirs)
    for config in configs:
        config_validation.validate_config(config)
    members = members_from_configs(configs)
    for config, workdir in zip(configs, workdirs, strict=True):
        config_validation.validate_workdir(workdir, config)

    sweep = _setup(list(configs), workdirs, members, allow_config_change)
    state, start_epoch = sweep.state, sweep.start_epoch
    if start_epoch:
        logging.info(
            'Resuming %d members after epoch %d.', members.num_members, start_epoch
        )
    for epoch in sorted(e for e in sweep.snapshot_epochs if e <= start_epoch):
        snapshots = [checkpoints.load_snapshot(workdir, epoch) for workdir in workdirs]
        variables = _stack([snapshot.variables for snapshot in snapshots])
        _, probabilities = _evaluate(sweep, state.replace(**variables))
        sweep.ensemble.add(probabilities)

    for epoch in range(start_epoch + 1, sweep.config.num_epochs + 1):
        state, member_metrics, probabilities = _run_epoch(sweep, state, epoch)
        _check_finite(sweep, member_metrics, epoch)
        is_snapshot = epoch in sweep.snapshot_epochs
        if is_snapshot:
            for index, checkpointer in enumerate(sweep.checkpointers):
                checkpointer.save_snapshot(epoch, unstack(state, index))
            sweep.ensemble.add(probabilities)
        ensemble_accuracy = jax.device_get(
            sweep.ensemble.accuracy(probabilities, is_snapshot)
        )
        if epoch in sweep.anchor_epochs:
            state = sweep.store_anchor(state)
        distances, active = jax.device_get((anchor_distances(state), state.anchor_mask))

        for index, metrics in enumerate(member_metrics):
            if ensemble_accuracy is not None:
                metrics['ensemble_accuracy'] = float(ensemble_accuracy[index])
            metrics.update(train.anchor_metrics(distances[index], active[index]))
            sweep.writers[index].write(epoch, metrics)
            sweep.checkpointers[index].save_state(
                epoch, sweep.member_state(state, index)
            )

    sweep.close()
    return [sweep.member_state(state, index) for index in range(members.num_members)]


@dataclasses.dataclass
class _Sweep:
    """Everything a sweep sets up once before its first epoch.

    ``config`` is the first member's, for the fields all members share.
    ``member_schedules`` and ``member_optimizers`` are each member's own, as its
    single run builds them: the first gives the learning rate it logs, the second
    the optimizer of the training state it saves.
    """

    config: ml_collections.ConfigDict
    members: Members
    datasets: data.Datasets
    state: train.TrainState
    start_epoch: int
    steps_per_epoch: int
    member_schedules: list[optax.Schedule]
    member_optimizers: list[optax.GradientTransformation]
    anchor_epochs: frozenset[int]
    snapshot_epochs: frozenset[int]
    penalty_config: train.PenaltyConfig
    train_step: Any
    eval_batch: Any
    store_anchor: Any
    workdirs: list[str]
    checkpointers: list[checkpoints.RunCheckpointer]
    writers: list[metric_writers.MetricWriter]
    ensemble: train.SnapshotEnsemble

    def member_state(self, state: train.TrainState, index: int) -> train.TrainState:
        """Member ``index`` of ``state`` as the state of its own run."""
        return unstack(state, index, optimizer=self.member_optimizers[index])

    def close(self) -> None:
        """Waits for pending writes and closes every member's files."""
        for checkpointer in self.checkpointers:
            checkpointer.close()
        for writer in self.writers:
            writer.close()


def _check_workdirs(
    configs: Sequence[ml_collections.ConfigDict], workdirs: list[str]
) -> None:
    """Raises ValueError unless ``workdirs`` holds one distinct path per config."""
    if len(workdirs) != len(configs):
        raise ValueError(
            f'workdirs must hold one run directory per config, got {len(workdirs)} '
            f'workdirs for {len(configs)} configs.'
        )
    first_index = {}
    for index, workdir in enumerate(workdirs):
        key = os.path.abspath(workdir)
        if key in first_index:
            raise ValueError(
                f'workdirs must be distinct, got workdirs[{first_index[key]}] and '
                f'workdirs[{index}] both {workdir!r}.'
            )
        first_index[key] = index


def _setup(
    configs: list[ml_collections.ConfigDict],
    workdirs: list[str],
    members: Members,
    allow_config_change: bool,
) -> _Sweep:
    """Loads data, builds the model and the stacked state, and restores a resume."""
    start_epoch = _common_start_epoch(workdirs)
    config = configs[0]
    anchor_epochs = tuple(int(epoch) for epoch in config.distance.anchor_epochs)
    datasets, steps_per_epoch = train.load_data(config)
    model, model_meta = train.build_model(config, datasets)
    state = create_sweep_state(
        members,
        model,
        tuple(model_meta['image_shape']),
        schedules.create_schedule(config, steps_per_epoch),
        config.optimizer.momentum,
        num_anchor_slots=len(anchor_epochs),
    )
    member_optimizers = [
        optim.create_optimizer(member_config, steps_per_epoch)
        for member_config in configs
    ]
    checkpointers = [
        checkpoints.RunCheckpointer(
            workdir,
            member_config,
            model_meta,
            max_to_keep=member_config.checkpoints_to_keep,
            allow_config_change=allow_config_change,
        )
        for member_config, workdir in zip(configs, workdirs, strict=True)
    ]
    if start_epoch:
        state = _restore(state, checkpointers, member_optimizers, start_epoch)
    writers = [
        metric_writers.MetricWriter(workdir, resume_after_epoch=start_epoch)
        for workdir in workdirs
    ]
    for index, workdir in enumerate(workdirs):
        logging.info('Sweep member %d writes to %s.', index, workdir)

    compiled_eval_batch = compile_eval_batch()

    def eval_batch(*args):
        totals, outputs = compiled_eval_batch(*args)
        return totals, outputs['probabilities']

    return _Sweep(
        config=config,
        members=members,
        datasets=datasets,
        state=state,
        start_epoch=start_epoch,
        steps_per_epoch=steps_per_epoch,
        member_schedules=[
            schedules.create_schedule(member_config, steps_per_epoch)
            for member_config in configs
        ],
        member_optimizers=member_optimizers,
        anchor_epochs=frozenset(anchor_epochs),
        snapshot_epochs=train.planned_snapshot_epochs(config),
        penalty_config=members.penalty_config(),
        train_step=compile_train_step(),
        eval_batch=eval_batch,
        store_anchor=jax.jit(store_anchor, donate_argnums=0),
        workdirs=workdirs,
        checkpointers=checkpointers,
        writers=writers,
        ensemble=train.SnapshotEnsemble(datasets.eval.labels),
    )


def _common_start_epoch(workdirs: list[str]) -> int:
    """The epoch of the training state that every workdir holds; 0 if none holds one.

    Raises:
      ValueError: if some workdirs hold a state and others none, or states of
        different epochs.
    """
    epochs = [checkpoints.latest_state_epoch(workdir) for workdir in workdirs]
    if len(set(epochs)) > 1:
        held = ', '.join(
            f'{workdir!r} ' + ('none' if epoch is None else f'epoch {epoch}')
            for workdir, epoch in zip(workdirs, epochs, strict=True)
        )
        raise ValueError(
            'A sweep resumes only when every workdir holds a training state of the '
            f'same epoch, or starts afresh when none holds one; the workdirs hold '
            f'states of: {held}. Use new workdirs, or bring the runs to one epoch '
            'with train.train_and_evaluate.'
        )
    return epochs[0] or 0


def _restore(
    state: train.TrainState,
    checkpointers: list[checkpoints.RunCheckpointer],
    member_optimizers: list[optax.GradientTransformation],
    start_epoch: int,
) -> train.TrainState:
    """The stacked state from each member's saved state of ``start_epoch``."""
    restored = []
    for index, (checkpointer, optimizer) in enumerate(
        zip(checkpointers, member_optimizers, strict=True)
    ):
        member, epoch = checkpointer.restore_state(
            unstack(state, index, optimizer=optimizer)
        )
        if epoch != start_epoch:
            raise ValueError(
                f'workdir {str(checkpointer.workdir)!r} changed while the sweep '
                f'started: its training state is of epoch {epoch}, not '
                f'{start_epoch}.'
            )
        restored.append(member)
    # The members' optimizers differ, and with them the static part of their
    # states: only the arrays are stacked, the optimizer's inner state among them.
    arrays = {
        name: _stack([getattr(member, name) for member in restored])
        for name in ('step', 'params', 'batch_stats', 'anchors', 'anchor_mask', 'rng')
    }
    # A buffer of its own: the step is donated to the next step with the state.
    opt_state = state.opt_state._replace(
        count=jnp.copy(arrays['step']),
        inner_state=_stack([member.opt_state for member in restored]),
    )
    return state.replace(**arrays, opt_state=opt_state)


def _run_epoch(
    sweep: _Sweep, state: train.TrainState, epoch: int
) -> tuple[train.TrainState, list[dict[str, float]], jax.Array]:
    """Trains every member for one epoch and evaluates them.

    Returns:
      The new stacked state, each member's metrics of the epoch (on the host) and
      the softmax outputs f32[M, N, num_classes] on the eval split (on the device).
    """
    train_data, num_members = sweep.datasets.train, sweep.members.num_members
    orders = epoch_orders(
        sweep.members.seeds, epoch, train_data.num_examples, sweep.config.batch_size
    )
    totals = train.zero_train_totals((num_members,))
    step_args = (
        train_data,
        orders,
        sweep.datasets.mean,
        sweep.datasets.std,
        sweep.penalty_config,
    )
    state, totals, epoch_time = train.run_train_steps(
        sweep.train_step,
        state,
        totals,
        step_args,
        sweep.steps_per_epoch,
        f'epoch {epoch}, {num_members} members',
    )

    eval_start = time.perf_counter()
    eval_metrics, probabilities = _evaluate(sweep, state)
    eval_time = time.perf_counter() - eval_start
    first_step = (epoch - 1) * sweep.steps_per_epoch
    member_metrics = []
    for index in range(num_members):
        metrics = {
            name: float(value[index]) / sweep.steps_per_epoch
            for name, value in totals.items()
        }
        metrics.update(
            {name: float(value[index]) for name, value in eval_metrics.items()}
        )
        metrics['learning_rate'] = float(sweep.member_schedules[index](first_step))
        metrics['epoch_time'] = epoch_time
        metrics['eval_time'] = eval_time
        member_metrics.append(metrics)
    return state, member_metrics, probabilities


def _evaluate(sweep: _Sweep, state: train.TrainState) -> tuple[dict, jax.Array]:
    """Every member's eval loss and accuracy, f64[M], and outputs on the device."""
    return train.evaluate_split(
        sweep.eval_batch,
        state,
        sweep.datasets,
        sweep.config.eval_batch_size,
        num_members=sweep.members.num_members,
    )


def _check_finite(
    sweep: _Sweep, member_metrics: list[dict[str, float]], epoch: int
) -> None:
    """Closes the sweep and raises FloatingPointError if a member diverged."""
    diverged = [
        index
        for index, metrics in enumerate(member_metrics)
        if not metric_writers.is_finite(metrics)
    ]
    if not diverged:
        return
    sweep.close()
    details = '; '.join(
        f'member {index} (workdir {sweep.workdirs[index]!r}): {member_metrics[index]}'
        for index in diverged
    )
    raise FloatingPointError(
        f'Training diverged in epoch {epoch}: {details}. Nothing of epoch {epoch} '
        f'was saved for any member; the states saved after epoch {epoch - 1} and '
        'all snapshots are kept in every workdir of the sweep.'
    )


def _stack(trees: Sequence[Any]) -> Any:
    """Pytrees of one structure as one, each leaf gaining a leading member axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _scaled_sgd_coupled_l2(
    learning_rate_scale: jax.Array,
    weight_decay: jax.Array,
    schedule: optax.Schedule,
    momentum: float,
) -> optax.GradientTransformation:
    """`optim.sgd_coupled_l2` at ``learning_rate_scale`` times ``schedule``."""
    return optim.sgd_coupled_l2(
        lambda count: learning_rate_scale * schedule(count),
        momentum=momentum,
        weight_decay=weight_decay,
    )


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
    """A nested dict as one dict with dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _check_each(
    field: str, values: tuple, is_valid: Callable[[Any], bool], allowed: str
) -> None:
    """Raises ValueError naming the first entry of ``values`` that is not valid."""
    for index, value in enumerate(values):
        if not (_is_real(value) and is_valid(value)):
            raise ValueError(
                f'Members.{field}[{index}] must be {allowed}, got {value!r}.'
            )


def _is_positive(value: float) -> bool:
    """Whether value is finite and > 0."""
    return 0 < value < math.inf


def _is_non_negative(value: float) -> bool:
    """Whether value is finite and >= 0."""
    return 0 <= value < math.inf


def _is_int(value: Any) -> bool:
    """Whether value is an integer and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """Whether value is a real number and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
