"""Learning-rate schedules of the study, as optax schedules of the step count.

The study stepped its PyTorch schedulers once per epoch. Here every schedule is
a function of the optimizer step, and the step at the start of epoch ``epoch``
(0-based) is ``epoch * steps_per_epoch``. At each of those epoch boundaries the
value equals PyTorch's per-epoch value for that epoch:

* ``constant``: ``lr0``.
* ``step``: ``lr0 * decay_rate ** ((epoch % restart_epochs) // decay_epochs)``;
  it changes only at epoch boundaries, so it equals PyTorch's value on every
  step of the epoch.
* ``cosine``: ``end + (lr0 - end) * (1 + cos(pi * (epoch % period) / period)) / 2``
  (``CosineAnnealingWarmRestarts`` with ``T_mult=1``). Between boundaries it
  follows the same cosine of the fractional epoch, so it decreases smoothly
  through the epoch instead of holding the boundary value.

All schedules can be called under ``jax.jit``, with a scalar step or an array
of steps.
"""

import math
import numbers
from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

SCHEDULE_NAMES = ('constant', 'step', 'cosine')


def constant(init_value: float) -> optax.Schedule:
    """Returns a schedule that holds ``init_value`` at every step.

    Args:
      init_value: the learning rate.

    Returns:
      A function from step count to learning rate.
    """
    return optax.constant_schedule(init_value)


def step_decay(
    init_value: float, decay_rate: float, decay_steps: int, restart_steps: int
) -> optax.Schedule:
    """Returns a staircase decay that restarts from ``init_value`` periodically.

    ``lr(step) = init_value * decay_rate ** ((step % restart_steps) // decay_steps)``.

    Args:
      init_value: the learning rate at the start of each restart period.
      decay_rate: the factor applied every ``decay_steps`` steps.
      decay_steps: positive number of steps between two decays.
      restart_steps: positive number of steps after which the schedule restarts.

    Returns:
      A function from step count to learning rate.
    """
    _check_positive_int('decay_steps', decay_steps)
    _check_positive_int('restart_steps', restart_steps)
    staircase = optax.exponential_decay(
        init_value, transition_steps=decay_steps, decay_rate=decay_rate, staircase=True
    )
    return _periodic(staircase, restart_steps)


def cosine_warm_restarts(
    init_value: float, period_steps: int, end_value: float = 0.0
) -> optax.Schedule:
    """Returns a cosine decay from ``init_value`` to ``end_value``, restarted.

    ``lr(step) = end_value + (init_value - end_value) * (1 + cos(pi * t / T)) / 2``
    with ``t = step % period_steps`` and ``T = period_steps``: SGDR with a fixed
    period, PyTorch's ``CosineAnnealingWarmRestarts(T_0, T_mult=1, eta_min)`` when
    ``period_steps = T_0 * steps_per_epoch``. The value falls smoothly within a
    cycle and jumps back to ``init_value`` at every multiple of ``period_steps``.

    Args:
      init_value: the learning rate at the start of each cycle.
      period_steps: positive length of a cycle in steps.
      end_value: the value that each cycle approaches at its end.

    Returns:
      A function from step count to learning rate.
    """
    _check_positive_int('period_steps', period_steps)
    return _periodic(_cosine_cycle(init_value, end_value, period_steps), period_steps)


