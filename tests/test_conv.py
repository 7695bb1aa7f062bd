"""The matrix-product convolution matches XLA's in values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape_jax import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')
PAD_3X3 = ((1, 1), (1, 1))  # the padding of every 3x3 convolution in models.py


def _loss(conv_fn, strides, padding):
    """A scalar whose gradient weights every output differently."""

    def loss(inputs, kernel):
        outputs = conv_fn(inputs, kernel, strides, padding, dimension_numbers=NHWC)
        return jnp.sum(
            jnp.sin(outputs) * jnp.arange(outputs.size).reshape(outputs.shape)
        )

    return loss


def _random(shape, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


@pytest.mark.parametrize(
    ('input_shape', 'kernel_shape', 'stride', 'padding'),
    [
        ((2, 8, 8, 3), (3, 3, 3, 16), 1, PAD_3X3),  # a ResNet stem
        ((2, 8, 8, 16), (3, 3, 16, 16), 1, PAD_3X3),
        ((2, 8, 8, 16), (3, 3, 16, 32), 2, PAD_3X3),  # a downsampling block
        ((3, 9, 7, 5), (3, 3, 5, 6), 2, PAD_3X3),  # odd sizes: the last row cropped
        ((2, 6, 5, 4), (3, 3, 4, 2), 1, PAD_3X3),
        ((2, 8, 8, 4), (1, 1, 4, 6), 1, ((0, 0), (0, 0))),  # a 1x1 projection
        ((2, 8, 8, 4), (3, 3, 4, 6), 2, 'SAME'),
        ((2, 7, 7, 4), (3, 3, 4, 6), 1, 'VALID'),
        ((2, 8, 8, 4), (3, 3, 4, 6), 1, ((2, 0), (0, 1))),  # uneven padding
    ],
)
def test_values_and_gradients_match_xla(input_shape, kernel_shape, stride, padding):
    inputs, kernel = _random(input_shape, 0), _random(kernel_shape, 1)
    strides = (stride, stride)

    expected = jax.lax.conv_general_dilated(
        inputs, kernel, strides, padding, dimension_numbers=NHWC
    )
    actual = jax.jit(
        lambda x, w: conv.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=NHWC
        )
    )(inputs, kernel)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    expected_grads = jax.grad(
        _loss(jax.lax.conv_general_dilated, strides, padding), argnums=(0, 1)
    )(inputs, kernel)
    actual_grads = jax.jit(
        jax.grad(_loss(conv.conv_general_dilated, strides, padding), argnums=(0, 1))
    )(inputs, kernel)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads, strict=True):
        scale = float(jnp.max(jnp.abs(expected_grad)))
        np.testing.assert_allclose(
            actual_grad, expected_grad, rtol=1e-5, atol=1e-5 * scale
        )


def test_other_convolutions_are_left_to_xla():
    inputs, kernel = _random((2, 8, 8, 6), 0), _random((3, 3, 1, 6), 1)
    depthwise = conv.conv_general_dilated(
        inputs, kernel, (1, 1), PAD_3X3, dimension_numbers=NHWC, feature_group_count=6
    )
    expected = jax.lax.conv_general_dilated(
        inputs, kernel, (1, 1), PAD_3X3, dimension_numbers=NHWC, feature_group_count=6
    )
    np.testing.assert_array_equal(depthwise, expected)

    nchw = jnp.transpose(inputs, (0, 3, 1, 2))
    oihw = jnp.transpose(_random((3, 3, 6, 4), 2), (3, 2, 0, 1))
    np.testing.assert_array_equal(
        conv.conv_general_dilated(nchw, oihw, (1, 1), PAD_3X3),
        jax.lax.conv_general_dilated(nchw, oihw, (1, 1), PAD_3X3),
    )


def test_bfloat16_gradient_keeps_the_kernel_dtype():
    inputs = _random((2, 8, 8, 4), 0).astype(jnp.bfloat16)
    kernel = _random((3, 3, 4, 8), 1).astype(jnp.bfloat16)
    loss = _loss(conv.conv_general_dilated, (1, 1), PAD_3X3)
    input_grad, kernel_grad = jax.grad(loss, argnums=(0, 1))(inputs, kernel)
    assert input_grad.dtype == kernel_grad.dtype == jnp.bfloat16

    expected = jax.grad(
        _loss(jax.lax.conv_general_dilated, (1, 1), PAD_3X3), argnums=1
    )(inputs.astype(jnp.float32), kernel.astype(jnp.float32))
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(
        kernel_grad.astype(jnp.float32), expected, atol=0.02 * scale
    )


def test_plugs_into_flax_conv():
    inputs = _random((2, 8, 8, 3), 0)
    plain = nn.Conv(16, (3, 3), strides=2, padding=PAD_3X3, use_bias=False)
    matmul = nn.Conv(
        16,
        (3, 3),
        strides=2,
        padding=PAD_3X3,
        use_bias=False,
        conv_general_dilated=conv.select('matmul'),
    )
    variables = plain.init(jax.random.PRNGKey(0), inputs)
    assert jax.tree.map(jnp.shape, matmul.init(jax.random.PRNGKey(0), inputs)) == (
        jax.tree.map(jnp.shape, variables)
    )

    def kernel_grad(module):
        def loss(variables):
            return jnp.sum(jnp.square(module.apply(variables, inputs)))

        return jax.grad(loss)(variables)['params']['kernel']

    np.testing.assert_allclose(
        kernel_grad(matmul), kernel_grad(plain), rtol=1e-5, atol=1e-4
    )


def test_select():
    assert conv.select('xla') is jax.lax.conv_general_dilated
    assert conv.select('matmul') is conv.conv_general_dilated
    with pytest.raises(ValueError, match="conv_impl must be one of.*'im2col'"):
        conv.select('im2col')


def test_compiler_options_are_only_for_multi_core_cpus():
    assert conv.compiler_options('gpu') == {}
    assert conv.compiler_options('tpu') == {}
    assert conv.compiler_options('cpu', ynnpack_convs=True) == {}


@pytest.mark.skipif(
    not conv.compiler_options('cpu'),
    reason='one core, or a jaxlib without the YNNPACK option',
)
def test_compiler_options_keep_convolutions_out_of_ynnpack():
    inputs = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 32))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 32))

    def apply(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
        )

    chosen = jax.jit(apply, compiler_options=conv.compiler_options('cpu'))
    default = jax.jit(apply)
    hlo = chosen.lower(inputs, kernel).compile().as_text()

    # The convolution is XLA's own instruction, not inside a YNNPACK fusion.
    assert 'convolution(' in hlo
    assert '__ynn_fusion' not in hlo
    np.testing.assert_allclose(
        chosen(inputs, kernel), default(inputs, kernel), rtol=1e-5, atol=1e-4
    )
