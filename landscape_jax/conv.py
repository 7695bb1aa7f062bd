"""A convolution whose weight gradient is a sum of matrix products, for CPUs.

On CPU, XLA computes the weight gradient of a convolution as another convolution
that contracts over the batch: it first transposes the layer's input to
channels-major order. Inside a training step that transpose is fused with the
elementwise ops that produced the input (batch norm, relu and, in a ResNet, the
residual additions of earlier blocks), which XLA then recomputes in transposed
order. For ResNet32 at batch 128 these transposes and the weight-gradient
convolutions take about 70 % of a step (see ``docs/benchmarks.md``).

`conv_general_dilated` has the signature of `jax.lax.conv_general_dilated` and
the same forward pass and input gradient, but computes the weight gradient of a
``kh x kw`` kernel as ``kh · kw`` matrix products that read the layer's input
where it lies. For each kernel tap ``(i, j)`` the output gradient is moved onto
the input grid,

    dY_ij[n, s·h + i − p, s·w + j − p, :] = dY[n, h, w, :]   (zeros elsewhere),

a zero-padding of ``dY`` (with interior padding ``s − 1`` for stride ``s``), and

    dW[i, j] = Σ_{n, y, x} X[n, y, x, :]ᵀ · dY_ij[n, y, x, :].

It handles 2-D NHWC / HWIO convolutions without dilation or feature groups
(every convolution of ResNet32 and the dense ones of MobileNetV2) and hands any
other convolution to XLA unchanged.

It plugs into flax through `nn.Conv`'s ``conv_general_dilated`` field:

    conv = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)),
                   conv_general_dilated=conv.conv_general_dilated)
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('xla', 'matmul')

# The layout flax's `nn.Conv` uses for 2-D inputs, the only one handled here.
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` with a matrix-product weight gradient.

    Arguments are those of `jax.lax.conv_general_dilated`. A 2-D convolution in
    NHWC / HWIO layout with unit dilations, one feature group, non-negative
    padding and no ``preferred_element_type`` gets the weight gradient described
    in the module docstring; any other is computed by XLA as usual.

    Args:
      lhs: the input, f[N, H, W, C_in] for the fast path.
      rhs: the kernel, f[kh, kw, C_in, C_out] for the fast path.
      window_strides: the stride along each spatial axis.
      padding: 'SAME', 'VALID' or a (low, high) pair per spatial axis.
      lhs_dilation: input dilation; only None or ones take the fast path.
      rhs_dilation: kernel dilation; only None or ones take the fast path.
      dimension_numbers: as for `jax.lax.conv_general_dilated`.
      feature_group_count: only 1 takes the fast path.
      batch_group_count: only 1 takes the fast path.
      precision: passed on to the convolution and the matrix products.
      preferred_element_type: only None takes the fast path.

    Returns:
      The convolution's output, f[N, H_out, W_out, C_out] for the fast path.
    """
    fallback = functools.partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if lhs.ndim != 4 or rhs.ndim != 4:
        return fallback()
    if lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers
    ) != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return fallback()
    unit_dilations = all(
        dilation is None or all(d == 1 for d in dilation)
        for dilation in (lhs_dilation, rhs_dilation)
    )
    if not (
        unit_dilations
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
    ):
        return fallback()

    strides = tuple(int(stride) for stride in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(low), int(high)) for low, high in pads)
    if any(low < 0 or high < 0 for low, high in pads):
        return fallback()
    return _conv(lhs, rhs, strides, pads, precision)


def select(conv_impl: str) -> Any:
    """The ``conv_general_dilated`` function for ``conv_impl``, one of `CONV_IMPLS`.

    Args:
      conv_impl: 'xla' for `jax.lax.conv_general_dilated` itself, 'matmul' for
        `conv_general_dilated` of this module.

    Returns:
      A function with the signature of `jax.lax.conv_general_dilated`.

    Raises:
      ValueError: if ``conv_impl`` is not in `CONV_IMPLS`.
    """
    if conv_impl == 'xla':
        return lax.conv_general_dilated
    if conv_impl == 'matmul':
        return conv_general_dilated
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(
    inputs: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    precision: Any,
) -> jax.Array:
    """The NHWC / HWIO convolution; its VJP is `_conv_bwd`."""
    return _xla_conv(inputs, kernel, strides, pads, precision)


def _conv_fwd(inputs, kernel, strides, pads, precision):
    outputs = _xla_conv(inputs, kernel, strides, pads, precision)
    return outputs, (inputs, kernel)


def _conv_bwd(strides, pads, precision, residuals, output_grad):
    inputs, kernel = residuals
    # The input gradient is a transposed convolution, which XLA does well.
    (input_grad,) = jax.linear_transpose(
        lambda x: _xla_conv(x, kernel, strides, pads, precision), inputs
    )(output_grad)
    kernel_grad = _kernel_grad(inputs, output_grad, kernel, strides, pads, precision)
    return input_grad, kernel_grad


_conv.defvjp(_conv_fwd, _conv_bwd)


def _xla_conv(inputs, kernel, strides, pads, precision):
    return lax.conv_general_dilated(
        inputs, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


def _kernel_grad(inputs, output_grad, kernel, strides, pads, precision):
    """dL/dkernel: one matrix product per kernel tap (see the module docstring)."""
    kernel_height, kernel_width = kernel.shape[:2]
    zero = jnp.zeros((), output_grad.dtype)

    taps = []
    for i in range(kernel_height):
        for j in range(kernel_width):
            moved = lax.pad(
                output_grad,
                zero,
                (
                    (0, 0, 0),
                    _tap_padding(
                        inputs.shape[1], output_grad.shape[1], i, 0, strides, pads
                    ),
                    _tap_padding(
                        inputs.shape[2], output_grad.shape[2], j, 1, strides, pads
                    ),
                    (0, 0, 0),
                ),
            )
            # Contract batch and space: [C_in, C_out], accumulated in float32.
            tap = lax.dot_general(
                inputs,
                moved,
                (((0, 1, 2), (0, 1, 2)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            taps.append(tap)
    kernel_grad = jnp.stack(taps).reshape(kernel.shape)
    return kernel_grad.astype(kernel.dtype)


def _tap_padding(
    in_size: int,
    out_size: int,
    offset: int,
    axis: int,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> tuple[int, int, int]:
    """(low, high, interior) padding that puts output pixel o at s·o + offset − p.

    Negative low or high padding crops: rows of the input grid that no output
    pixel reads through this tap are dropped.
    """
    stride = strides[axis]
    low = offset - pads[axis][0]
    high = in_size - (stride * (out_size - 1) + 1) - low
    return low, high, stride - 1
