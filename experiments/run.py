"""Runs one experiment of the 2020 study, at its own scale or scaled down.

    python experiments/run.py --experiment=strength --root=runs [--seeds=3] \
        [--scale=full --model=mobilenetv2] \
        [--scale=small --data_dir=DIR --epochs=12] [--vectorize=auto]

Every experiment of the study's chapter 4 is in `EXPERIMENTS`, with one of ours
(``precision``: bfloat16 against float32); `--list` prints them. An experiment
is a set of runs, each a configuration from ``configs/`` with a few fields
changed and a label (the curve it draws). The runs are trained with
`landscape_jax.train` into ``ROOT/<experiment>/<label>/seed<k>/``, ordinary run
directories, and ``ROOT/<experiment>/experiment.json`` describes them for
``experiments/plot.py`` and ``experiments/results.py``. Runs that share
everything but the fields `landscape_jax.sweep` can vary (seed, strength, width,
learning rate, weight decay) are trained as one vectorized program when
``--vectorize`` says so; ``auto`` does it on accelerators only, since on a CPU
the vectorized convolutions are slower than one run after another
(``docs/benchmarks.md``). Rerunning the command resumes unfinished runs and skips
finished ones.

Scales:

* ``full``: the study's setup, 600 epochs of CIFAR-10, with ``--model``
  (resnet32 or mobilenetv2). Needs a GPU to finish in reasonable time.
* ``small``: the same experiment shrunk to fit a 2-core CPU: ``--epochs`` epochs
  (12 by default) instead of 600, every epoch of the study's schedule (anchor
  epochs, step decay, restarts, cosine period) divided by 600 / epochs, ResNet8
  (``--model`` to change it) on the offline MNIST data set of
  ``experiments/prepare_mnist5k.py`` (``--data_dir``: the folder it wrote; 4000
  training and 1000 test digits; ``--train_split`` to take a slice).

With ``--agreement`` (on by default for experiments that study ensembles), the
snapshot ensemble of every run is evaluated once it finishes
(`landscape_jax.ensemble.evaluate_run`) and written to ``ensemble.json`` in the
run directory.
"""

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from landscape_jax import checkpoints, cli, ensemble, sweep, train  # noqa: E402

STUDY_EPOCHS = 600

# The study's anchor epochs: one after epoch 100, or one every 150 epochs.
_ONE_ANCHOR = (100,)
_EVERY_150 = (150, 300, 450)


