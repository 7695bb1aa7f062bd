"""Where a ResNet32 training step spends its time on the CPU, per conv implementation.

    python experiments/conv_profile.py [--parts=layers,model,trace] \
        [--conv_impls=xla,matmul] [--batch_size=128] [--repeats=5] \
        [--ynnpack_convs]

Prints JSON lines of three kinds:

* ``layers``: for each distinct 3x3 convolution of ResNet32 (input size, channels,
  stride, and how many of it the network has), the time of the forward
  convolution, its input gradient and its weight gradient, each compiled alone
  with `jax.jit`, for every implementation in ``--conv_impls``, and with
  PyTorch's eager ``conv2d`` and ``torch.nn.grad`` when torch is installed.
* ``model``: the whole ResNet32 in training mode, forward only and forward plus
  backward (cross-entropy gradient), compiled alone.
* ``trace``: one traced run of the training loop's fused step
  (`landscape_jax.bench`), its operations grouped by kind (convolutions,
  weight-gradient convolutions, matrix products, fusions that transpose a whole
  activation, other fusions) with the milliseconds per step each kind took,
  summed over XLA's threads. Only operations that run on the thread that
  starts them are seen: XLA's own CPU convolutions (those of
  `landscape_jax.conv.compiler_options`) return at once and run on Eigen's
  threads, so their time shows under no kind; use ``--ynnpack_convs`` for a
  trace that accounts for every convolution.

Times are the minimum over ``--repeats`` runs of the wall clock (the least
disturbed by other work on the machine). Everything is compiled with the
options training uses (`landscape_jax.conv.compiler_options`, printed on the
first line); ``--ynnpack_convs`` leaves XLA's CPU default instead.
"""

import argparse
import collections
import functools
import glob
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape_jax import bench, conv, models, optim, train

# ResNet32's 3x3 convolutions: (input size, in channels, out channels, stride,
# how many the network has).
RESNET32_CONVS = (
    (32, 3, 16, 1, 1),
    (32, 16, 16, 1, 10),
    (32, 16, 32, 2, 1),
    (16, 32, 32, 1, 9),
    (16, 32, 64, 2, 1),
    (8, 64, 64, 1, 9),
)
_NHWC = ('NHWC', 'HWIO', 'NHWC')
_PAD = ((1, 1), (1, 1))


def profile_layers(
    conv_impls: Sequence[str],
    batch_size: int,
    repeats: int,
    compiler_options: dict[str, str],
) -> list[dict[str, Any]]:
    """Forward, input-gradient and weight-gradient times of each conv shape."""
    results = []
    totals = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for size, in_channels, out_channels, stride, count in RESNET32_CONVS:
        inputs = jax.random.normal(
            jax.random.PRNGKey(0), (batch_size, size, size, in_channels)
        )
        kernel = jax.random.normal(
            jax.random.PRNGKey(1), (3, 3, in_channels, out_channels)
        )
        result = {
            'part': 'layers',
            'shape': f'{size}x{size}x{in_channels}->{out_channels}',
            'stride': stride,
            'count': count,
            'batch_size': batch_size,
        }
        for conv_impl in conv_impls:
            times = _layer_times(
                conv.select(conv_impl),
                inputs,
                kernel,
                stride,
                repeats,
                compiler_options,
            )
            result[conv_impl] = times
            totals[conv_impl] = [
                t + count * v for t, v in zip(totals[conv_impl], times, strict=True)
            ]
        torch_times = _torch_layer_times(inputs, kernel, stride, repeats)
        if torch_times is not None:
            result['torch'] = torch_times
            totals['torch'] = [
                t + count * v for t, v in zip(totals['torch'], torch_times, strict=True)
            ]
        results.append(result)
    results.append(
        {
            'part': 'layers',
            'shape': 'all ResNet32 3x3 convs, weighted by count',
            'batch_size': batch_size,
            **{name: [round(v, 1) for v in value] for name, value in totals.items()},
        }
    )
    return results


