"""The anchor penalty against an independent float64 computation of its formula."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape_jax import distance


def _random_tree(rng: np.random.Generator, scale: float = 1.0):
    return {
        'conv': {'kernel': scale * rng.normal(size=(3, 3, 2, 4))},
        'bn': {
            'scale': scale * rng.normal(size=(4,)),
            'bias': scale * rng.normal(size=(4,)),
        },
        'dense': {'kernel': scale * rng.normal(size=(4, 5))},
    }


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _reference(params, anchor_list, strength, width, active):
    """The study's J_dist = s/C Σ_c exp(−‖θ−θ_c‖²/σ²) and its gradient, in float64."""
    theta = _flat(params).astype(np.float64)
    value = 0.0
    grad = np.zeros_like(theta)
    chosen = [anchor for anchor, on in zip(anchor_list, active, strict=True) if on]
    for anchor in chosen:
        theta_c = _flat(anchor).astype(np.float64)
        kernel = np.exp(-np.sum((theta - theta_c) ** 2) / width)
        value += strength / len(chosen) * kernel
        # ∂/∂θ_i = 2s/(Cσ²) (θc_i − θ_i) exp(−‖θ−θc‖²/σ²)
        grad += 2 * strength / (len(chosen) * width) * (theta_c - theta) * kernel
    return value, grad


def _stack(anchor_list):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *anchor_list)


@pytest.mark.parametrize(
    'strength, width, num_anchors',
    list(itertools.product([1.0, 10.0, 100.0], [10.0, 100.0, 1000.0], [1, 2, 3])),
)
def test_penalty_and_gradient_match_formula(strength, width, num_anchors):
    rng = np.random.default_rng(num_anchors + int(width))
    params = _random_tree(rng)
    # Anchors at distances comparable to the width, so that the kernel is neither
    # 0 nor 1 and the gradient is not negligible.
    anchor_list = [
        jax.tree.map(
            lambda p: p + rng.normal(size=p.shape) * np.sqrt(width / 200), params
        )
        for _ in range(num_anchors)
    ]
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    anchors = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _stack(anchor_list))

    value, grad = jax.jit(
        jax.value_and_grad(
            lambda p: distance.penalty(p, anchors, strength=strength, width=width)
        )
    )(params32)

    expected_value, expected_grad = _reference(
        params, anchor_list, strength, width, [True] * num_anchors
    )
    assert expected_value > 1e-3 * strength
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(
        _flat(grad), expected_grad, rtol=1e-4, atol=1e-6 * np.abs(expected_grad).max()
    )


@pytest.mark.parametrize('active', [(True, False, True), (False, True, False)])
def test_mask_selects_anchors(active):
    rng = np.random.default_rng(7)
    params = _random_tree(rng)
    anchor_list = [_random_tree(rng, scale=1.0) for _ in range(3)]
    strength, width = 3.0, 50.0

    value, grad = jax.value_and_grad(
        lambda p: distance.penalty(
            p,
            _stack(anchor_list),
            strength=strength,
            width=width,
            mask=jnp.array(active),
        )
    )(params)

    expected_value, expected_grad = _reference(
        params, anchor_list, strength, width, active
    )
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(_flat(grad), expected_grad, rtol=1e-4, atol=1e-9)


def test_no_active_anchor_gives_zero_and_zero_gradient():
    rng = np.random.default_rng(3)
    params = _random_tree(rng)
    anchors, mask = distance.empty_anchors(params, 3)

    value, grad = jax.value_and_grad(
        lambda p: distance.penalty(p, anchors, strength=100.0, width=0.1, mask=mask)
    )(params)

    assert value == 0.0
    assert not np.any(_flat(grad))


def test_squared_distances_per_slot():
    rng = np.random.default_rng(5)
    params = _random_tree(rng)
    anchor_list = [_random_tree(rng) for _ in range(4)]

    result = distance.squared_distances(params, _stack(anchor_list))

    expected = [np.sum((_flat(params) - _flat(a)) ** 2) for a in anchor_list]
    assert result.shape == (4,)
    np.testing.assert_allclose(result, expected, rtol=1e-5)


def test_add_anchor_fills_slots_in_order_and_keeps_shapes():
    rng = np.random.default_rng(11)
    first, second = _random_tree(rng), _random_tree(rng)
    anchors, mask = distance.empty_anchors(first, 2)
    shapes = jax.tree.map(jnp.shape, anchors)

    add = jax.jit(distance.add_anchor)
    anchors, mask = add(anchors, mask, first)
    anchors, mask = add(anchors, mask, second)
    full_anchors, full_mask = add(anchors, mask, _random_tree(rng))

    assert jax.tree.map(jnp.shape, anchors) == shapes
    assert add._cache_size() == 1
    np.testing.assert_array_equal(mask, [True, True])
    np.testing.assert_allclose(
        _flat(jax.tree.map(lambda a: a[0], anchors)), _flat(first), rtol=1e-6
    )
    np.testing.assert_allclose(
        _flat(jax.tree.map(lambda a: a[1], anchors)), _flat(second), rtol=1e-6
    )
    # A full buffer is left as it is.
    np.testing.assert_array_equal(full_mask, mask)
    np.testing.assert_array_equal(_flat(full_anchors), _flat(anchors))


def test_empty_anchors_has_at_least_one_slot():
    anchors, mask = distance.empty_anchors({'w': jnp.ones((2, 3))}, 0)
    assert anchors['w'].shape == (1, 2, 3)
    assert mask.shape == (1,) and not mask.any()
