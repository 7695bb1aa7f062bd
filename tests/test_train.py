"""The pure training functions: a step learns, anchors push, nothing recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from landscape_jax import models, optim, train

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 4


def _state(learning_rate: float = 0.05, weight_decay: float = 0.0, slots: int = 2):
    model = models.create_model('resnet32', NUM_CLASSES)
    tx = optim.sgd_coupled_l2(learning_rate, momentum=0.9, weight_decay=weight_decay)
    return train.create_train_state(
        jax.random.PRNGKey(0), model, IMAGE_SHAPE, tx, num_anchor_slots=slots
    )


def _learnable_batch(size: int = 32) -> dict[str, jax.Array]:
    """Each class is a constant image of its own brightness: easy to fit."""
    labels = jnp.arange(size) % NUM_CLASSES
    noise = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (size, *IMAGE_SHAPE))
    images = labels[:, None, None, None].astype(jnp.float32) - 1.5 + noise
    return {'image': images, 'label': labels.astype(jnp.int32)}


@pytest.fixture(scope='module')
def step():
    return jax.jit(train.train_step)


def test_steps_lower_the_loss_on_a_learnable_batch(step):
    state = _state()
    batch = _learnable_batch()
    config = train.PenaltyConfig(strength=0.0, width=1.0, weight_decay=0.0)

    losses = []
    for _ in range(15):
        state, metrics = step(state, batch, config)
        losses.append(float(metrics['train_loss']))

    assert losses[-1] < 0.5 * losses[0]
    assert float(metrics['penalty']) == 0.0
    assert int(state.step) == 15


def test_anchor_pushes_parameters_away(step):
    batch = _learnable_batch()
    anchored = train.store_anchor(_state(learning_rate=0.01))
    start_params = anchored.params

    distances = {}
    for strength in (0.0, 100.0):
        config = train.PenaltyConfig(strength=strength, width=10.0, weight_decay=0.0)
        state = anchored
        for _ in range(5):
            state, metrics = step(state, batch, config)
        distances[strength] = float(train.anchor_distances(state)[0])
        moved = optax.tree.norm(jax.tree.map(jnp.subtract, state.params, start_params))
        np.testing.assert_allclose(distances[strength], moved, rtol=1e-5)

    assert distances[100.0] > 1.5 * distances[0.0]
    assert float(metrics['penalty']) > 0.0


def test_penalty_metric_matches_the_formula(step):
    state = train.store_anchor(_state())
    config = train.PenaltyConfig(strength=2.0, width=3.0, weight_decay=1e-3)
    state, _ = step(state, _learnable_batch(), config)
    _, metrics = step(state, _learnable_batch(), config)

    squared = float(train.anchor_distances(state)[0]) ** 2
    np.testing.assert_allclose(
        metrics['penalty'], 2.0 * np.exp(-squared / 3.0), rtol=1e-4
    )
    l2 = 0.5 * 1e-3 * float(optax.tree.norm(state.params, squared=True))
    np.testing.assert_allclose(metrics['l2'], l2, rtol=1e-5)
    np.testing.assert_allclose(
        metrics['objective'],
        metrics['train_loss'] + metrics['penalty'] + metrics['l2'],
        rtol=1e-6,
    )


def test_storing_anchors_does_not_recompile_the_step():
    step = jax.jit(train.train_step)
    state = _state(slots=3)
    batch = _learnable_batch(8)
    config = train.PenaltyConfig(strength=1.0, width=10.0, weight_decay=1e-3)

    state, _ = step(state, batch, config)
    # jit shares its cache between wrappers of one function: count what we add.
    compiled = step._cache_size()
    for _ in range(3):
        state = train.store_anchor(state)
        state, _ = step(state, batch, config)

    assert step._cache_size() == compiled
    assert int(jnp.sum(state.anchor_mask)) == 3


def test_eval_step_ignores_padding():
    state = _state()
    batch = _learnable_batch(8)
    mask = jnp.arange(8) < 5
    sums = jax.jit(train.eval_step)(state, dict(batch, mask=mask))

    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    logits = state.apply_fn(variables, batch['image'][:5], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'][:5])
    assert int(sums['count']) == 5
    np.testing.assert_allclose(sums['loss_sum'], jnp.sum(losses), rtol=1e-5)
    assert int(sums['correct']) == int(
        jnp.sum(jnp.argmax(logits, -1) == batch['label'][:5])
    )
