"""Times the compiled training step with 0, 1, 3, ... stored anchors.

    python -m landscape_jax.bench --model=resnet32 --batch_size=128 \
        --anchors=0,1,3 --steps=20 [--image_size=32 --channels=3 \
        --num_classes=10 --warmup=3 --repeats=5 --dtype=float32 \
        --conv_impl=xla --ynnpack_convs --study_ratio]
    python -m landscape_jax.bench --model=resnet8 --members=3

For each anchor count K the command builds a training state whose anchor buffer
holds K slots, all in use (K = 0 is what a run without anchors has: one empty
slot, masked off, so its distance is still computed and then ignored), puts
random uint8 images on the device, and times the step the training loop runs
(`train.compile_train_step`: gather, augment, normalize, `train.train_step` and
the on-device metric sums) over ``--steps`` steps after ``--warmup`` steps. The
repeats of all anchor counts are interleaved, so that a change in the machine's
load falls on every count alike; the median repeat is reported.

Each case prints one JSON line with ``model``, ``batch_size``, ``anchors``,
``step_ms`` (median over repeats), ``step_ms_min``, ``images_per_s``,
``cpu_ms`` (the host CPU time the process used per step, median; on a CPU
shared with other work it varies less than the wall time), ``penalty_ms`` (the
penalty and its gradient compiled alone, median), ``device``,
``compiler_options`` (those of `conv.compiler_options`; ``--ynnpack_convs``
leaves XLA's CPU default instead), the 1-minute load average of the host
before and after timing, and for K > 0
``overhead_per_anchor_pct`` = ``(step_ms(K) / step_ms(0) − 1) / K · 100`` and
``penalty_overhead_per_anchor_pct`` = ``(penalty_ms(K) − penalty_ms(0)) / K /
step_ms(0) · 100``: the same overhead estimated from the penalty alone, which
resolves differences far below the step-to-step noise of a shared machine.
With ``--study_ratio`` a last line gives, for each K, the epoch-time ratio
``step_ms(K) / step_ms(0)`` next to the one the 2020 PyTorch study reported.

With ``--members=M`` (M >= 2) the command instead compares a vectorized sweep
with the runs one after another: it times the sweep's step
(`sweep.compile_train_step`, M members with their own seeds, one anchor each)
and the single run's step, interleaved, and prints one line with
``sweep_step_ms``, ``sequential_step_ms`` (M times the single step) and
``sweep_speedup`` = sequential / sweep; above 1 the sweep is faster.

The study's numbers (section 4.6 and figure 4.13 of *Exploring the loss
landscape of deep neural networks*, PyTorch on the TCML cluster's GPUs): without
anchors an epoch took 55 s for ResNet32 and 72 s for MobileNetV2. For
MobileNetV2 the first anchor added about 22 s ("to a total of 92 s", the text
says; 72 + 22 is 94) and each further one about 21 s, 29-31 % of the base epoch
per anchor. For ResNet32 the first anchor added 8 s, the second 12 s and the
third 10 s (15 %, 22 % and 18 %). The penalty there was a Python loop over the
parameter tensors, one per anchor; here it is one pass over a stacked buffer
inside the compiled step.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape_jax import (
    cli,
    conv,
    data,
    distance,
    models,
    optim,
    schedules,
    sweep,
    train,
)

# Epoch time in seconds of the study (see the module docstring), by anchor count:
# (low, high) where the text gives a range. MobileNetV2's first anchor uses the
# total the text states (92 s); each further one adds "around 21 s".
STUDY_EPOCH_SECONDS = {
    'resnet32': {0: (55.0, 55.0), 1: (63.0, 63.0), 2: (75.0, 75.0), 3: (85.0, 85.0)},
    'mobilenetv2': {
        0: (72.0, 72.0),
        1: (92.0, 94.0),
        2: (113.0, 116.0),
        3: (134.0, 138.0),
    },
}

# The study's optimizer: SGD, learning rate 0.01, momentum 0.9, coupled L2 1e-3.
_LEARNING_RATE = 0.01
_MOMENTUM = 0.9
_WEIGHT_DECAY = 1e-3

# The study's penalty: strength 1, width 1000 (configs/baseline.py).
_STRENGTH = 1.0
_WIDTH = 1000.0

# Batches of random images kept on the device; the step cycles through them.
_BATCHES_ON_DEVICE = 4

# Timed calls of the penalty alone per repeat of the step (it takes far less).
_PENALTY_CALLS_PER_REPEAT = 10

# Spread of the random anchors around the parameters.
_ANCHOR_NOISE = 0.01


def run_benchmark(
    model_name: str,
    batch_size: int,
    anchor_counts: Sequence[int],
    *,
    steps: int = 20,
    warmup: int = 3,
    repeats: int = 5,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    dtype: str = 'float32',
    conv_impl: str = 'auto',
    ynnpack_convs: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Times the fused training step for each anchor count.

    Args:
      model_name: one of `models.MODEL_NAMES`.
      batch_size: images per step.
      anchor_counts: the anchor counts K to time; 0 must be among them when
        another count is, as the overhead is relative to it.
      steps: steps per timed repeat.
      warmup: untimed steps after compilation, before the first repeat.
      repeats: timed repeats per anchor count, interleaved across counts.
      image_size: height and width of the random images.
      channels: channels of the random images.
      num_classes: classes of the model and the random labels.
      dtype: the model's computation dtype, 'float32' or 'bfloat16'.
      conv_impl: one of `conv.CONV_IMPL_CHOICES`: 'xla', 'matmul' (weight
        gradients as matrix products) or 'auto' (see `conv.resolve`).
      ynnpack_convs: leave convolutions to YNNPACK, as XLA's CPU compiler
        does by default, instead of `conv.compiler_options` (no effect on
        accelerators).
      seed: seed of the parameters, anchors and data.

    Returns:
      One dict per anchor count, in the order of ``anchor_counts`` (see the
      module docstring for the keys).

    Raises:
      ValueError: if an argument is out of range.
    """
    anchor_counts = [int(count) for count in anchor_counts]
    _validate(model_name, batch_size, anchor_counts, steps, warmup, repeats, dtype)
    image_shape = (image_size, image_size, channels)
    conv_impl = conv.resolve(conv_impl)
    model = models.create_model(
        model_name, num_classes, dtype=jnp.dtype(dtype), conv_impl=conv_impl
    )
    tx = optim.sgd_coupled_l2(_LEARNING_RATE, _MOMENTUM, _WEIGHT_DECAY)
    state_rng, anchor_rng = jax.random.split(jax.random.PRNGKey(seed))
    # One initialization serves every count: only the anchor buffer differs.
    state = train.create_train_state(
        state_rng, model, image_shape, tx, num_anchor_slots=1
    )
    options = conv.compiler_options(ynnpack_convs=ynnpack_convs)
    step_fn = train.compile_train_step(compiler_options=options)
    step_args = _step_args(image_shape, num_classes, batch_size, seed)
    cases = {
        count: _Case(
            _with_anchors(state, anchor_rng, count),
            train.zero_train_totals(),
            step_args,
        )
        for count in anchor_counts
    }
    for case in cases.values():
        # The first step compiles; the warm-up steps follow it.
        case.run(step_fn, 1 + warmup)

    load_before = os.getloadavg()[0]
    times = {count: [] for count in anchor_counts}
    cpu_times = {count: [] for count in anchor_counts}
    for _ in range(repeats):
        for count in anchor_counts:
            cpu_start = time.process_time()
            times[count].append(cases[count].run(step_fn, steps) / steps)
            cpu_times[count].append((time.process_time() - cpu_start) / steps)
    load_after = os.getloadavg()[0]
    penalty_times = {
        count: _time_penalty(cases[count].state, repeats) for count in anchor_counts
    }

    results = []
    for count in anchor_counts:
        step_ms = 1e3 * statistics.median(times[count])
        result = {
            'model': model_name,
            'batch_size': batch_size,
            'anchors': count,
            'anchor_slots': max(count, 1),
            'step_ms': round(step_ms, 3),
            'step_ms_min': round(1e3 * min(times[count]), 3),
            'images_per_s': round(1e3 * batch_size / step_ms, 1),
            'cpu_ms': round(1e3 * statistics.median(cpu_times[count]), 3),
            **_run_fields(
                image_shape,
                dtype,
                conv_impl,
                options,
                steps,
                repeats,
                load_before,
                load_after,
            ),
        }
        result['penalty_ms'] = round(1e3 * penalty_times[count], 4)
        if count > 0:
            base_ms = 1e3 * statistics.median(times[0])
            result['overhead_per_anchor_pct'] = round(
                (step_ms / base_ms - 1.0) / count * 100.0, 3
            )
            extra_ms = 1e3 * (penalty_times[count] - penalty_times[0])
            result['penalty_overhead_per_anchor_pct'] = round(
                extra_ms / count / base_ms * 100.0, 4
            )
        results.append(result)
    return results


