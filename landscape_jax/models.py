"""Image classifiers for the loss-landscape experiments: CIFAR ResNets and MobileNetV2.

Both models follow their usual CIFAR adaptations, take NHWC images of any
spatial size and any number of channels (a global average pool precedes the
classifier), and return float32 logits of shape `[batch, num_classes]`.

Trainable parameters live in the `params` collection and batch-norm running
statistics in `batch_stats`. Call a model with `train=True` and
`mutable=['batch_stats']` to use and update batch statistics, or with
`train=False` to use the running averages:

    model = create_model('resnet32', num_classes=10)
    variables = model.init(rng, images, train=False)
    logits, updates = model.apply(
        variables, images, train=True, mutable=['batch_stats'])

The `dtype` field of each model sets the computation dtype (for example
`jnp.bfloat16`); parameters are always stored in float32. The `conv_impl` field
picks how convolutions are differentiated (see `landscape_jax.conv`): 'xla', or
'matmul', whose weight gradient is a sum of matrix products and makes a training
step on CPU faster; the values are the same either way.

The study trains ResNet32 and MobileNetV2. ResNet8 and ResNet20 (the same
network with one or three blocks per stage) are there for quick runs on a CPU.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from landscape_jax import conv

# CIFAR ResNets (He et al. 2016) by name: depth 6n + 2 has n blocks per stage.
RESNET_DEPTHS = {'resnet8': 8, 'resnet20': 20, 'resnet32': 32}
MODEL_NAMES = (*RESNET_DEPTHS, 'mobilenetv2')

# (channels, first-block stride) of the three stages of a CIFAR ResNet.
RESNET_STAGES = ((16, 1), (32, 2), (64, 2))

# MobileNetV2 for CIFAR: (expansion, out_channels, num_blocks, first stride).
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
MOBILENETV2_STEM_CHANNELS = 32
MOBILENETV2_HEAD_CHANNELS = 1280

# Matches PyTorch's BatchNorm2d defaults (its momentum 0.1 is flax's 0.9).
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5

# Symmetric padding of one pixel for 3x3 convolutions, as in the PyTorch
# originals. With stride 2 the output has ceil(size / 2) pixels, like the
# `x[:, ::2, ::2]` shortcut, and the kernel centres sit on the kept pixels.
_PAD_3X3 = ((1, 1), (1, 1))

# He et al.: untruncated normal with variance 2 / fan_in.
_KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
# PyTorch's default for conv and linear weights, kaiming_uniform(a=sqrt(5)),
# i.e. uniform with variance 1 / (3 fan_in); the CIFAR MobileNetV2 keeps it.
_TORCH_DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform'
)

ModuleDef = Any


def create_model(
    name: str, num_classes: int, dtype: Any = jnp.float32, conv_impl: str = 'xla'
) -> nn.Module:
    """Builds one of the models in `MODEL_NAMES`.

    Args:
        name: model name, one of `MODEL_NAMES`.
        num_classes: number of output logits.
        dtype: computation dtype, e.g. `jnp.float32` or `jnp.bfloat16`;
            parameters stay float32 either way.
        conv_impl: one of `conv.CONV_IMPLS`, how convolutions are
            differentiated.

    Returns:
        An unbound flax module whose `__call__(x, train)` maps NHWC images to
        float32 logits of shape `[batch, num_classes]`.

    Raises:
        ValueError: if `name` is not in `MODEL_NAMES` or `conv_impl` not in
            `conv.CONV_IMPLS`.
    """
    conv.select(conv_impl)  # Rejects an unknown implementation.
    if name in RESNET_DEPTHS:
        return ResNet(
            depth=RESNET_DEPTHS[name],
            num_classes=num_classes,
            dtype=dtype,
            conv_impl=conv_impl,
        )
    if name == 'mobilenetv2':
        return MobileNetV2(num_classes=num_classes, dtype=dtype, conv_impl=conv_impl)
    raise ValueError(f'model.name must be one of {MODEL_NAMES}, got {name!r}.')


def option_a_shortcut(x: jax.Array, out_channels: int, stride: int) -> jax.Array:
    """Parameter-free ResNet shortcut ("option A" of He et al. 2016).

    Subsamples the spatial axes by `stride` and zero-pads the channel axis to
    `out_channels`, half of the added channels before the existing ones and
    half after (the extra one after, if the number added is odd).

    Args:
        x: NHWC activations, shape `[batch, height, width, channels]`.
        out_channels: channels of the result, at least `channels`.
        stride: spatial subsampling factor; the result has
            `ceil(height / stride)` by `ceil(width / stride)` pixels.

    Returns:
        Array of shape `[batch, ceil(height / stride), ceil(width / stride),
        out_channels]` and the dtype of `x`.

    Raises:
        ValueError: if `out_channels` is smaller than the channels of `x`.
    """
    added = out_channels - x.shape[-1]
    if added < 0:
        raise ValueError(
            f'out_channels must be at least the input channels ({x.shape[-1]}), '
            f'got {out_channels}.'
        )
    x = x[:, ::stride, ::stride, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (added // 2, added - added // 2)))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-relu-conv3x3-BN plus shortcut, then relu.

    Attributes:
        channels: output channels of both convolutions.
        stride: stride of the first convolution; with stride 2 or a change of
            channels the shortcut is `option_a_shortcut`, otherwise identity.
        norm: batch-norm constructor taking a `name`.
        dtype: computation dtype; parameters are float32.
        conv_impl: one of `conv.CONV_IMPLS`.
    """

    channels: int
    stride: int
    norm: ModuleDef
    dtype: Any = jnp.float32
    conv_impl: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = _conv_def(self.dtype, _KAIMING_NORMAL, self.conv_impl)

        y = conv(
            self.channels, (3, 3), strides=self.stride, padding=_PAD_3X3, name='conv1'
        )(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = conv(self.channels, (3, 3), padding=_PAD_3X3, name='conv2')(y)
        y = self.norm(name='bn2')(y)

        if self.stride != 1 or x.shape[-1] != self.channels:
            x = option_a_shortcut(x, self.channels, self.stride)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016) with parameter-free option-A shortcuts.

    A 3x3 stem with 16 channels, three stages of (depth − 2) / 6 basic blocks
    with 16, 32 and 64 channels (`RESNET_STAGES`), global average pooling and a
    dense classifier. ResNet32 (the default depth) has 464,154 trainable
    parameters for 10 classes and 3 input channels, ResNet8 75,290.

    Attributes:
        num_classes: number of output logits.
        depth: 6n + 2 layers with weights, n >= 1.
        dtype: computation dtype; parameters are float32.
        conv_impl: one of `conv.CONV_IMPLS`.
    """

    num_classes: int = 10
    depth: int = 32
    dtype: Any = jnp.float32
    conv_impl: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps NHWC images `[batch, height, width, channels]` to f32 logits."""
        blocks_per_stage, remainder = divmod(self.depth - 2, 6)
        if remainder or blocks_per_stage < 1:
            raise ValueError(f'depth must be 6n + 2 with n >= 1, got {self.depth}.')
        norm = _norm_def(train, self.dtype)
        conv = _conv_def(self.dtype, _KAIMING_NORMAL, self.conv_impl)

        x = conv(16, (3, 3), padding=_PAD_3X3, name='stem_conv')(x.astype(self.dtype))
        x = nn.relu(norm(name='stem_bn')(x))

        for stage, (channels, first_stride) in enumerate(RESNET_STAGES, start=1):
            for block in range(1, blocks_per_stage + 1):
                x = BasicBlock(
                    channels=channels,
                    stride=first_stride if block == 1 else 1,
                    norm=norm,
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f'stage{stage}_block{block}',
                )(x)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=_KAIMING_NORMAL,
            name='classifier',
        )(x)
        return x.astype(jnp.float32)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 projection.

    With stride 1 the input is added back, through a 1x1 conv + BN when the
    channel count changes; with stride 2 there is no residual.

    Attributes:
        expansion: hidden channels as a multiple of the input channels.
        channels: output channels.
        stride: stride of the depthwise convolution.
        norm: batch-norm constructor taking a `name`.
        dtype: computation dtype; parameters are float32.
        conv_impl: one of `conv.CONV_IMPLS` (depthwise convolutions always use
            XLA's).
    """

    expansion: int
    channels: int
    stride: int
    norm: ModuleDef
    dtype: Any = jnp.float32
    conv_impl: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = _conv_def(self.dtype, _TORCH_DEFAULT_KERNEL_INIT, self.conv_impl)
        hidden = self.expansion * x.shape[-1]

        y = conv(hidden, (1, 1), name='expand_conv')(x)
        y = nn.relu6(self.norm(name='expand_bn')(y))
        y = conv(
            hidden,
            (3, 3),
            strides=self.stride,
            padding=_PAD_3X3,
            feature_group_count=hidden,
            name='depthwise_conv',
        )(y)
        y = nn.relu6(self.norm(name='depthwise_bn')(y))
        y = conv(self.channels, (1, 1), name='project_conv')(y)
        y = self.norm(name='project_bn')(y)

        if self.stride != 1:
            return y
        if x.shape[-1] != self.channels:
            x = conv(self.channels, (1, 1), name='shortcut_conv')(x)
            x = self.norm(name='shortcut_bn')(x)
        return x + y


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) in its common CIFAR adaptation.

    Stride-1 3x3 stem with 32 channels, the inverted-residual stages of
    `MOBILENETV2_STAGES` (strides 1, 1, 2, 2, 1, 2, 1), a 1x1 conv to 1280
    channels, global average pooling and a dense classifier. 2,296,922
    trainable parameters for 10 classes and 3 input channels.

    Attributes:
        num_classes: number of output logits.
        dtype: computation dtype; parameters are float32.
        conv_impl: one of `conv.CONV_IMPLS`.
    """

    num_classes: int = 10
    dtype: Any = jnp.float32
    conv_impl: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps NHWC images `[batch, height, width, channels]` to f32 logits."""
        norm = _norm_def(train, self.dtype)
        conv = _conv_def(self.dtype, _TORCH_DEFAULT_KERNEL_INIT, self.conv_impl)

        x = conv(MOBILENETV2_STEM_CHANNELS, (3, 3), padding=_PAD_3X3, name='stem_conv')(
            x.astype(self.dtype)
        )
        x = nn.relu6(norm(name='stem_bn')(x))

        for stage, (expansion, channels, num_blocks, first_stride) in enumerate(
            MOBILENETV2_STAGES, start=1
        ):
            for block in range(1, num_blocks + 1):
                x = InvertedResidual(
                    expansion=expansion,
                    channels=channels,
                    stride=first_stride if block == 1 else 1,
                    norm=norm,
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f'stage{stage}_block{block}',
                )(x)

        x = conv(MOBILENETV2_HEAD_CHANNELS, (1, 1), name='head_conv')(x)
        x = nn.relu6(norm(name='head_bn')(x))

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=_TORCH_DEFAULT_KERNEL_INIT,
            name='classifier',
        )(x)
        return x.astype(jnp.float32)


def _norm_def(train: bool, dtype: Any) -> ModuleDef:
    """Batch norm with PyTorch's defaults; batch statistics only in training."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=BATCH_NORM_EPSILON,
        dtype=dtype,
    )


def _conv_def(dtype: Any, kernel_init: Callable, conv_impl: str) -> ModuleDef:
    """Bias-free convolution in the computation dtype with the given init."""
    return functools.partial(
        nn.Conv,
        use_bias=False,
        dtype=dtype,
        kernel_init=kernel_init,
        conv_general_dilated=conv.select(conv_impl),
    )