@dataclasses.dataclass(frozen=True)
class Run:
    """One curve of an experiment.

    Attributes:
      label: the curve's name in figures and tables.
      config: the module in ``configs/`` it starts from.
      overrides: dotted config fields and their values, in study epochs.
    """

    label: str
    config: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StudyResult:
    """A number the study reports, to be set beside ours on the results page.

    Attributes:
      quantity: what it is, in words.
      run: the label of our run that measures the same thing.
      metric: how ours is read (see ``experiments/results.py``).
      value: the study's value.
      model: the study's model it belongs to.
    """

    quantity: str
    run: str
    metric: str
    value: float
    model: str


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment of the study: its runs, figures and reported numbers."""

    title: str
    section: str
    figures: tuple[str, ...]
    plots: tuple[str, ...]
    runs: tuple[Run, ...]
    study_results: tuple[StudyResult, ...] = ()
    agreement: bool = False
    # Epoch times are the point: never train these runs as one program.
    sequential: bool = False


def _no_penalty(anchor_epochs: tuple[int, ...]) -> dict[str, Any]:
    """Anchors stored (so distances are logged) but a penalty of strength 0."""
    return {'distance.strength': 0.0, 'distance.anchor_epochs': anchor_epochs}


EXPERIMENTS = {
    'baseline': Experiment(
        title='Baseline: one anchor after epoch 100, with and without the penalty',
        section='4.1',
        figures=('4.1',),
        plots=('accuracy', 'distance'),
        runs=(
            Run('no penalty', 'baseline', _no_penalty(_ONE_ANCHOR)),
            Run('s = 1, σ² = 1000', 'baseline'),
        ),
        study_results=(
            StudyResult(
                'final accuracy, fixed lr',
                's = 1, σ² = 1000',
                'eval_accuracy',
                0.89,
                'ResNet32',
            ),
            StudyResult(
                'final accuracy, fixed lr',
                's = 1, σ² = 1000',
                'eval_accuracy',
                0.90,
                'MobileNetV2',
            ),
        ),
    ),
    'strength': Experiment(
        title='Penalty strength s, one anchor after epoch 100, σ² = 1000',
        section='4.2.1',
        figures=('4.2',),
        plots=('accuracy', 'distance'),
        runs=tuple(
            Run(f's = {s:g}', 'baseline', {'distance.strength': s})
            for s in (1.0, 10.0, 100.0)
        ),
    ),
    'width': Experiment(
        title='Penalty width σ², one anchor after epoch 100, s = 1',
        section='4.2.2',
        figures=('4.3',),
        plots=('accuracy', 'distance'),
        runs=tuple(
            Run(f'σ² = {w:g}', 'baseline', {'distance.width': w})
            for w in (0.1, 10.0, 100.0, 1000.0, 10000.0)
        ),
    ),
    'multi_anchor': Experiment(
        title='An anchor every 150 epochs for each strength, and snapshot ensembles',
        section='4.3, 4.4.1, 4.5',
        figures=('4.4', '4.5', '4.8', '4.11', '4.12', 'table 4.1'),
        plots=('accuracy', 'distance', 'ensemble_accuracy', 'agreement'),
        runs=(
            Run('no penalty', 'multi_ckpt', _no_penalty(_EVERY_150)),
            *(
                Run(f's = {s:g}', 'multi_ckpt', {'distance.strength': s})
                for s in (1.0, 10.0, 100.0)
            ),
            Run('cosine restarts, no penalty', 'cosine'),
        ),
        study_results=(
            StudyResult(
                'snapshot-ensemble accuracy',
                's = 1',
                'ensemble_accuracy',
                0.94,
                'MobileNetV2',
            ),
            *(
                StudyResult(
                    'test examples all snapshots agree on (of 10000)',
                    label,
                    'agreement_fraction',
                    count / 10000,
                    'MobileNetV2',
                )
                for label, count in (
                    ('no penalty', 7648),
                    ('cosine restarts, no penalty', 9130),
                    ('s = 1', 7658),
                    ('s = 10', 7739),
                    ('s = 100', 7788),
                )
            ),
        ),
        agreement=True,
    ),
    'no_l2': Experiment(
        title='An anchor every 150 epochs, s = 100, with and without L2',
        section='4.3',
        figures=('4.6',),
        plots=('accuracy', 'distance'),
        runs=(
            Run('s = 100, L2 1e-3', 'multi_ckpt', {'distance.strength': 100.0}),
            Run(
                's = 100, no L2',
                'multi_ckpt',
                {'distance.strength': 100.0, 'optimizer.weight_decay': 0.0},
            ),
        ),
    ),
    'schedules': Experiment(
        title='Learning-rate schedules without the penalty',
        section='4.4.1',
        figures=('4.7',),
        plots=('accuracy', 'distance'),
        runs=(
            Run('constant', 'baseline', _no_penalty(_ONE_ANCHOR)),
            Run('step decay, restarts', 'step', _no_penalty(_ONE_ANCHOR)),
            Run('cosine restarts', 'cosine', _no_penalty(_ONE_ANCHOR)),
        ),
        study_results=(
            StudyResult(
                'best accuracy, cosine restarts',
                'cosine restarts',
                'best_eval_accuracy',
                0.93,
                'ResNet32',
            ),
            StudyResult(
                'best accuracy, cosine restarts',
                'cosine restarts',
                'best_eval_accuracy',
                0.95,
                'MobileNetV2',
            ),
        ),
    ),
    'schedules_anchors': Experiment(
        title='Schedules with an anchor at each restart, with and without the penalty',
        section='4.4.1',
        figures=('4.9',),
        plots=('accuracy', 'distance'),
        runs=(
            Run('step, no penalty', 'step_anchors', _no_penalty(_EVERY_150)),
            Run('step, s = 1', 'step_anchors'),
            Run('cosine, no penalty', 'cosine_anchors', _no_penalty(_EVERY_150)),
            Run('cosine, s = 1', 'cosine_anchors'),
        ),
    ),
    'lr01': Experiment(
        title='Initial learning rate 0.1',
        section='4.4.2',
        figures=('4.10',),
        plots=('accuracy', 'distance'),
        runs=(
            Run(
                'constant, no penalty',
                'lr01',
                {'schedule.name': 'constant', **_no_penalty(_EVERY_150)},
            ),
            Run('cosine, no penalty', 'lr01', _no_penalty(_EVERY_150)),
            Run('cosine, s = 1', 'lr01'),
        ),
        study_results=(
            StudyResult(
                'best accuracy, constant lr 0.1',
                'constant, no penalty',
                'best_eval_accuracy',
                0.60,
                'MobileNetV2',
            ),
        ),
    ),
    'epoch_time': Experiment(
        title='Training time per epoch against the number of anchors',
        section='4.6',
        figures=('4.13',),
        plots=('epoch_time',),
        runs=(
            Run('no anchors', 'default'),
            Run('anchor every 150 epochs, s = 1', 'multi_ckpt'),
        ),
        sequential=True,
    ),
    # Not in the study: what mixed precision costs in accuracy.
    'precision': Experiment(
        title='Mixed precision: bfloat16 computation against float32',
        section='',
        figures=(),
        plots=('accuracy', 'distance'),
        runs=(
            Run('float32', 'baseline'),
            Run('bfloat16', 'baseline', {'model.dtype': 'bfloat16'}),
        ),
    ),
}

# Config fields counted in epochs, rescaled with the run's length.
_EPOCH_FIELDS = (
    'schedule.decay_epochs',
    'schedule.restart_epochs',
    'schedule.period_epochs',
)


def scaled_epoch(epoch: int, num_epochs: int) -> int:
    """A study epoch (of 600) in a run of ``num_epochs``; at least 1."""
    return max(1, round(epoch * num_epochs / STUDY_EPOCHS))


def build_config(
    run: Run, seed: int, scale: dict[str, Any]
) -> ml_collections.ConfigDict:
    """The configuration of ``run`` with ``seed`` at ``scale`` (see `_scale`)."""
    config = importlib.import_module(f'configs.{run.config}').get_config()
    for field, value in run.overrides.items():
        _set(config, field, value)
    config.seed = seed
    config.model.name = scale['model']
    num_epochs = scale['num_epochs']
    if num_epochs != STUDY_EPOCHS:
        # Anchors that fall on one epoch of a very short run become one anchor.
        config.distance.anchor_epochs = tuple(
            sorted(
                {
                    scaled_epoch(epoch, num_epochs)
                    for epoch in config.distance.anchor_epochs
                }
            )
        )
        for field in _EPOCH_FIELDS:
            _set(config, field, scaled_epoch(_get(config, field), num_epochs))
    config.num_epochs = num_epochs
    config.data.name = scale['data']
    for field in ('data_dir', 'train_split', 'eval_split'):
        if scale.get(field) is not None:
            config.data[field] = scale[field]
    return config


def run_experiment(
    name: str,
    root: str,
    seeds: Sequence[int],
    scale: dict[str, Any],
    vectorize: str = 'auto',
    agreement: bool | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Trains every run of experiment ``name`` and writes experiment.json.

    Args:
      name: a key of `EXPERIMENTS`.
      root: the folder that holds one folder per experiment.
      seeds: the seeds each run is trained with.
      scale: the scale's settings (`scale_settings`).
      vectorize: 'auto', 'always' or 'never'; see the module docstring.
      agreement: whether to write each run's ensemble.json; None for the
        experiment's default.
      command: the command line, recorded in experiment.json.

    Returns:
      The contents of experiment.json.
    """
    experiment = EXPERIMENTS[name]
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    entries, jobs = [], []
    for run in experiment.runs:
        for seed in seeds:
            config = build_config(run, seed, scale)
            workdir = os.path.join(_slug(run.label), f'seed{seed}')
            entries.append(
                {
                    'label': run.label,
                    'seed': seed,
                    'workdir': workdir,
                    'config': f'configs/{run.config}.py',
                    'overrides': run.overrides,
                    'anchor_epochs': list(config.distance.anchor_epochs),
                    'snapshot_epochs': sorted(train.planned_snapshot_epochs(config)),
                }
            )
            jobs.append((config, os.path.join(folder, workdir)))
    manifest = {
        'name': name,
        'title': experiment.title,
        'study_section': experiment.section,
        'study_figures': list(experiment.figures),
        'plots': list(experiment.plots),
        'scale': {
            **{key: value for key, value in scale.items() if key != 'data_dir'},
            'study_epochs_per_epoch': STUDY_EPOCHS / scale['num_epochs'],
        },
        'study_results': [dataclasses.asdict(r) for r in experiment.study_results],
        'runs': entries,
        'command': command,
        'device': jax.devices()[0].platform,
    }
    manifest = _write_json(os.path.join(folder, 'experiment.json'), manifest)

    use_sweeps = not experiment.sequential and (
        vectorize == 'always'
        or (vectorize == 'auto' and jax.default_backend() != 'cpu')
    )
    for group in _groups(jobs) if use_sweeps else [[job] for job in jobs]:
        configs, workdirs = zip(*group, strict=True)
        if len(group) == 1:
            train.train_and_evaluate(configs[0], workdirs[0])
        else:
            sweep.train_and_evaluate_sweep(list(configs), list(workdirs))

    if experiment.agreement if agreement is None else agreement:
        for _, workdir in jobs:
            if checkpoints.snapshot_epochs(workdir):
                figures = ensemble.evaluate_run(workdir)
                _write_json(os.path.join(workdir, 'ensemble.json'), figures)
    return manifest


