"""The accelerator check: anchor overhead, epoch time, bfloat16 and sweeps, in one run.

    python experiments/device_check.py [--budget_s=420 --steps=20 --repeats=5]

Meant for a GPU (or TPU) machine; about 5 minutes, most of it compilation. Prints
one JSON line per case of ``landscape_jax.bench``:

1. ResNet32 and MobileNetV2, batch 128, 32x32x3 images, float32, with 0, 1 and 3
   anchors (``overhead_per_anchor_pct``), followed by the epoch-time ratios next
   to the study's (``study_ratio``) and ``cifar10_epoch_s``: the training steps
   of one CIFAR-10 epoch (50000 // batch size, 390 at 128) at the float32
   ``step_ms`` without anchors, to set beside the study's 55 s (ResNet32) and
   72 s (MobileNetV2);
2. the same two models with no anchor in bfloat16, and a last line per model with
   ``bfloat16_speedup`` = float32 ``step_ms`` / bfloat16 ``step_ms``;
3. a vectorized sweep of 3 ResNet32 members against the same 3 runs one after
   another (``sweep_speedup``, see ``landscape_jax.bench --members``).

Cases are skipped, with a line saying so, once ``--budget_s`` seconds have
passed. The benchmark reads no data set and writes no summaries; when
TensorFlow, tensorflow-datasets or TensorBoard are not installed, empty
stand-ins are imported in their place (the first line says which). Besides jax,
flax, optax and orbax it needs ml_collections, absl-py and tqdm; on a machine
that has all but ml_collections (a pure-Python wheel) and no network, fetch the
wheel where pip works and install it beside the others:

    python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
    # on the GPU machine:
    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 experiments/device_check.py

No compilation cache is used: each case compiles once, in the run.
"""

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from collections.abc import Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CIFAR-10's training split; an epoch drops the last partial batch.
_CIFAR10_TRAIN_EXAMPLES = 50000

# Imported by `landscape_jax.data` and `flax.metrics.tensorboard` at module level,
# used only to read data sets and write summaries.
_OPTIONAL_MODULES = (
    'tensorflow',
    'tensorflow_datasets',
    'tensorboard',
    'tensorboard.plugins',
    'tensorboard.plugins.hparams',
    'tensorboard.plugins.hparams.api',
)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the cases in order within the time budget and prints JSON lines."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    stubbed = _stub_missing_modules()
    sys.path.insert(0, _REPO_ROOT)

    import jax

    from landscape_jax import bench

    device = jax.devices()[0]
    _print(
        {
            'check': 'device_check',
            'device': getattr(device, 'device_kind', device.platform),
            'platform': device.platform,
            'jax': jax.__version__,
            'stubbed_modules': stubbed,
        }
    )

    cases = [
        (model_name, 'float32', '0,1,3') for model_name in ('resnet32', 'mobilenetv2')
    ]
    cases += [
        (model_name, 'bfloat16', '0') for model_name in ('resnet32', 'mobilenetv2')
    ]
    float32_ms = {}
    steps_per_epoch = _CIFAR10_TRAIN_EXAMPLES // args.batch_size
    for model_name, dtype, anchors in cases:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            _print(
                {
                    'skipped': model_name,
                    'dtype': dtype,
                    'reason': f'{elapsed:.0f} s > --budget_s={args.budget_s}',
                }
            )
            continue
        results = bench.run_benchmark(
            model_name,
            args.batch_size,
            [int(count) for count in anchors.split(',')],
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            dtype=dtype,
        )
        for result in results:
            result['elapsed_s'] = round(time.perf_counter() - start, 1)
            _print(result)
        if dtype == 'float32':
            _print(bench.study_ratios(results))
            float32_ms[model_name] = results[0]['step_ms']
            _print(
                {
                    'model': model_name,
                    'batch_size': args.batch_size,
                    'anchors': 0,
                    'cifar10_epoch_s': round(
                        steps_per_epoch * results[0]['step_ms'] / 1000, 2
                    ),
                }
            )
        elif model_name in float32_ms:
            _print(
                {
                    'model': model_name,
                    'batch_size': args.batch_size,
                    'anchors': 0,
                    'bfloat16_speedup': round(
                        float32_ms[model_name] / results[0]['step_ms'], 3
                    ),
                }
            )

    elapsed = time.perf_counter() - start
    if elapsed > args.budget_s:
        _print(
            {
                'skipped': 'sweep',
                'reason': f'{elapsed:.0f} s > --budget_s={args.budget_s}',
            }
        )
    else:
        sweep = bench.run_sweep_benchmark(
            'resnet32',
            args.batch_size,
            3,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
        )
        _print({**sweep, 'elapsed_s': round(time.perf_counter() - start, 1)})


def _stub_missing_modules() -> list[str]:
    """Puts empty modules in place of the optional ones that are not installed."""
    # flax.io looks for TensorFlow when imported, and a stand-in has no spec.
    import flax.io  # noqa: F401

    stubbed = []
    for name in _OPTIONAL_MODULES:
        parent = name.rpartition('.')[0]
        if parent in stubbed or importlib.util.find_spec(name) is None:
            sys.modules[name] = _StandIn(name)
            stubbed.append(name)
    return stubbed


class _StandIn(types.ModuleType):
    """An empty module whose every attribute is another stand-in.

    Enough for modules that name TensorFlow types in signatures at import time.
    """

    def __getattr__(self, name: str) -> '_StandIn':
        if name.startswith('__'):
            raise AttributeError(name)
        return _StandIn(f'{self.__name__}.{name}')


def _print(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument(
        '--budget_s',
        type=float,
        default=420.0,
        help='start no new case after this many seconds',
    )
    return parser


if __name__ == '__main__':
    main()
