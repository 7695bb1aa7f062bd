"""A convolution whose weight gradient is a sum of matrix products, for CPUs.

On CPU, XLA computes the weight gradient of a convolution as another convolution
that contracts over the batch: it first transposes the layer's input to
channels-major order. Inside a training step that transpose is fused with the
elementwise ops that produced the input (batch norm, relu and, in a ResNet, the
residual additions of earlier blocks), which XLA then recomputes in transposed
order. For ResNet32 at batch 128 these transposes and the weight-gradient
convolutions take about 65 % of a step (see ``docs/benchmarks.md``).

`conv_general_dilated` has the signature of `jax.lax.conv_general_dilated` and
the same forward pass and input gradient, but computes the weight gradient of a
``kh x kw`` kernel as ``kh · kw`` matrix products that read the layer's input
``X`` where it lies. Output pixel ``o`` reads input pixel ``s·o + i − p`` through
kernel offset ``i`` (stride ``s``, low padding ``p``); writing ``s·o + i − p =
s·(o + d) + r`` with ``0 <= r < s``, the offset reads pixel ``o + d`` of the
sub-grid ``X_r = X[r::s]`` (``X`` itself for stride 1). So for each kernel tap
``(i, j)`` the output gradient ``dY`` is moved by ``(d_i, d_j)`` onto that
sub-grid (a zero-padding or crop of ``dY``) and

    dW[i, j] = Σ_{n, y, x} X_rc[n, y, x, :]ᵀ · dY_ij[n, y, x, :],

a product of an [N·H'·W', C_in] and an [N·H'·W', C_out] matrix.

It handles 2-D NHWC / HWIO convolutions without dilation or feature groups
(every convolution of ResNet32 and the dense ones of MobileNetV2) and hands any
other convolution to XLA unchanged.

It plugs into flax through `nn.Conv`'s ``conv_general_dilated`` field:

    conv = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)),
                   conv_general_dilated=conv.conv_general_dilated)
"""

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('xla', 'matmul')
# What a config's `model.conv_impl` may say: an implementation, or 'auto'.
CONV_IMPL_CHOICES = ('auto', *CONV_IMPLS)

# The layout flax's `nn.Conv` uses for 2-D inputs, the only one handled here.
_NHWC = ('NHWC', 'HWIO', 'NHWC')

# XLA's CPU compiler option listing the operations it hands to YNNPACK, and the
# value that leaves YNNPACK the matrix products alone (see `compiler_options`).
_YNN_FUSION_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
_YNN_DOTS_ONLY = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'


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


def resolve(conv_impl: str, backend: str | None = None) -> str:
    """The implementation ``conv_impl`` stands for on ``backend``.

    'auto' is 'matmul' on CPU, where it makes a ResNet32 training step 1.1-1.4
    times faster (``docs/benchmarks.md``), and 'xla' on accelerators.

    Args:
      conv_impl: one of `CONV_IMPL_CHOICES`.
      backend: a JAX platform name such as 'cpu' or 'gpu'; None for
        `jax.default_backend()`.

    Returns:
      One of `CONV_IMPLS`.

    Raises:
      ValueError: if ``conv_impl`` is not in `CONV_IMPL_CHOICES`.
    """
    if conv_impl in CONV_IMPLS:
        return conv_impl
    if conv_impl != 'auto':
        raise ValueError(
            f'conv_impl must be one of {CONV_IMPL_CHOICES}, got {conv_impl!r}.'
        )
    backend = backend or jax.default_backend()
    return 'matmul' if backend == 'cpu' else 'xla'


def compiler_options(
    backend: str | None = None, ynnpack_convs: bool = False
) -> dict[str, str]:
    """`jax.jit` compiler options that run a CPU's convolutions on all its cores.

    XLA's CPU compiler (jaxlib 0.10) hands some convolutions, ResNet32's 16x16
    and 8x8 ones among them, to the YNNPACK library, which runs each on one
    thread; XLA's own convolutions use every core. On two cores the 16x16x32→32
    forward convolution takes 6.1 ms through YNNPACK and 3.3 ms through XLA, and
    a ResNet32 training step's time against PyTorch's drops from 2.2 to 1.9
    times (``docs/benchmarks.md``). These options leave YNNPACK the matrix
    products only. The training and evaluation steps of `landscape_jax.train`
    and `landscape_jax.sweep` are compiled with them.

    Args:
      backend: a JAX platform name such as 'cpu' or 'gpu'; None for
        `jax.default_backend()`.
      ynnpack_convs: True keeps the compiler's own choice (for measuring it).

    Returns:
      The options for ``jax.jit(..., compiler_options=...)``; empty on
      accelerators, on a single core, with ``ynnpack_convs``, or where the
      installed jaxlib does not know the option.
    """
    backend = backend or jax.default_backend()
    if backend != 'cpu' or ynnpack_convs or _usable_cores() < 2:
        return {}
    return dict(_supported_cpu_options())


@functools.cache
def _supported_cpu_options() -> tuple[tuple[str, str], ...]:
    """The CPU options of `compiler_options`, or none if jaxlib rejects them."""
    options = {_YNN_FUSION_OPTION: _YNN_DOTS_ONLY}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(
            jax.ShapeDtypeStruct((), jnp.float32)
        ).compile()
    except RuntimeError:  # INVALID_ARGUMENT: an option or value it does not know.
        return ()
    return tuple(options.items())


def _usable_cores() -> int:
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
    phases = {}

    taps = []
    for i in range(kernel_height):
        for j in range(kernel_width):
            (row_phase, row_shift), (col_phase, col_shift) = (
                _phase_and_shift(i, strides[0], pads[0][0]),
                _phase_and_shift(j, strides[1], pads[1][0]),
            )
            if (row_phase, col_phase) not in phases:
                phases[row_phase, col_phase] = inputs[
                    :, row_phase :: strides[0], col_phase :: strides[1], :
                ]
            phase = phases[row_phase, col_phase]
            moved = lax.pad(
                output_grad,
                zero,
                (
                    (0, 0, 0),
                    (row_shift, phase.shape[1] - output_grad.shape[1] - row_shift, 0),
                    (col_shift, phase.shape[2] - output_grad.shape[2] - col_shift, 0),
                    (0, 0, 0),
                ),
            )
            # Contract batch and space: [C_in, C_out], accumulated in float32.
            tap = lax.dot_general(
                phase,
                moved,
                (((0, 1, 2), (0, 1, 2)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            taps.append(tap)
    kernel_grad = jnp.stack(taps).reshape(kernel.shape)
    return kernel_grad.astype(kernel.dtype)


def _phase_and_shift(offset: int, stride: int, pad_low: int) -> tuple[int, int]:
    """Where kernel offset ``offset`` reads the input, along one spatial axis.

    Output pixel ``o`` reads input pixel ``stride · o + offset − pad_low``, which
    is pixel ``o + shift`` of the sub-grid ``phase, phase + stride, ...``.
    """
    shift, phase = divmod(offset - pad_low, stride)
    return phase, shift
