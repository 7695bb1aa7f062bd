"""Tests of the learning-rate schedules and of SGD with coupled L2."""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from landscape_jax import optim, schedules

NUM_EPOCHS = 600
# CIFAR-10 with batch 128 and the remainder dropped: 50_000 // 128.
CIFAR10_STEPS_PER_EPOCH = 390
LEARNING_RATE = 0.01
# float32 evaluation of the schedules is within a few ulps of float64 values.
RTOL = 3e-7


def _config(name: str, **overrides) -> ml_collections.ConfigDict:
    """The study's optimizer and schedule settings; overrides as group__field."""
    fields = {
        'optimizer': {
            'learning_rate': LEARNING_RATE,
            'momentum': 0.9,
            'weight_decay': 1e-3,
        },
        'schedule': {
            'name': name,
            'decay_rate': 0.1,
            'decay_epochs': 50,
            'restart_epochs': 150,
            'period_epochs': 150,
            'end_value': 0.0,
        },
    }
    for override, value in overrides.items():
        group, field = override.split('__')
        fields[group][field] = value
    return ml_collections.ConfigDict(fields)


def _step_lr(epoch: int) -> float:
    """PyTorch's per-epoch step decay with restarts, in float64."""
    return LEARNING_RATE * 0.1 ** ((epoch % 150) // 50)


def _cosine_lr(epoch: int) -> float:
    """PyTorch's CosineAnnealingWarmRestarts(T_0=150, eta_min=0), in float64."""
    return LEARNING_RATE * (1 + math.cos(math.pi * (epoch % 150) / 150)) / 2


def _at_epoch_starts(schedule: optax.Schedule, steps_per_epoch: int) -> np.ndarray:
    """The jitted schedule at the first step of every epoch, in float64."""
    steps = jnp.arange(NUM_EPOCHS, dtype=jnp.int32) * steps_per_epoch
    return np.asarray(jax.jit(schedule)(steps), dtype=np.float64)


@pytest.mark.parametrize('steps_per_epoch', [CIFAR10_STEPS_PER_EPOCH, 3])
@pytest.mark.parametrize(
    'name, per_epoch_lr', [('step', _step_lr), ('cosine', _cosine_lr)]
)
def test_schedule_equals_pytorch_per_epoch_closed_form(
    name, per_epoch_lr, steps_per_epoch
):
    schedule = schedules.create_schedule(_config(name), steps_per_epoch)

    expected = [per_epoch_lr(epoch) for epoch in range(NUM_EPOCHS)]

    np.testing.assert_allclose(
        _at_epoch_starts(schedule, steps_per_epoch), expected, rtol=RTOL, atol=0
    )


def test_constant_schedule_is_constant_under_jit():
    schedule = schedules.create_schedule(_config('constant'), 390)

    values = _at_epoch_starts(schedule, 390)

    np.testing.assert_allclose(
        np.broadcast_to(values, (NUM_EPOCHS,)), LEARNING_RATE, rtol=RTOL, atol=0
    )


def test_step_schedule_holds_the_epoch_value_on_every_step():
    steps_per_epoch = 3
    schedule = jax.jit(schedules.create_schedule(_config('step'), steps_per_epoch))

    steps = np.arange(NUM_EPOCHS * steps_per_epoch, dtype=np.int32)
    expected = [_step_lr(step // steps_per_epoch) for step in steps.tolist()]

    np.testing.assert_allclose(schedule(steps), expected, rtol=RTOL, atol=0)


def test_cosine_schedule_decreases_within_each_cycle_and_restarts():
    steps_per_epoch = 3
    schedule = jax.jit(schedules.create_schedule(_config('cosine'), steps_per_epoch))
    period_steps = 150 * steps_per_epoch

    values = np.asarray(
        schedule(jnp.arange(NUM_EPOCHS * steps_per_epoch, dtype=jnp.int32))
    )
    cycles = values.reshape(NUM_EPOCHS // 150, period_steps)

    assert np.all(np.diff(cycles, axis=1) < 0)
    np.testing.assert_allclose(cycles[:, 0], LEARNING_RATE, rtol=RTOL)
    # The last step of a cycle is one step's worth of cosine above end_value = 0.
    assert np.all(cycles[:, -1] < LEARNING_RATE * 1e-4)


def test_cosine_with_end_value_matches_closed_form():
    end_value = 1e-4
    schedule = jax.jit(schedules.cosine_warm_restarts(0.01, 150, end_value=end_value))

    epochs = np.arange(NUM_EPOCHS)
    expected = (
        end_value + (0.01 - end_value) * (1 + np.cos(np.pi * (epochs % 150) / 150)) / 2
    )

    np.testing.assert_allclose(
        schedule(jnp.asarray(epochs, dtype=jnp.int32)), expected, rtol=RTOL, atol=0
    )


def test_step_schedule_matches_torch_step_lr_with_restarts():
    torch = pytest.importorskip('torch')
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    # One StepLR per 150-epoch period, each starting again from the initial lr.
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [torch.optim.lr_scheduler.StepLR(optimizer, 50, gamma=0.1) for _ in range(4)],
        milestones=[150, 300, 450],
    )
    schedule = schedules.create_schedule(_config('step'), CIFAR10_STEPS_PER_EPOCH)

    np.testing.assert_allclose(
        _at_epoch_starts(schedule, CIFAR10_STEPS_PER_EPOCH),
        _torch_per_epoch_lrs(optimizer, scheduler),
        rtol=RTOL,
        atol=0,
    )


def test_cosine_schedule_matches_torch_cosine_annealing_warm_restarts():
    torch = pytest.importorskip('torch')
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=150, eta_min=0
    )
    schedule = schedules.create_schedule(_config('cosine'), CIFAR10_STEPS_PER_EPOCH)

    np.testing.assert_allclose(
        _at_epoch_starts(schedule, CIFAR10_STEPS_PER_EPOCH),
        _torch_per_epoch_lrs(optimizer, scheduler),
        rtol=RTOL,
        atol=0,
    )


def _torch_per_epoch_lrs(optimizer, scheduler) -> list[float]:
    """Learning rate of each epoch, stepping the scheduler once per epoch."""
    lrs = []
    for _ in range(NUM_EPOCHS):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    return lrs


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        'dense': {
            'kernel': rng.normal(size=(3, 2)).astype(np.float32),
            'bias': rng.normal(size=(2,)).astype(np.float32),
        },
        'scale': rng.normal(size=()).astype(np.float32),
    }


def _grads(num_steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), _params())
        for _ in range(num_steps)
    ]