def scale_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The model, data and length of the runs for ``--scale``."""
    if args.scale == 'full':
        return {
            'name': 'full',
            'num_epochs': STUDY_EPOCHS,
            'model': args.model or 'resnet32',
            'data': args.data or 'cifar10',
            'data_dir': args.data_dir,
            'train_split': args.train_split or 'train',
            'eval_split': args.eval_split or 'test',
        }
    return {
        'name': 'small',
        'num_epochs': args.epochs,
        'model': args.model or 'resnet8',
        'data': args.data or 'mnist5k',
        'data_dir': args.data_dir,
        'train_split': args.train_split or 'train',
        'eval_split': args.eval_split or 'test',
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the flags and runs the experiment."""
    args = _parser().parse_args(argv)
    if args.list:
        for name, experiment in EXPERIMENTS.items():
            section = f'§{experiment.section}' if experiment.section else 'not in study'
            print(f'{name:18} {section:17} {experiment.title}')
        return
    if args.experiment is None:
        cli.exit_with_error(
            f'--experiment is required; one of {", ".join(EXPERIMENTS)}.'
        )
    if args.root is None:
        cli.exit_with_error('--root is required: the folder for the run directories.')
    if args.seeds < 1:
        cli.exit_with_error(f'--seeds must be at least 1, got {args.seeds}.')
    if args.epochs < 1:
        cli.exit_with_error(f'--epochs must be at least 1, got {args.epochs}.')
    scale = scale_settings(args)
    names = EXPERIMENTS if args.experiment == 'all' else [args.experiment]
    command = ' '.join(['python', 'experiments/run.py', *(argv or sys.argv[1:])])
    for name in names:
        run_experiment(
            name,
            args.root,
            seeds=range(args.seed0, args.seed0 + args.seeds),
            scale=scale,
            vectorize=args.vectorize,
            agreement=args.agreement,
            command=command,
        )