def create_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Builds the schedule named by ``config.schedule.name``.

    Reads ``config.optimizer.learning_rate`` and ``config.schedule``: ``name``
    (one of ``SCHEDULE_NAMES``); for ``'step'`` also ``decay_rate``,
    ``decay_epochs`` and ``restart_epochs``; for ``'cosine'`` also
    ``period_epochs`` and ``end_value``. Durations are in epochs.

    Args:
      config: the experiment configuration.
      steps_per_epoch: optimizer steps in one epoch, at least 1.

    Returns:
      A function from step count to learning rate, whose value at step
      ``epoch * steps_per_epoch`` is PyTorch's per-epoch value for ``epoch``.

    Raises:
      ValueError: if a field has a value outside its allowed range.
    """
    _check_positive_int('steps_per_epoch', steps_per_epoch)
    learning_rate = config.optimizer.learning_rate
    _check_non_negative('optimizer.learning_rate', learning_rate)
    name = _schedule_name(config)

    if name == 'constant':
        return constant(learning_rate)

    if name == 'step':
        decay_rate = config.schedule.decay_rate
        if not (_is_real(decay_rate) and 0.0 < decay_rate <= 1.0):
            raise _invalid('schedule.decay_rate', decay_rate, 'in (0, 1]')
        decay_epochs = config.schedule.decay_epochs
        restart_epochs = config.schedule.restart_epochs
        _check_positive_int('schedule.decay_epochs', decay_epochs)
        _check_positive_int('schedule.restart_epochs', restart_epochs)
        return step_decay(
            learning_rate,
            decay_rate=decay_rate,
            decay_steps=decay_epochs * steps_per_epoch,
            restart_steps=restart_epochs * steps_per_epoch,
        )

    period_epochs = config.schedule.period_epochs
    end_value = config.schedule.end_value
    _check_positive_int('schedule.period_epochs', period_epochs)
    _check_non_negative('schedule.end_value', end_value)
    return cosine_warm_restarts(
        learning_rate, period_steps=period_epochs * steps_per_epoch, end_value=end_value
    )


def cycle_end_epochs(
    config: ml_collections.ConfigDict, num_epochs: int
) -> tuple[int, ...]:
    """Returns the epochs at whose end a cosine cycle ends.

    Epochs are counted as completed epochs (1-based): with a period of 150 and
    600 epochs this is ``(150, 300, 450, 600)``. The training loop takes ensemble
    snapshots after these epochs.

    Args:
      config: the experiment configuration (reads ``config.schedule``).
      num_epochs: the number of epochs of the run, non-negative.

    Returns:
      The multiples of ``config.schedule.period_epochs`` up to ``num_epochs`` for
      the ``'cosine'`` schedule, and an empty tuple for the other schedules.

    Raises:
      ValueError: if ``num_epochs``, ``schedule.name`` or
        ``schedule.period_epochs`` has a value outside its allowed range.
    """
    if not (_is_int(num_epochs) and num_epochs >= 0):
        raise _invalid('num_epochs', num_epochs, 'a non-negative integer')
    if _schedule_name(config) != 'cosine':
        return ()
    period_epochs = config.schedule.period_epochs
    _check_positive_int('schedule.period_epochs', period_epochs)
    return tuple(range(period_epochs, num_epochs + 1, period_epochs))


def _periodic(schedule: optax.Schedule, period_steps: int) -> optax.Schedule:
    """Restarts ``schedule`` from its step 0 every ``period_steps`` steps."""
    return lambda step: schedule(step % period_steps)


def _cosine_cycle(
    init_value: float, end_value: float, period_steps: int
) -> optax.Schedule:
    """One cosine decay from init_value (step 0) towards end_value (period_steps)."""
    # (1 + cos(pi t / T)) / 2 == sin(pi/2 * (T - t) / T) ** 2. optax's
    # cosine_decay_schedule computes the left side, which in float32 loses
    # relative precision as cos nears -1 (1e-4 relative at the last epoch of a
    # 150-epoch cycle); the right side stays within a few float32 ulps.
    angle_per_step = math.pi / 2 / period_steps

    def schedule(step: Any) -> Any:
        steps_left = period_steps - step
        return (
            end_value
            + (init_value - end_value) * jnp.sin(angle_per_step * steps_left) ** 2
        )

    return schedule


def _schedule_name(config: ml_collections.ConfigDict) -> str:
    """Returns config.schedule.name after checking it is a known schedule."""
    name = config.schedule.name
    if name not in SCHEDULE_NAMES:
        raise _invalid('schedule.name', name, f'one of {SCHEDULE_NAMES}')
    return name


def _check_positive_int(field: str, value: Any) -> None:
    """Raises ValueError unless value is an integer >= 1."""
    if not (_is_int(value) and value >= 1):
        raise _invalid(field, value, 'a positive integer')


def _check_non_negative(field: str, value: Any) -> None:
    """Raises ValueError unless value is a finite real number >= 0."""
    if not (_is_real(value) and 0.0 <= value < math.inf):
        raise _invalid(field, value, 'a finite number >= 0')


def _is_int(value: Any) -> bool:
    """Whether value is an integer and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """Whether value is a real number and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _invalid(field: str, value: Any, allowed: str) -> ValueError:
    """A one-line error naming the field, its value and what is allowed."""
    return ValueError(f'{field} must be {allowed}, got {value!r}.')