def _numpy_torch_sgd(params, grads, learning_rates, momentum, weight_decay):
    """torch.optim.SGD's update (dampening 0, no Nesterov), written out in numpy."""
    params = jax.tree.map(lambda p: p.astype(np.float64), params)
    buffers = None
    for grad, lr in zip(grads, learning_rates, strict=True):
        decayed = jax.tree.map(lambda g, p: g + weight_decay * p, grad, params)
        if buffers is None:
            buffers = decayed
        else:
            buffers = jax.tree.map(lambda b, d: momentum * b + d, buffers, decayed)
        params = jax.tree.map(lambda p, b, lr=lr: p - lr * b, params, buffers)
    return params


def _run_optax(optimizer, params, grads):
    params = jax.tree.map(jnp.asarray, params)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, grad):
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for grad in grads:
        params, opt_state = step(params, opt_state, grad)
    return params


@pytest.mark.parametrize('learning_rate', ['constant', 'step'])
def test_sgd_coupled_l2_matches_numpy_torch_sgd(learning_rate):
    num_steps, momentum, weight_decay = 6, 0.9, 0.1
    if learning_rate == 'constant':
        schedule = 0.05
        learning_rates = [0.05] * num_steps
    else:
        # Decays after steps 2 and 4, so each update must use its own step's value.
        schedule = schedules.step_decay(0.05, 0.5, decay_steps=2, restart_steps=100)
        learning_rates = [0.05 * 0.5 ** (step // 2) for step in range(num_steps)]
    grads = _grads(num_steps)

    got = _run_optax(
        optim.sgd_coupled_l2(schedule, momentum, weight_decay), _params(), grads
    )
    expected = _numpy_torch_sgd(
        _params(), grads, learning_rates, momentum, weight_decay
    )

    jax.tree.map(
        lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7),
        got,
        expected,
    )


def test_sgd_coupled_l2_matches_torch_sgd():
    torch = pytest.importorskip('torch')
    num_steps, learning_rate, momentum, weight_decay = 6, 0.05, 0.9, 0.1
    grads = _grads(num_steps)
    leaves, treedef = jax.tree.flatten(_params())
    torch_params = [
        torch.nn.Parameter(torch.from_numpy(leaf.copy())) for leaf in leaves
    ]
    torch_optimizer = torch.optim.SGD(
        torch_params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
    )
    for grad in grads:
        for param, leaf_grad in zip(torch_params, jax.tree.leaves(grad), strict=True):
            param.grad = torch.from_numpy(leaf_grad.copy())
        torch_optimizer.step()

    got = _run_optax(
        optim.sgd_coupled_l2(learning_rate, momentum, weight_decay), _params(), grads
    )
    expected = treedef.unflatten([p.detach().numpy() for p in torch_params])

    jax.tree.map(
        lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7),
        got,
        expected,
    )