def _groups(
    jobs: list[tuple[ml_collections.ConfigDict, str]],
) -> list[list[tuple[ml_collections.ConfigDict, str]]]:
    """Jobs whose configs differ only in fields a sweep can vary, together."""
    groups: list[list[tuple[ml_collections.ConfigDict, str]]] = []
    for job in jobs:
        for group in groups:
            try:
                sweep.members_from_configs([group[0][0], job[0]])
            except ValueError:
                continue
            group.append(job)
            break
        else:
            groups.append([job])
    return groups


def _slug(label: str) -> str:
    """A folder name for a label: 's = 1, σ² = 1000' -> 's1_sigma2_1000'."""
    text = label.replace('σ²', 'sigma2').replace('1e-3', '0.001')
    kept = ''.join(c if c.isalnum() or c == '.' else ' ' for c in text)
    return '_'.join(kept.split())


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    for key in field.split('.'):
        config = config[key]
    return config


def _set(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
    *parents, key = field.split('.')
    for parent in parents:
        config = config[parent]
    config[key] = value


def _write_json(path: str, value: Any) -> Any:
    """Writes ``value`` to ``path`` atomically; returns it as read back."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    temporary = f'{path}.tmp'
    with open(temporary, 'w') as file:
        file.write(f'{text}\n')
    os.replace(temporary, path)
    return json.loads(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--experiment', choices=(*EXPERIMENTS, 'all'))
    parser.add_argument('--root', help='folder for the run directories')
    parser.add_argument('--seeds', type=int, default=1, help='seeds per run')
    parser.add_argument('--seed0', type=int, default=0, help='the first seed')
    parser.add_argument('--scale', choices=('full', 'small'), default='full')
    parser.add_argument('--epochs', type=int, default=12, help="'small' only")
    parser.add_argument('--model', help='resnet32 (full) or resnet8 (small) if unset')
    parser.add_argument('--data', help='tfds name; cifar10 (full), mnist5k (small)')
    parser.add_argument('--data_dir', help='tfds data folder')
    parser.add_argument('--train_split')
    parser.add_argument('--eval_split')
    parser.add_argument(
        '--vectorize', choices=('auto', 'always', 'never'), default='auto'
    )
    parser.add_argument(
        '--agreement',
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write each run's ensemble.json (default: experiments on ensembles)",
    )
    parser.add_argument('--list', action='store_true', help='list the experiments')
    return parser


if __name__ == '__main__':
    main()
