"""Compares our ResNet32 step with the study's PyTorch step on this CPU.

    python experiments/cpu_ratio.py [--batch_size=128 --anchors=0,3 --steps=3 \
        --repeats=3 --conv_impls=xla,matmul --ynnpack_convs --one_core]

Runs ``python -m landscape_jax.bench`` once per convolution implementation and
``experiments/torch_reference.py`` once, each in its own process (one after the
other, so that their thread pools do not compete), prints every JSON line they
print, and then one JSON line per implementation and anchor count with
``ratio`` = jax ``step_ms`` / torch ``step_ms`` and ``cpu_ratio``, the same for
the CPU time per step. Below 1 our step is the faster. ``--ynnpack_convs`` is
handed on to the bench (XLA's default CPU convolutions instead of those of
`landscape_jax.conv.compiler_options`).

With ``--one_core`` every process is pinned to CPU 0 and runs one compute
thread (XLA's ``intra_op_parallelism_threads=1``, ``torch.set_num_threads(1)``):
on a machine shared with other work this is the steadier comparison. Otherwise
both use every core. Run it from the repository root; it needs torch.
"""

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ONE_THREAD_XLA_FLAGS = (
    '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs both benchmarks and prints their lines and the ratios."""
    args = _parser().parse_args(argv)
    common = [
        f'--batch_size={args.batch_size}',
        f'--anchors={args.anchors}',
        f'--steps={args.steps}',
        f'--repeats={args.repeats}',
    ]
    jax_results = {}
    for conv_impl in args.conv_impls.split(','):
        command = [sys.executable, '-m', 'landscape_jax.bench', *common]
        command += [f'--conv_impl={conv_impl}', f'--warmup={args.warmup}']
        if args.ynnpack_convs:
            command.append('--ynnpack_convs')
        jax_results[conv_impl] = _run(command, args.one_core)

    threads = 1 if args.one_core else os.cpu_count()
    torch_command = [
        sys.executable,
        os.path.join(_REPO_ROOT, 'experiments', 'torch_reference.py'),
        *common,
        f'--warmup={args.warmup}',
        f'--threads={threads}',
    ]
    torch_results = {
        result['anchors']: result for result in _run(torch_command, args.one_core)
    }

    for conv_impl, results in jax_results.items():
        for result in results:
            reference = torch_results.get(result['anchors'])
            if reference is None:
                continue
            ratio = {
                'comparison': 'jax_step_ms / torch_step_ms',
                'model': 'resnet32',
                'batch_size': args.batch_size,
                'anchors': result['anchors'],
                'conv_impl': conv_impl,
                'ynnpack_convs': args.ynnpack_convs,
                'one_core': args.one_core,
                'jax_step_ms': result['step_ms'],
                'torch_step_ms': reference['step_ms'],
                'ratio': round(result['step_ms'] / reference['step_ms'], 3),
                'cpu_ratio': round(result['cpu_ms'] / reference['cpu_ms'], 3),
            }
            print(json.dumps(ratio), flush=True)


def _run(command: list[str], one_core: bool) -> list[dict[str, Any]]:
    """Runs a benchmark command; echoes and returns its JSON lines."""
    env = dict(os.environ)
    preexec_fn = None
    if one_core:
        env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {_ONE_THREAD_XLA_FLAGS}'
        env['OMP_NUM_THREADS'] = '1'

        def preexec_fn() -> None:
            os.sched_setaffinity(0, {0})

    completed = subprocess.run(
        command,
        cwd=_REPO_ROOT,
        env=env,
        preexec_fn=preexec_fn,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f'{" ".join(command)} failed ({completed.returncode}).')
    results = []
    for line in completed.stdout.splitlines():
        if line.startswith('{'):
            print(line, flush=True)
            results.append(json.loads(line))
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--anchors', default='0,3')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--conv_impls', default='xla,matmul')
    parser.add_argument(
        '--ynnpack_convs',
        action='store_true',
        help="leave CPU convolutions to YNNPACK (XLA's default) in the bench",
    )
    parser.add_argument(
        '--one_core',
        action='store_true',
        help='pin every process to CPU 0 with one compute thread',
    )
    return parser


if __name__ == '__main__':
    main()