def study_ratios(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Epoch-time ratios with K anchors over none, measured and the study's.

    One epoch is a fixed number of steps, so the epoch-time ratio is the ratio of
    step times.

    Args:
      results: the output of `run_benchmark`, with anchor count 0 among them.

    Returns:
      ``{'model', 'study_ratio': {K: {'measured', 'study'}}}`` where ``study`` is
      the study's [low, high] ratio (None for a count or model it did not run).
    """
    by_count = {result['anchors']: result for result in results}
    base = by_count[0]['step_ms']
    model_name = results[0]['model']
    study = STUDY_EPOCH_SECONDS.get(model_name, {})
    ratios = {}
    for count, result in sorted(by_count.items()):
        if count == 0:
            continue
        study_ratio = None
        if count in study:
            low, high = study[count]
            study_ratio = [round(low / study[0][0], 3), round(high / study[0][1], 3)]
        ratios[str(count)] = {
            'measured': round(result['step_ms'] / base, 4),
            'study': study_ratio,
        }
    return {'model': model_name, 'study_ratio': ratios}


def run_sweep_benchmark(
    model_name: str,
    batch_size: int,
    num_members: int,
    *,
    steps: int = 20,
    warmup: int = 3,
    repeats: int = 5,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    dtype: str = 'float32',
    conv_impl: str = 'auto',
    ynnpack_convs: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Times a vectorized sweep of M members against M single-run steps.

    Both hold one anchor per member and train on the same random data; the
    members differ in their seeds. Arguments are those of `run_benchmark`, with
    ``num_members`` (M >= 2) in place of the anchor counts.

    Returns:
      A dict with ``model``, ``batch_size``, ``members``, ``sweep_step_ms`` (one
      step of all members, median over repeats), ``single_step_ms``,
      ``sequential_step_ms`` (M single steps), ``sweep_speedup``, ``device``,
      ``dtype``, ``conv_impl`` and the load average before and after timing.

    Raises:
      ValueError: if an argument is out of range.
    """
    _validate(model_name, batch_size, [0], steps, warmup, repeats, dtype)
    if num_members < 2:
        raise ValueError(f'members must be at least 2, got {num_members}.')
    image_shape = (image_size, image_size, channels)
    conv_impl = conv.resolve(conv_impl)
    model = models.create_model(
        model_name, num_classes, dtype=jnp.dtype(dtype), conv_impl=conv_impl
    )
    step_args = _step_args(image_shape, num_classes, batch_size, seed)
    train_data, order, mean, std, penalty_config = step_args

    single_state = train.create_train_state(
        jax.random.PRNGKey(seed),
        model,
        image_shape,
        optim.sgd_coupled_l2(_LEARNING_RATE, _MOMENTUM, _WEIGHT_DECAY),
        num_anchor_slots=1,
    )
    single = _Case(
        train.store_anchor(single_state), train.zero_train_totals(), step_args
    )

    members = sweep.Members(
        seeds=tuple(range(seed, seed + num_members)),
        strengths=(_STRENGTH,) * num_members,
        widths=(_WIDTH,) * num_members,
        learning_rate_scales=(1.0,) * num_members,
        weight_decays=(_WEIGHT_DECAY,) * num_members,
    )
    sweep_state = sweep.create_sweep_state(
        members,
        model,
        image_shape,
        schedules.constant(_LEARNING_RATE),
        _MOMENTUM,
        num_anchor_slots=1,
    )
    orders = jnp.stack([order] * num_members)
    sweep_totals = train.zero_train_totals((num_members,))
    swept = _Case(
        sweep.store_anchor(sweep_state),
        sweep_totals,
        (train_data, orders, mean, std, members.penalty_config()),
    )

    options = conv.compiler_options(ynnpack_convs=ynnpack_convs)
    single_fn = train.compile_train_step(compiler_options=options)
    sweep_fn = sweep.compile_train_step(compiler_options=options)
    single.run(single_fn, 1 + warmup)
    swept.run(sweep_fn, 1 + warmup)
    load_before = os.getloadavg()[0]
    single_times, sweep_times = [], []
    for _ in range(repeats):
        single_times.append(single.run(single_fn, steps) / steps)
        sweep_times.append(swept.run(sweep_fn, steps) / steps)
    load_after = os.getloadavg()[0]

    single_ms = 1e3 * statistics.median(single_times)
    sweep_ms = 1e3 * statistics.median(sweep_times)
    return {
        'model': model_name,
        'batch_size': batch_size,
        'members': num_members,
        'sweep_step_ms': round(sweep_ms, 3),
        'single_step_ms': round(single_ms, 3),
        'sequential_step_ms': round(num_members * single_ms, 3),
        'sweep_speedup': round(num_members * single_ms / sweep_ms, 3),
        **_run_fields(
            image_shape,
            dtype,
            conv_impl,
            options,
            steps,
            repeats,
            load_before,
            load_after,
        ),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the command line, runs the benchmark and prints JSON lines.

    Args:
      argv: the arguments after the program name; None for ``sys.argv[1:]``.
    """
    args = _parser().parse_args(argv)
    try:
        anchor_counts = [int(count) for count in args.anchors.split(',') if count]
    except ValueError:
        cli.exit_with_error(
            f'--anchors must be comma-separated integers, got {args.anchors!r}.'
        )
    shape_args = {
        'steps': args.steps,
        'warmup': args.warmup,
        'repeats': args.repeats,
        'image_size': args.image_size,
        'channels': args.channels,
        'num_classes': args.num_classes,
        'dtype': args.dtype,
        'conv_impl': args.conv_impl,
        'ynnpack_convs': args.ynnpack_convs,
        'seed': args.seed,
    }
    if args.members is not None:
        try:
            result = run_sweep_benchmark(
                args.model, args.batch_size, args.members, **shape_args
            )
        except ValueError as error:
            cli.exit_with_error(str(error))
        print(json.dumps(result), flush=True)
        return
    try:
        results = run_benchmark(
            args.model,
            args.batch_size,
            anchor_counts,
            **shape_args,
        )
    except ValueError as error:
        cli.exit_with_error(str(error))
    for result in results:
        print(json.dumps(result), flush=True)
    if args.study_ratio:
        print(json.dumps(study_ratios(results)), flush=True)


@dataclasses.dataclass
class _Case:
    """The state of one anchor count and the step's other arguments."""

    state: train.TrainState
    totals: dict[str, jax.Array]
    step_args: tuple[Any, ...]

    def run(self, step_fn: Any, steps: int) -> float:
        """Runs ``steps`` steps and returns the seconds until the last is done."""
        jax.block_until_ready((self.state, self.totals))
        start = time.perf_counter()
        state, totals = self.state, self.totals
        for _ in range(steps):
            state, totals, _ = step_fn(state, totals, *self.step_args)
        jax.block_until_ready((state, totals))
        elapsed = time.perf_counter() - start
        self.state, self.totals = state, totals
        return elapsed


def _time_penalty(state: train.TrainState, repeats: int) -> float:
    """Median seconds of the anchor penalty and its gradient, compiled alone."""

    def anchor_penalty(params, anchors, mask):
        return distance.penalty(
            params, anchors, strength=_STRENGTH, width=_WIDTH, mask=mask
        )

    penalty_and_grad = jax.jit(jax.value_and_grad(anchor_penalty))
    args = (state.params, state.anchors, state.anchor_mask)
    jax.block_until_ready(penalty_and_grad(*args))
    times = []
    for _ in range(repeats * _PENALTY_CALLS_PER_REPEAT):
        start = time.perf_counter()
        jax.block_until_ready(penalty_and_grad(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step_args(
    image_shape: tuple[int, int, int], num_classes: int, batch_size: int, seed: int
) -> tuple[Any, ...]:
    """Random uint8 data on the device, its batch order, statistics and penalty.

    Returns:
      The arguments of the fused step after the state and the totals:
      ``(train_data, order, mean, std, penalty_config)``.
    """
    num_examples = _BATCHES_ON_DEVICE * batch_size
    image_rng, label_rng = np.random.default_rng(seed).spawn(2)
    images = image_rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)
    labels = label_rng.integers(0, num_classes, num_examples, dtype=np.int32)
    mean, std = data.channel_stats(images)
    train_data = data.DeviceData(
        images=jax.device_put(images),
        labels=jax.device_put(labels),
        num_classes=num_classes,
    )
    order = data.epoch_permutation(jax.random.PRNGKey(seed), num_examples, batch_size)
    penalty_config = train.PenaltyConfig(
        strength=_STRENGTH, width=_WIDTH, weight_decay=_WEIGHT_DECAY
    )
    return train_data, order, mean, std, penalty_config


def _with_anchors(
    state: train.TrainState, rng: jax.Array, count: int
) -> train.TrainState:
    """``state`` with ``count`` anchor slots, all in use; one empty slot for 0.

    The anchors are the parameters plus small Gaussian noise, so that the penalty
    and its gradient are neither 0 nor 1 (the time does not depend on them).
    """
    # A copy for each count: the step donates the state it is given.
    state = jax.tree.map(jnp.copy, state)
    if count == 0:
        anchors, mask = distance.empty_anchors(state.params, 0)
        return state.replace(anchors=anchors, anchor_mask=mask)
    leaves, treedef = jax.tree.flatten(state.params)
    rngs = jax.random.split(rng, len(leaves))
    anchors = [
        leaf[None] + _ANCHOR_NOISE * jax.random.normal(key, (count, *leaf.shape))
        for leaf, key in zip(leaves, rngs, strict=True)
    ]
    return state.replace(
        anchors=jax.tree.unflatten(treedef, anchors),
        anchor_mask=jnp.ones((count,), bool),
    )


def _run_fields(
    image_shape: tuple[int, int, int],
    dtype: str,
    conv_impl: str,
    compiler_options: dict[str, str],
    steps: int,
    repeats: int,
    load_before: float,
    load_after: float,
) -> dict[str, Any]:
    """The keys every result line has about the device and how it was timed."""
    device = jax.devices()[0]
    return {
        'device': getattr(device, 'device_kind', None) or device.platform,
        'platform': device.platform,
        'image_shape': list(image_shape),
        'dtype': dtype,
        'conv_impl': conv_impl,
        'compiler_options': compiler_options,
        'steps': steps,
        'repeats': repeats,
        'load_avg_1min': [round(load_before, 2), round(load_after, 2)],
    }


def _validate(
    model_name: str,
    batch_size: int,
    anchor_counts: list[int],
    steps: int,
    warmup: int,
    repeats: int,
    dtype: str,
) -> None:
    if model_name not in models.MODEL_NAMES:
        raise ValueError(
            f'model must be one of {models.MODEL_NAMES}, got {model_name!r}.'
        )
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}.')
    if not anchor_counts or min(anchor_counts) < 0:
        raise ValueError(
            f'anchors must be non-empty and non-negative, got {anchor_counts}.'
        )
    if len(set(anchor_counts)) != len(anchor_counts):
        raise ValueError(f'anchors must be distinct, got {anchor_counts}.')
    if max(anchor_counts) > 0 and 0 not in anchor_counts:
        raise ValueError(
            f'anchors must include 0, the baseline of the overhead, got '
            f'{anchor_counts}.'
        )
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ValueError(
            f'steps and repeats must be at least 1 and warmup at least 0, got '
            f'steps={steps}, warmup={warmup}, repeats={repeats}.'
        )
    if dtype not in ('float32', 'bfloat16'):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m landscape_jax.bench',
        description='Times the compiled training step for several anchor counts.',
    )
    parser.add_argument('--model', default='resnet32', choices=models.MODEL_NAMES)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument(
        '--anchors', default='0,1,3', help='comma-separated anchor counts'
    )
    parser.add_argument('--steps', type=int, default=20, help='steps per repeat')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--image_size', type=int, default=32)
    parser.add_argument('--channels', type=int, default=3)
    parser.add_argument('--num_classes', type=int, default=10)
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    parser.add_argument('--conv_impl', default='auto', choices=conv.CONV_IMPL_CHOICES)
    parser.add_argument(
        '--ynnpack_convs',
        action='store_true',
        help="leave CPU convolutions to YNNPACK (XLA's default) to measure it",
    )
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--members',
        type=int,
        default=None,
        help='time a vectorized sweep of this many members against sequential runs',
    )
    parser.add_argument(
        '--study_ratio',
        action='store_true',
        help="print a last line comparing epoch-time ratios with the study's",
    )
    return parser


if __name__ == '__main__':
    main()