def profile_model(
    conv_impls: Sequence[str],
    batch_size: int,
    repeats: int,
    compiler_options: dict[str, str],
) -> list[dict[str, Any]]:
    """Forward-only and forward-plus-backward times of the whole ResNet32."""
    results = []
    images = jax.random.normal(jax.random.PRNGKey(0), (batch_size, 32, 32, 3))
    labels = jnp.arange(batch_size) % 10
    for conv_impl in conv_impls:
        model = models.create_model('resnet32', 10, conv_impl=conv_impl)
        variables = model.init(jax.random.PRNGKey(1), images[:1], train=False)

        def loss(params, variables=variables, model=model):
            logits, _ = model.apply(
                {**variables, 'params': params},
                images,
                train=True,
                mutable=['batch_stats'],
            )
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()

        forward = jax.jit(loss, compiler_options=compiler_options)
        backward = jax.jit(jax.grad(loss), compiler_options=compiler_options)
        params = variables['params']
        forward_ms = _min_ms(functools.partial(forward, params), repeats)
        backward_ms = _min_ms(functools.partial(backward, params), repeats)
        results.append(
            {
                'part': 'model',
                'conv_impl': conv_impl,
                'batch_size': batch_size,
                'forward_ms': forward_ms,
                'forward_backward_ms': backward_ms,
            }
        )
    return results


def profile_trace(
    conv_impls: Sequence[str], batch_size: int, compiler_options: dict[str, str]
) -> list[dict[str, Any]]:
    """Milliseconds per fused training step by kind of operation."""
    results = []
    for conv_impl in conv_impls:
        model = models.create_model('resnet32', 10, conv_impl=conv_impl)
        tx = optim.sgd_coupled_l2(0.01, 0.9, 1e-3)
        state = train.create_train_state(
            jax.random.PRNGKey(0), model, (32, 32, 3), tx, num_anchor_slots=1
        )
        case = bench._Case(
            state,
            train.zero_train_totals(),
            bench._step_args((32, 32, 3), 10, batch_size, seed=0),
        )
        step_fn = train.compile_train_step(compiler_options=compiler_options)
        case.run(step_fn, 2)
        hlo_text = (
            step_fn.lower(case.state, case.totals, *case.step_args).compile().as_text()
        )
        steps = 2
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir)
            case.run(step_fn, steps)
            jax.profiler.stop_trace()
            durations = _thunk_durations(trace_dir)
        kinds = _classify(hlo_text)
        by_kind = collections.Counter()
        for name, nanoseconds in durations.items():
            by_kind[kinds.get(name, 'other fusion')] += nanoseconds / steps / 1e6
        results.append(
            {
                'part': 'trace',
                'conv_impl': conv_impl,
                'batch_size': batch_size,
                'ms_per_step_by_kind': {
                    kind: round(ms, 1) for kind, ms in by_kind.most_common()
                },
                'total_thread_ms': round(sum(by_kind.values()), 1),
            }
        )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the chosen parts and prints their JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--parts', default='layers,model,trace')
    parser.add_argument('--conv_impls', default='xla,matmul')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument(
        '--ynnpack_convs',
        action='store_true',
        help="leave CPU convolutions to YNNPACK (XLA's default)",
    )
    args = parser.parse_args(argv)
    conv_impls = args.conv_impls.split(',')
    options = conv.compiler_options(ynnpack_convs=args.ynnpack_convs)
    header = {
        'device': jax.devices()[0].device_kind,
        'load_avg_1min': round(os.getloadavg()[0], 2),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'compiler_options': options,
        'cpu_affinity': sorted(os.sched_getaffinity(0)),
    }
    print(json.dumps(header), flush=True)
    for part in args.parts.split(','):
        if part == 'layers':
            results = profile_layers(conv_impls, args.batch_size, args.repeats, options)
        elif part == 'model':
            results = profile_model(conv_impls, args.batch_size, args.repeats, options)
        elif part == 'trace':
            results = profile_trace(conv_impls, args.batch_size, options)
        else:
            raise SystemExit(f'--parts: unknown part {part!r}.')
        for result in results:
            print(json.dumps(result), flush=True)


