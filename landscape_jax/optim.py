"""SGD with momentum and PyTorch-style coupled L2 weight decay.

The study trained with ``torch.optim.SGD(lr, momentum, weight_decay)``, whose
step for every parameter ``p`` with gradient ``g`` is::

    d = g + weight_decay * p          # L2 enters the gradient ...
    buf = d            (first step)   # ... and so the momentum buffer.
    buf = momentum * buf + d          (later steps; dampening 0)
    p = p - lr * buf                  (no Nesterov)

``sgd_coupled_l2`` reproduces this step. It differs from decoupled weight
decay (``optax.adamw``-style), where the decay is added after the momentum.

The optimizer state is the plain optax chain state; it does not record the
learning rate. The training loop logs ``create_schedule(config,
steps_per_epoch)(step)``, the learning rate that the update at ``step``
(counted from 0) uses.
"""

import numbers

import ml_collections
import optax

from landscape_jax import schedules


def sgd_coupled_l2(
    learning_rate: float | optax.Schedule, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
    """Returns SGD with heavy-ball momentum and coupled L2 weight decay.

    Matches ``torch.optim.SGD(lr, momentum, weight_decay)`` with its defaults
    ``dampening=0`` and ``nesterov=False``: ``weight_decay * params`` is added to
    the gradient of every parameter (no mask, biases and normalization scales
    included) before the momentum buffer, whose first value is that sum. The
    update needs ``params``: ``optimizer.update(grads, opt_state, params)``.

    Args:
      learning_rate: a fixed learning rate, or a schedule of the update count
        (the first update uses ``learning_rate(0)``).
      momentum: the momentum coefficient, in [0, 1).
      weight_decay: the L2 coefficient, >= 0.

    Returns:
      The optax gradient transformation.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum),
    )


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Builds the optimizer described by ``config.optimizer`` and ``config.schedule``.

    Reads ``config.optimizer.momentum`` and ``config.optimizer.weight_decay``
    here, and ``config.optimizer.learning_rate`` with ``config.schedule`` through
    ``schedules.create_schedule``.

    Args:
      config: the experiment configuration.
      steps_per_epoch: optimizer steps in one epoch, at least 1.

    Returns:
      ``sgd_coupled_l2`` driven by the configured learning-rate schedule.

    Raises:
      ValueError: if a field has a value outside its allowed range.
    """
    momentum = config.optimizer.momentum
    weight_decay = config.optimizer.weight_decay
    if not (_is_real(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f'optimizer.momentum must be in [0, 1), got {momentum!r}.')
    if not (_is_real(weight_decay) and 0.0 <= weight_decay < float('inf')):
        raise ValueError(
            'optimizer.weight_decay must be a finite number >= 0, '
            f'got {weight_decay!r}.'
        )

    schedule = schedules.create_schedule(config, steps_per_epoch)
    return sgd_coupled_l2(schedule, momentum=momentum, weight_decay=weight_decay)


def _is_real(value: object) -> bool:
    """Whether value is a real number and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
