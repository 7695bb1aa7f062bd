"""Tests for landscape_jax.models: parameter counts, shapes, batch norm, dtypes.

XLA compilation dominates the run time on CPU, so each model is initialised
once (on 8x8 images, under one `jax.jit`) and each way of calling it is
compiled once; shapes that need other variables are checked abstractly.
"""

import dataclasses
import functools
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape_jax import models

# Sizes for 10 classes and 3 input channels: the published ones of ResNet32 and
# MobileNetV2; ResNet8 and ResNet20 from the by-hand tally below.
EXPECTED_PARAMS = {
    'resnet8': 75_290,
    'resnet20': 269_722,
    'resnet32': 464_154,
    'mobilenetv2': 2_296_922,
}
# The models the study trains, compiled and run below; the others are traced.
STUDY_MODELS = ('resnet32', 'mobilenetv2')


@dataclasses.dataclass(frozen=True)
class Initialised:
    """A 10-class model for RGB images, its variables and its jitted calls."""

    model: nn.Module
    variables: dict
    evaluate: Callable  # (variables, images) -> logits, running averages.
    train: Callable  # (variables, images) -> (logits, {'batch_stats': ...}).


@pytest.fixture(scope='module', params=STUDY_MODELS)
def initialised(request) -> Initialised:
    model = models.create_model(request.param, num_classes=10)
    # The 'rbg' generator compiles several times faster on CPU than threefry.
    rng = jax.random.key(0, impl='rbg')
    variables = jax.jit(functools.partial(model.init, train=False))(
        rng, _images((2, 8, 8, 3))
    )
    return Initialised(
        model=model,
        variables=variables,
        evaluate=jax.jit(functools.partial(model.apply, train=False)),
        train=jax.jit(
            functools.partial(model.apply, train=True, mutable=['batch_stats'])
        ),
    )


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_parameter_count_excludes_batch_stats(name):
    variables = _abstract_variables(models.create_model(name, 10), (1, 32, 32, 3))
    params = variables['params']
    batch_norm_params = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree.leaves_with_path(params)
        if 'bn' in path[-2].key
    }

    assert set(variables) == {'params', 'batch_stats'}
    assert _count(params) == EXPECTED_PARAMS[name]
    # One running mean and variance per batch-norm scale and bias, none in params.
    assert _count(variables['batch_stats']) == _count(batch_norm_params) > 0
    assert not any(key.endswith(("['mean']", "['var']")) for key in _paths(params))
    assert all(
        key.endswith(("['mean']", "['var']"))
        for key in _paths(variables['batch_stats'])
    )


@pytest.mark.parametrize(
    'depth, name', [(8, 'resnet8'), (20, 'resnet20'), (32, 'resnet32')]
)
def test_resnet_parameter_count_by_hand(depth, name):
    # Independent tally: stem, 3 stages of (depth - 2) / 6 basic blocks,
    # classifier; BN has scale + bias.
    def conv_bn(c_in, c_out):
        return 9 * c_in * c_out + 2 * c_out

    expected = conv_bn(3, 16) + (64 * 10 + 10)
    c_in = 16
    for channels in (16, 32, 64):
        for _ in range((depth - 2) // 6):
            expected += conv_bn(c_in, channels) + conv_bn(channels, channels)
            c_in = channels
    variables = _abstract_variables(models.ResNet(depth=depth), (1, 32, 32, 3))

    assert _count(variables['params']) == expected == EXPECTED_PARAMS[name]


@pytest.mark.parametrize('depth', [0, 7, 9])
def test_resnet_rejects_depth_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match=f'depth must be 6n \\+ 2.*got {depth}'):
        _abstract_variables(models.ResNet(depth=depth), (1, 8, 8, 3))


def test_kernel_init_scale(initialised):
    # ResNet32: Kaiming normal, variance 2 / fan_in, not truncated at 2 std.
    # MobileNetV2: PyTorch's default, uniform with variance 1 / (3 fan_in).
    params = initialised.variables['params']
    if isinstance(initialised.model, models.ResNet):
        kernel = params['stage3_block2']['conv1']['kernel']
        fan_in, std = 3 * 3 * 64, np.sqrt(2 / 576)
        largest = (3 * std, 6 * std)
    else:
        kernel = params['head_conv']['kernel']
        fan_in, std = 320, np.sqrt(1 / 960)
        largest = (1.7 * std, np.sqrt(3) * std)

    assert np.prod(kernel.shape[:-1]) == fan_in
    np.testing.assert_allclose(np.std(kernel), std, rtol=0.05)
    assert largest[0] < np.abs(kernel).max() <= largest[1]


