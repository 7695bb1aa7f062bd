"""Landscape probes on a tiny conv net: distances, paths, recomputed statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from landscape_jax import probes

NUM_CLASSES = 3
IMAGE_SHAPE = (8, 8, 1)


class TinyNet(nn.Module):
    """Conv, BatchNorm, relu, global pool, dense: BatchNorm behind a cheap model."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(4, (3, 3), use_bias=False, name='conv')(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn')(x)
        x = nn.relu(x)
        return nn.Dense(NUM_CLASSES, name='classifier')(jnp.mean(x, axis=(1, 2)))


def _examples(seed: int, num_examples: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    labels = np.arange(num_examples) % NUM_CLASSES
    images = rng.normal(size=(num_examples, *IMAGE_SHAPE)) + labels[:, None, None, None]
    return {
        'image': jnp.asarray(images, jnp.float32),
        'label': jnp.asarray(labels, jnp.int32),
    }


def _variables(seed: int):
    """Random parameters with made-up (not recomputed) stored statistics."""
    model = TinyNet()
    variables = model.init(
        jax.random.PRNGKey(seed), jnp.zeros((1, *IMAGE_SHAPE)), train=False
    )
    stats_rng = np.random.default_rng(seed)
    variables['batch_stats'] = {
        'bn': {
            'mean': jnp.asarray(stats_rng.normal(size=4), jnp.float32),
            'var': jnp.asarray(stats_rng.uniform(0.5, 2.0, size=4), jnp.float32),
        }
    }
    return variables


def _loss(variables, examples) -> float:
    logits = TinyNet().apply(variables, examples['image'], train=False)
    return float(
        optax.softmax_cross_entropy_with_integer_labels(
            logits, examples['label']
        ).mean()
    )


@pytest.fixture(scope='module')
def setup():
    return {
        'a': _variables(1),
        'b': _variables(2),
        'c': _variables(3),
        'eval': _examples(0, 24),
        'train': _examples(1, 32),
    }


def test_distance_matrix_matches_numpy():
    rng = np.random.default_rng(0)
    trees = [
        {'w': rng.normal(size=(3, 4)), 'b': {'x': rng.normal(size=5)}} for _ in range(4)
    ]
    matrix = np.asarray(probes.distance_matrix(trees))

    flat = [np.concatenate([t['b']['x'], t['w'].ravel()]) for t in trees]
    expected = np.array([[np.linalg.norm(p - q) for q in flat] for p in flat])
    np.testing.assert_allclose(matrix, expected, rtol=1e-5)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), 0.0)
    with pytest.raises(ValueError, match=r'params_list\[1\]'):
        probes.distance_matrix([trees[0], {'w': trees[1]['w']}])


def test_interpolate_is_exact_at_the_endpoints_and_linear_between():
    a = {'w': jnp.array([1.0, -2.0, 0.3])}
    b = {'w': jnp.array([3.0, 5.0, -0.7])}
    np.testing.assert_array_equal(probes.interpolate(a, b, 0.0)['w'], a['w'])
    np.testing.assert_array_equal(probes.interpolate(a, b, 1.0)['w'], b['w'])
    np.testing.assert_allclose(
        probes.interpolate(a, b, 0.25)['w'], [1.5, -0.25, 0.05], rtol=1e-6
    )
    midpoint = jax.jit(probes.interpolate)(a, b, 0.5)
    np.testing.assert_allclose(midpoint['w'], [2.0, 1.5, -0.2], rtol=1e-6)


def test_recomputed_statistics_are_the_mean_of_per_batch_statistics(setup):
    variables, images = setup['a'], setup['train']['image']
    stats = probes.recompute_batch_stats(TinyNet(), variables, images, batch_size=16)

    # The BatchNorm input is the first conv's output; its statistics per batch.
    features = nn.Conv(4, (3, 3), use_bias=False).apply(
        {'params': variables['params']['conv']}, images
    )
    batches = np.asarray(features).reshape(2, 16 * 8 * 8, 4)
    np.testing.assert_allclose(
        stats['bn']['mean'], batches.mean(axis=1).mean(axis=0), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        stats['bn']['var'], batches.var(axis=1).mean(axis=0), rtol=1e-4, atol=1e-6
    )
    with pytest.raises(ValueError, match='batch_size'):
        probes.recompute_batch_stats(TinyNet(), variables, images, batch_size=64)