def test_create_optimizer_uses_the_configured_schedule():
    steps_per_epoch, num_steps = 2, 6
    config = _config('step', schedule__decay_epochs=1, schedule__restart_epochs=2)
    grads = _grads(num_steps)
    # Epochs 0, 1, 2 of two steps each: lr, lr/10, lr (restart).
    learning_rates = [0.01, 0.01, 0.001, 0.001, 0.01, 0.01]

    got = _run_optax(optim.create_optimizer(config, steps_per_epoch), _params(), grads)
    expected = _numpy_torch_sgd(_params(), grads, learning_rates, 0.9, 1e-3)

    jax.tree.map(
        lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7),
        got,
        expected,
    )


@pytest.mark.parametrize(
    'name, overrides, field',
    [
        ('linear', {}, 'schedule.name'),
        ('constant', {'optimizer__learning_rate': -0.1}, 'optimizer.learning_rate'),
        ('step', {'schedule__decay_rate': 0.0}, 'schedule.decay_rate'),
        ('step', {'schedule__decay_rate': 1.5}, 'schedule.decay_rate'),
        ('step', {'schedule__decay_epochs': 0}, 'schedule.decay_epochs'),
        ('step', {'schedule__restart_epochs': -150}, 'schedule.restart_epochs'),
        ('cosine', {'schedule__period_epochs': 0}, 'schedule.period_epochs'),
        ('cosine', {'schedule__period_epochs': 1.5}, 'schedule.period_epochs'),
        ('cosine', {'schedule__end_value': -1e-3}, 'schedule.end_value'),
        ('cosine', {'optimizer__momentum': 1.0}, 'optimizer.momentum'),
        ('cosine', {'optimizer__momentum': -0.1}, 'optimizer.momentum'),
        ('cosine', {'optimizer__weight_decay': -1e-3}, 'optimizer.weight_decay'),
    ],
)
def test_bad_config_value_raises_one_line_error_naming_the_field(
    name, overrides, field
):
    config = _config(name, **overrides)

    with pytest.raises(ValueError, match=f'^{re.escape(field)} ') as error:
        optim.create_optimizer(config, steps_per_epoch=390)
    assert '\n' not in str(error.value)


def test_bad_steps_per_epoch_raises():
    with pytest.raises(ValueError, match='^steps_per_epoch '):
        schedules.create_schedule(_config('cosine'), steps_per_epoch=0)


def test_cycle_end_epochs():
    assert schedules.cycle_end_epochs(_config('cosine'), NUM_EPOCHS) == (
        150,
        300,
        450,
        600,
    )
    assert schedules.cycle_end_epochs(_config('cosine'), 449) == (150, 300)
    assert schedules.cycle_end_epochs(_config('constant'), NUM_EPOCHS) == ()
    assert schedules.cycle_end_epochs(_config('step'), NUM_EPOCHS) == ()
    with pytest.raises(ValueError, match='^schedule.name '):
        schedules.cycle_end_epochs(_config('linear'), NUM_EPOCHS)
