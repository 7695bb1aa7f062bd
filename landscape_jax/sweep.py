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
convolutions are grouped convolutions, which XLA may sum in another order.

Example:

    members = members_from_configs(configs)
    schedule = schedules.create_schedule(configs[0], steps_per_epoch)
    state = create_sweep_state(members, model, image_shape, schedule,
                               momentum=0.9, num_anchor_slots=1)
    step = compile_train_step(steps_per_epoch)
    orders = epoch_orders(members.seeds, epoch, num_examples, batch_size)
    state, totals, _ = step(state, totals, datasets.train, orders, datasets.mean,
                            datasets.std, members.penalty_config())
    member_state = unstack(state, 2)
"""

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from landscape_jax import data, optim, train

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
    state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
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


def compile_train_step() -> Callable[..., Any]:
    """The training loop's fused step (`train.compile_train_step`) for a sweep.

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

    return jax.jit(fused_train_step, donate_argnums=(0, 1))


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

    return jax.jit(eval_batch)


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