def test_linear_path_reproduces_the_endpoint_losses(setup):
    a, b = setup['a'], setup['b']
    path = probes.linear_path(
        TinyNet(),
        a,
        b,
        [0.0, 0.5, 1.0],
        setup['eval'],
        setup['train'],
        bn_batch_size=16,
    )

    assert path['loss'][0] == pytest.approx(_loss(a, setup['eval']), rel=1e-6)
    assert path['loss'][2] == pytest.approx(_loss(b, setup['eval']), rel=1e-6)

    # The midpoint uses statistics recomputed on the training images.
    midpoint = {
        'params': probes.interpolate(a['params'], b['params'], 0.5),
        'batch_stats': a['batch_stats'],
    }
    midpoint['batch_stats'] = probes.recompute_batch_stats(
        TinyNet(), midpoint, setup['train']['image'], batch_size=16
    )
    assert path['loss'][1] == pytest.approx(_loss(midpoint, setup['eval']), rel=1e-5)
    chord = 0.5 * (path['loss'][0] + path['loss'][2])
    assert path['barrier'] == pytest.approx(max(path['loss'][1] - chord, 0.0))
    assert 0.0 <= path['accuracy'].min() <= path['accuracy'].max() <= 1.0


def test_linear_path_without_endpoint_stats_recomputes_them(setup):
    a, b = setup['a'], setup['b']
    path = probes.linear_path(
        TinyNet(),
        a,
        b,
        [1.0, 0.0],
        setup['eval'],
        setup['train'],
        bn_batch_size=16,
        endpoint_stats=False,
    )

    recomputed = dict(a)
    recomputed['batch_stats'] = probes.recompute_batch_stats(
        TinyNet(), a, setup['train']['image'], batch_size=16
    )
    assert path['loss'][1] == pytest.approx(_loss(recomputed, setup['eval']), rel=1e-5)
    assert path['loss'][1] != pytest.approx(_loss(a, setup['eval']), rel=1e-3)
    with pytest.raises(ValueError, match='alphas must include 0 and 1'):
        probes.linear_path(TinyNet(), a, b, [0.0, 0.5], setup['eval'], setup['train'])


def test_filter_normalize_matches_weight_norms_per_filter():
    rng = np.random.default_rng(0)
    weights = {
        'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
        'bias': jnp.asarray(rng.normal(size=4), jnp.float32),
    }
    direction = {
        'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
        'bias': jnp.zeros(4, jnp.float32),
    }
    direction['kernel'] = direction['kernel'].at[..., 2].set(0.0)
    normalized = probes.filter_normalize(direction, weights)

    kernel = np.asarray(normalized['kernel'])
    norms = np.linalg.norm(kernel.reshape(-1, 4), axis=0)
    weight_norms = np.linalg.norm(np.asarray(weights['kernel']).reshape(-1, 4), axis=0)
    np.testing.assert_allclose(norms[[0, 1, 3]], weight_norms[[0, 1, 3]], rtol=1e-5)
    assert norms[2] == 0.0  # A zero filter stays zero.
    # Each filter keeps its direction.
    cosine = np.sum(kernel[..., 0] * np.asarray(direction['kernel'])[..., 0])
    assert cosine > 0
    np.testing.assert_array_equal(normalized['bias'], 0.0)


def test_plane_through_three_snapshots(setup):
    variables_list = [setup['a'], setup['b'], setup['c']]
    result = probes.plane(
        TinyNet(),
        variables_list,
        [0.0, 1.0],
        [0.0, 1.0],
        setup['eval'],
        setup['train'],
        filter_normalized=False,
        bn_batch_size=16,
    )

    assert result['loss'].shape == result['accuracy'].shape == (2, 2)
    np.testing.assert_allclose(
        result['snapshot_coordinates'], [[0, 0], [1, 0], [0, 1]], atol=1e-5
    )
    np.testing.assert_allclose(result['snapshot_residuals'], 0.0, atol=1e-4)
    # Grid point (x=1, y=0) is the second snapshot with recomputed statistics.
    second = dict(setup['b'])
    second['batch_stats'] = probes.recompute_batch_stats(
        TinyNet(), second, setup['train']['image'], batch_size=16
    )
    assert result['loss'][0, 1] == pytest.approx(_loss(second, setup['eval']), rel=1e-4)

    normalized = probes.plane(
        TinyNet(),
        variables_list,
        [0.0],
        [0.0, 0.5],
        setup['eval'],
        setup['train'],
        bn_batch_size=16,
    )
    assert normalized['loss'].shape == (2, 1)
    assert np.all(np.isfinite(normalized['loss']))
    np.testing.assert_allclose(normalized['loss'][0, 0], result['loss'][0, 0])