@pytest.mark.parametrize('shape', [(2, 32, 32, 3), (2, 7, 7, 3)])
def test_output_shape_and_dtype(initialised, shape):
    logits = initialised.evaluate(initialised.variables, _images(shape))

    assert logits.shape == (shape[0], 10)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize('name', models.MODEL_NAMES)
@pytest.mark.parametrize(
    'shape, num_classes',
    [((2, 32, 32, 3), 100), ((2, 28, 28, 1), 10), ((2, 7, 7, 1), 100)],
)
def test_output_shape_and_dtype_abstractly(name, shape, num_classes):
    # Other channel counts and classes need other variables; tracing the
    # model checks every shape without paying for another compilation.
    model = models.create_model(name, num_classes)

    logits, _ = jax.eval_shape(
        functools.partial(model.init_with_output, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )

    assert logits.shape == (shape[0], num_classes)
    assert logits.dtype == jnp.float32


def test_train_mode_updates_batch_stats(initialised):
    variables = initialised.variables

    logits, updates = initialised.train(variables, _images((2, 8, 8, 3), seed=1))

    assert logits.shape == (2, 10)
    assert jax.tree.structure(updates) == jax.tree.structure(
        {'batch_stats': variables['batch_stats']}
    )
    # Every running variance moves. Some running means legitimately stay at 0:
    # a 1x1 conv applied right after a training-mode BN sees zero-mean inputs.
    old = jax.tree.leaves_with_path(variables['batch_stats'])
    new = jax.tree.leaves(updates['batch_stats'])
    for (path, before), after in zip(old, new, strict=True):
        if path[-1].key == 'var':
            assert not np.allclose(before, after), jax.tree_util.keystr(path)


def test_train_mode_needs_mutable_batch_stats(initialised):
    with pytest.raises(flax.errors.ModifyScopeVariableError, match='batch_stats'):
        initialised.model.apply(
            initialised.variables, _images((2, 8, 8, 3)), train=True
        )


def test_stem_batch_norm_uses_pytorch_momentum(initialised):
    # Running stats start at mean 0, var 1; one step moves them 10 % of the way
    # to the batch statistics of the stem convolution, computed here by hand.
    variables = initialised.variables
    images = _images((2, 8, 8, 3), seed=2)

    _, updates = initialised.train(variables, images)

    stem = jax.lax.conv_general_dilated(
        images,
        variables['params']['stem_conv']['kernel'],
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    stats = updates['batch_stats']['stem_bn']
    np.testing.assert_allclose(
        stats['mean'], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        stats['var'], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )


def test_eval_mode_uses_running_averages(initialised):
    # Changing one example moves the other's logits only through batch stats.
    variables = initialised.variables
    images = _images((2, 8, 8, 3), seed=3)
    changed = images.at[1].multiply(-3.0)

    eval_logits = initialised.evaluate(variables, images)
    eval_changed = initialised.evaluate(variables, changed)
    train_logits, updates = initialised.train(variables, images)
    train_changed, _ = initialised.train(variables, changed)
    eval_updated = initialised.evaluate({**variables, **updates}, images)

    np.testing.assert_allclose(eval_changed[0], eval_logits[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(train_changed[0], train_logits[0], atol=1e-4)
    assert not np.allclose(eval_updated, eval_logits, atol=1e-4)


def test_option_a_shortcut_subsamples_and_pads_both_sides():
    x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 5, 3) + 1.0

    out = models.option_a_shortcut(x, out_channels=7, stride=2)

    assert out.shape == (2, 3, 3, 7)
    np.testing.assert_array_equal(out[..., :2], 0.0)
    np.testing.assert_array_equal(out[..., 5:], 0.0)
    for i, row in enumerate((0, 2, 4)):
        for j, col in enumerate((0, 2, 4)):
            np.testing.assert_array_equal(out[:, i, j, 2:5], x[:, row, col, :])


def test_option_a_shortcut_odd_padding_and_resnet_widths():
    x = jnp.ones((1, 8, 8, 16))

    doubled = models.option_a_shortcut(x, out_channels=32, stride=2)
    odd = models.option_a_shortcut(jnp.ones((1, 2, 2, 3)), out_channels=6, stride=1)

    # 16 -> 32 channels: 8 zero channels on each side, as in the CIFAR ResNet.
    assert doubled.shape == (1, 4, 4, 32)
    np.testing.assert_array_equal(doubled[0, 0, 0], [0] * 8 + [1] * 16 + [0] * 8)
    np.testing.assert_array_equal(odd[0, 0, 0], [0, 1, 1, 1, 0, 0])


def test_option_a_shortcut_rejects_fewer_channels():
    with pytest.raises(ValueError, match='out_channels'):
        models.option_a_shortcut(jnp.ones((1, 4, 4, 8)), out_channels=4, stride=1)


def test_create_model_builds_each_name():
    resnet = models.create_model('resnet32', 100, dtype=jnp.bfloat16)
    mobilenet = models.create_model('mobilenetv2', 10)

    assert isinstance(resnet, models.ResNet)
    assert (resnet.num_classes, resnet.depth, resnet.dtype) == (100, 32, jnp.bfloat16)
    assert resnet.conv_impl == 'xla'
    assert isinstance(mobilenet, models.MobileNetV2)
    assert (mobilenet.num_classes, mobilenet.dtype) == (10, jnp.float32)


def test_create_model_passes_conv_impl():
    resnet = models.create_model('resnet8', 10, conv_impl='matmul')
    mobilenet = models.create_model('mobilenetv2', 10, conv_impl='matmul')

    assert resnet.depth == 8
    assert resnet.conv_impl == mobilenet.conv_impl == 'matmul'
    with pytest.raises(ValueError, match="conv_impl must be one of.*'cudnn'"):
        models.create_model('resnet8', 10, conv_impl='cudnn')


def test_matmul_convolutions_give_the_same_loss_and_gradients():
    # The whole model in training mode, batch norm and shortcuts included.
    images, labels = _images((4, 8, 8, 3)), jnp.arange(4) % 10
    grads = {}
    for conv_impl in ('xla', 'matmul'):
        model = models.create_model('resnet8', 10, conv_impl=conv_impl)
        variables = model.init(jax.random.key(0), images, train=False)

        def loss(params, model=model, variables=variables):
            logits, _ = model.apply(
                {**variables, 'params': params},
                images,
                train=True,
                mutable=['batch_stats'],
            )
            log_probs = jax.nn.log_softmax(logits)
            return -jnp.mean(log_probs[jnp.arange(4), labels])

        grads[conv_impl] = jax.jit(jax.value_and_grad(loss))(variables['params'])

    (loss_xla, grad_xla), (loss_matmul, grad_matmul) = grads.values()
    np.testing.assert_allclose(loss_matmul, loss_xla, rtol=1e-5)
    for got, want in zip(
        jax.tree.leaves(grad_matmul), jax.tree.leaves(grad_xla), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_create_model_rejects_unknown_name():
    with pytest.raises(ValueError) as error:
        models.create_model('vgg16', 10)

    message = str(error.value)
    assert 'model.name' in message
    assert 'vgg16' in message
    assert all(name in message for name in models.MODEL_NAMES)


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_bfloat16_computes_in_bfloat16_with_float32_params(name):
    # Dtypes are fixed when tracing, so abstract evaluation checks them all.
    model = models.create_model(name, 10, dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)

    variables = _abstract_variables(model, images.shape)
    logits, state = jax.eval_shape(
        functools.partial(
            model.apply,
            train=True,
            mutable=['batch_stats', 'intermediates'],
            capture_intermediates=True,
        ),
        variables,
        images,
    )

    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    for leaf in jax.tree.leaves(state['batch_stats']):
        assert leaf.dtype == jnp.float32
    assert state['intermediates']['stem_conv']['__call__'][0].dtype == jnp.bfloat16
    assert state['intermediates']['classifier']['__call__'][0].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(tree)]


def _abstract_variables(model: nn.Module, shape: tuple[int, ...]):
    """Variable shapes and dtypes, traced without running the initialisers."""
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )


def _images(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape)