def _layer_times(
    conv_fn: Callable[..., jax.Array],
    inputs: jax.Array,
    kernel: jax.Array,
    stride: int,
    repeats: int,
    compiler_options: dict[str, str],
) -> list[float]:
    """[forward, input gradient, weight gradient] milliseconds of one conv."""

    def apply(x, w):
        return conv_fn(x, w, (stride, stride), _PAD, dimension_numbers=_NHWC)

    def input_grad(x, w, g):
        return jax.vjp(lambda x: apply(x, w), x)[1](g)

    def kernel_grad(x, w, g):
        return jax.vjp(lambda w: apply(x, w), w)[1](g)

    output_grad = jnp.cos(apply(inputs, kernel))
    forward, input_grad, kernel_grad = (
        jax.jit(fn, compiler_options=compiler_options)
        for fn in (apply, input_grad, kernel_grad)
    )
    return [
        _min_ms(lambda: forward(inputs, kernel), repeats),
        _min_ms(lambda: input_grad(inputs, kernel, output_grad), repeats),
        _min_ms(lambda: kernel_grad(inputs, kernel, output_grad), repeats),
    ]


def _torch_layer_times(
    inputs: jax.Array, kernel: jax.Array, stride: int, repeats: int
) -> list[float] | None:
    """The same three times for PyTorch's eager conv2d; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    x = torch.from_numpy(np.array(inputs)).permute(0, 3, 1, 2).contiguous()
    w = torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1).contiguous()
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
    g = torch.cos(y)
    return [
        _min_ms(
            lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=1),
            repeats,
        ),
        _min_ms(
            lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=stride, padding=1),
            repeats,
        ),
        _min_ms(
            lambda: torch.nn.grad.conv2d_weight(
                x, w.shape, g, stride=stride, padding=1
            ),
            repeats,
        ),
    ]


def _min_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time of ``fn`` in milliseconds, after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return round(1e3 * min(times), 2)


def _thunk_durations(trace_dir: str) -> collections.Counter:
    """Nanoseconds per executed XLA operation, summed over XLA's CPU threads."""
    path = sorted(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True))[-1]
    durations = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith('tf_XLAEigen'):
                continue
            for event in line.events:
                if event.name.startswith(('ThunkExecutor', 'end:', 'Threadpool')):
                    continue
                durations[event.name] += event.duration_ns
    return durations


def _classify(hlo_text: str) -> dict[str, str]:
    """Kind of each instruction of an optimized HLO module, by what it computes."""
    computation_ops = collections.defaultdict(set)
    instructions = {}
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r'^(?:ENTRY )?%([\w.\-]+) ', line)
        if header:
            computation = header.group(1)
        match = re.match(
            r'\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w-]*)\(', line
        )
        if not match:
            continue
        name, _, dims, opcode = match.groups()
        computation_ops[computation].add(opcode)
        called = re.search(r'calls=%([\w.\-]+)', line)
        instructions[name] = (dims, opcode, called.group(1) if called else None)

    kinds = {}
    for name, (dims, opcode, called) in instructions.items():
        ops = computation_ops.get(called, set()) | {opcode}
        shape = [int(d) for d in dims.split(',') if d]
        if 'convolution' in ops:
            # A weight gradient's output is the kernel, [.., 3, 3, ..] or HWIO.
            is_kernel = len(shape) == 4 and (
                shape[1:3] in ([3, 3], [1, 1]) or shape[:2] in ([3, 3], [1, 1])
            )
            kinds[name] = 'conv weight gradient' if is_kernel else 'conv'
        elif 'dot' in ops:
            kinds[name] = 'dot'
        elif 'transpose' in ops and len(shape) >= 2 and min(shape) > 3:
            kinds[name] = 'transposing fusion'
        elif 'reduce' in ops:
            kinds[name] = 'reduction'
        else:
            kinds[name] = 'other fusion'
    return kinds


if __name__ == '__main__':
    main()
