"""Writes the results page of the experiments that ``experiments/run.py`` trains.

    python experiments/results.py --root=ROOT --figures=DIR \
        --out=experiments/RESULTS.md

``DIR`` is where ``experiments/plot.py --root=ROOT --out=DIR`` wrote the figures;
the page links them by paths relative to its own folder. Every number on the
page is read from ``ROOT``: each experiment's ``experiment.json`` and its runs'
``metrics.jsonl`` and ``ensemble.json``. Nothing is typed in by hand.

The page has a header on how the runs were made (from each experiment's
``scale``), the command lines, and per experiment: its title and the study's
section and figures; a table with one row per label (seeds, final and best eval
accuracy, final distance to each anchor, final ensemble accuracy); the study's
numbers beside ours; its figures; and its agreement table. Over several seeds a
number is ``mean ± std`` (sample standard deviation, n − 1) and, in brackets,
the range.

The keys of ``experiment.json`` read here, beyond those that
``experiments/plot.py`` reads (``runs``, ``plots``, ``title``, ``scale``):

- ``study_section``: the section of the study, a string such as ``"4.2.1"``.
- ``study_figures``: the study's figures, a list of strings such as ``["4.2"]``.
- ``command``: the command line(s) that trained the experiment, a string or a
  list of strings; printed as given.
- ``device``: what the runs trained on (``"gpu"``), optional.
- ``study_results``: the study's numbers to set beside ours, a list of objects:

  - ``quantity``: what the number is, in words
    (``"final eval accuracy, ResNet32"``);
  - ``run``: the label of the runs to compare with (``"s = 1"``);
  - ``value``: the study's number, in the units of ``metric``: fractions for
    accuracies and ``agreement_fraction`` (0.89, not 89);
  - ``model`` (optional): the study's model the number is for (``"ResNet32"``);
  - ``metric`` (optional, default ``eval_accuracy``): which of our numbers
    matches it, one of `METRICS` or ``distance/<k>``:

    | metric | our number, per seed, then over the seeds |
    | --- | --- |
    | ``eval_accuracy`` | eval accuracy of the last epoch (``metrics.jsonl``) |
    | ``best_eval_accuracy`` | highest eval accuracy of any epoch |
    | ``final_ensemble_accuracy`` | ``ensemble_accuracy`` of the last epoch |
    | ``ensemble_accuracy`` | ``ensemble.json`` ``ensemble_accuracy`` |
    | ``best_member_accuracy`` | ``ensemble.json`` highest ``member_accuracy`` |
    | ``agreement_fraction`` | ``ensemble.json`` ``agreement_fraction`` |
    | ``disagreement`` | ``ensemble.json`` ``disagreement`` |
    | ``nll`` | ``ensemble.json`` ``nll`` |
    | ``ece`` | ``ensemble.json`` ``ece`` |
    | ``distance/<k>`` | ‖θ − θ_k‖ of the last epoch (``metrics.jsonl``) |

For example ``{"quantity": "ensemble accuracy, 3 snapshots", "run": "s = 1",
"value": 0.91, "metric": "ensemble_accuracy"}``.
"""

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from landscape_jax import cli

if __package__:
    from experiments import plot
else:  # Run as a script: this folder, not the repository root, is on sys.path.
    import plot

Run = plot.Run

# Our number for each metric of ``study_results``, for one run; None where the
# run lacks it.
_METRIC_VALUES: dict[str, Callable[[Run], float | None]] = {
    'eval_accuracy': lambda run: plot.final_value(run, 'eval_accuracy'),
    'best_eval_accuracy': lambda run: _best(run, 'eval_accuracy'),
    'final_ensemble_accuracy': lambda run: plot.final_value(run, 'ensemble_accuracy'),
    'ensemble_accuracy': lambda run: _ensemble_value(run, 'ensemble_accuracy'),
    'best_member_accuracy': lambda run: _best_member_accuracy(run),
    'agreement_fraction': lambda run: _ensemble_value(run, 'agreement_fraction'),
    'disagreement': lambda run: _ensemble_value(run, 'disagreement'),
    'nll': lambda run: _ensemble_value(run, 'nll'),
    'ece': lambda run: _ensemble_value(run, 'ece'),
}
METRICS = tuple(_METRIC_VALUES)
DEFAULT_METRIC = 'eval_accuracy'
# Metrics shown in % (their values, ours and the study's, are fractions).
_PERCENT_METRICS = frozenset(
    {
        'eval_accuracy',
        'best_eval_accuracy',
        'final_ensemble_accuracy',
        'ensemble_accuracy',
        'best_member_accuracy',
        'agreement_fraction',
    }
)
_DISTANCE_METRIC = re.compile(r'distance/(\d+)')
_FULL_SCALE = 'full'
# What the study trained, to say what a scaled-down run stands for.
_STUDY_RUNS = "the study's 600-epoch CIFAR-10 runs"


def metric_values(runs: Sequence[Run], metric: str) -> list[float]:
    """Our number for ``metric`` (see the module docstring), one per run having it.

    Raises:
      ValueError: if ``metric`` is not one of `METRICS` or ``distance/<k>``.
    """
    if metric in _METRIC_VALUES:
        values = [_METRIC_VALUES[metric](run) for run in runs]
    elif _DISTANCE_METRIC.fullmatch(metric):
        values = [plot.final_value(run, metric) for run in runs]
    else:
        raise ValueError(
            f'metric must be one of {", ".join(METRICS)} or distance/<k>, '
            f'got {metric!r}.'
        )
    return [value for value in values if value is not None]


def results_page(
    experiments: Sequence[plot.Experiment], figures: str, out: str, commands: str
) -> str:
    """The Markdown page for ``experiments``.

    Args:
      experiments: the loaded experiments, in the order of the page.
      figures: the folder the figures were written to by ``plot.py``.
      out: where the page is written; figure links are relative to its folder.
      commands: the command lines that made the figures and the page.

    Returns:
      The page's text.

    Raises:
      plot.ExperimentInputError: if an entry of ``study_results`` lacks a key or
        names an unknown metric.
    """
    parts = [
        '# Results\n',
        'Every number on this page is read from the run directories '
        '(`metrics.jsonl`, `ensemble.json`) and from each `experiment.json`. '
        'Over several seeds a number is mean ± standard deviation (sample, '
        'n − 1) and, in brackets, the minimum–maximum; accuracies are in %.\n',
        _setup_section(experiments),
        '## Commands\n',
        f'```bash\n{commands}\n```\n',
    ]
    page_folder = os.path.dirname(os.path.abspath(out))
    for experiment in experiments:
        parts.append(_experiment_section(experiment, figures, page_folder))
    return '\n'.join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    """Writes the page that the command line asks for.

    Bad input (a missing root or experiment, an unknown plot kind or metric)
    ends the command with exit status 2 and one ``error: ...`` line on stderr.
    """
    args = _parser().parse_args(argv)
    try:
        names = plot.select_experiments(args.root, args.experiments)
        experiments = [plot.load_experiment(args.root, name) for name in names]
        if not args.experiments:
            experiments.sort(key=_study_order)
        page = results_page(experiments, args.figures, args.out, _commands(args))
    except plot.ExperimentInputError as err:
        cli.exit_with_error(str(err))
    if not os.path.isdir(args.figures):
        print(f'warning: --figures={args.figures} is not a directory.', file=sys.stderr)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, 'w') as file:
        file.write(page)
    print(f'wrote {args.out}')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Writes the results page.')
    parser.add_argument('--root', required=True, help='Folder of the experiments.')
    parser.add_argument(
        '--figures', required=True, help='Folder where plot.py wrote the figures.'
    )
    parser.add_argument('--out', required=True, help='The Markdown file to write.')
    parser.add_argument(
        '--experiments', default='', help='Comma-separated names; default all.'
    )
    return parser


def _commands(args: argparse.Namespace) -> str:
    """The plot and results command lines that go with ``args``."""
    selected = (
        [f'--experiments={shlex.quote(args.experiments)}'] if args.experiments else []
    )
    root = f'--root={shlex.quote(args.root)}'
    plot_command = [
        'python experiments/plot.py',
        root,
        f'--out={shlex.quote(args.figures)}',
    ]
    results_command = [
        'python experiments/results.py',
        root,
        f'--figures={shlex.quote(args.figures)}',
        f'--out={shlex.quote(args.out)}',
    ]
    return '\n'.join(
        ' '.join(command + selected) for command in (plot_command, results_command)
    )


def _study_order(experiment: plot.Experiment) -> tuple:
    """The study's order: by the first section named, then experiments of ours."""
    section = str(experiment.spec.get('study_section') or '')
    first = section.split(',')[0].strip()
    try:
        numbers = tuple(int(part) for part in first.split('.'))
    except ValueError:
        numbers = ()
    return (not numbers, numbers, experiment.name)


def _setup_section(experiments: Sequence[plot.Experiment]) -> str:
    """How the runs were made: one bullet per scale, naming its experiments."""
    by_scale: dict[str, list[plot.Experiment]] = {}
    for experiment in experiments:
        key = json.dumps(experiment.scale, sort_keys=True)
        by_scale.setdefault(key, []).append(experiment)
    lines = ['## How the runs were made\n']
    for group in by_scale.values():
        scale = group[0].scale
        names = ', '.join(f'`{experiment.name}`' for experiment in group)
        lines.append(f'- {names}: {_describe_setup(scale)}')
    if any(experiment.scale.get('name') != _FULL_SCALE for experiment in experiments):
        lines.append(
            '\nScaled-down runs show that every command and figure works; their '
            "numbers are not the study's setting and are not expected to match "
            "the study's, which stand beside them for orientation. Where a run "
            'has one seed, weigh its differences against the seed-to-seed '
            'spread of the runs that have several.'
        )
    return '\n'.join(lines) + '\n'


def _describe_setup(scale: dict[str, Any]) -> str:
    """A sentence on the model, data and length of runs at ``scale``."""
    if not scale:
        return '`experiment.json` gives no `scale`.'
    parts = [f'scale `{scale.get("name", "?")}`']
    if scale.get('model') or scale.get('data'):
        data = scale.get('data', '?')
        if data == 'mnist5k':
            data += ' (written by `experiments/prepare_mnist5k.py`)'
        parts.append(f'{scale.get("model", "?")} on {data}')
    splits = []
    if scale.get('train_split'):
        splits.append(f'trained on split `{scale["train_split"]}`')
    if scale.get('eval_split'):
        splits.append(f'evaluated on `{scale["eval_split"]}`')
    if splits:
        parts.append(' and '.join(splits))
    if scale.get('num_epochs') is not None:
        epochs = f'{scale["num_epochs"]} epochs'
        per_epoch = scale.get('study_epochs_per_epoch')
        if per_epoch is not None:
            epochs += f", each standing for {per_epoch:g} of the study's epochs"
        parts.append(epochs)
    text = ', '.join(parts)
    if scale.get('name') == _FULL_SCALE:
        return f"{text}: the study's own setup."
    return f'{text}; scaled down from {_STUDY_RUNS}.'


def _experiment_section(
    experiment: plot.Experiment, figures: str, page_folder: str
) -> str:
    """Title, study reference, command, tables, figures and notes of one experiment."""
    heading = experiment.title
    if heading != experiment.name:
        heading += f' (`{experiment.name}`)'
    lines = [f'## {heading}\n']
    reference = _study_reference(experiment.spec)
    if reference:
        lines.append(reference + '\n')
    scale = plot.describe_scale(experiment.scale)
    device = experiment.spec.get('device')
    if scale or device:
        where = f' (device: {device})' if device else ''
        lines.append(f'Runs: {scale or "no scale given"}{where}.\n')
    command = experiment.spec.get('command')
    if command:
        text = command if isinstance(command, str) else '\n'.join(command)
        lines.append(f'```bash\n{text}\n```\n')

    lines.append(_label_table(experiment))
    notes = plot.run_notes(experiment)
    if notes:
        lines.append('\n'.join(f'- {note}' for note in notes) + '\n')
    if experiment.spec.get('study_results'):
        lines.append('### The study and ours\n')
        lines.append(_study_table(experiment))
    for kind in experiment.plots:
        if kind in plot.TABLE_KINDS:
            continue
        lines.append(_figure_link(experiment.name, kind, figures, page_folder))
    if 'agreement' in experiment.plots:
        lines.append('### Snapshot ensembles (`ensemble.json`)\n')
        lines.append(plot.agreement_table(experiment))
    return '\n'.join(lines)


def _study_reference(spec: dict[str, Any]) -> str:
    parts = []
    if spec.get('study_section'):
        parts.append(f'section {spec["study_section"]}')
    figures = spec.get('study_figures') or []
    if figures:
        noun = 'figure' if len(figures) == 1 else 'figures'
        parts.append(f'{noun} {", ".join(str(figure) for figure in figures)}')
    return f'Study: {", ".join(parts)}.' if parts else ''


def _label_table(experiment: plot.Experiment) -> str:
    """One row per label: seeds, overrides, accuracies, distances, ensemble."""
    slots = sorted(
        {
            int(match.group(1))
            for run in experiment.runs
            for record in run.records[-1:]
            for key in record
            if (match := _DISTANCE_METRIC.fullmatch(key))
        }
    )
    has_ensemble = any(
        plot.final_value(run, 'ensemble_accuracy') is not None
        for run in experiment.runs
    )
    header = [
        'run',
        'seeds',
        'overrides',
        'final eval accuracy (%)',
        'best eval accuracy (%)',
    ]
    header += [f'final ‖θ − θ_{slot}‖' for slot in slots]
    if has_ensemble:
        header.append('final ensemble accuracy (%)')

    rows = [header, ['---'] * len(header)]
    for label in experiment.labels:
        runs = experiment.runs_of(label)
        seeds = ', '.join(str(run.seed) for run in runs)
        row = [
            label,
            f'{len(runs)} ({seeds})' if runs else '0',
            _overrides(experiment, label),
        ]
        row += [
            _format_metric(runs, 'eval_accuracy'),
            _format_metric(runs, 'best_eval_accuracy'),
        ]
        row += [_format_metric(runs, f'distance/{slot}') for slot in slots]
        if has_ensemble:
            row.append(_format_metric(runs, 'final_ensemble_accuracy'))
        rows.append(row)
    return '\n'.join(plot.table_row(row) for row in rows) + '\n'


def _study_table(experiment: plot.Experiment) -> str:
    """The study's numbers from ``study_results`` beside ours."""
    entries = experiment.spec['study_results']
    with_model = any(isinstance(e, dict) and e.get('model') for e in entries)
    header = ['quantity', 'run', 'metric', 'study', 'ours', 'seeds']
    if with_model:
        header.insert(1, 'study model')
    rows = [header, ['---'] * len(header)]
    for index, entry in enumerate(entries):
        where = f'experiment {experiment.name!r}: study_results[{index}]'
        if not isinstance(entry, dict):
            raise plot.ExperimentInputError(f'{where} must be a JSON object.')
        missing = [key for key in ('quantity', 'run', 'value') if key not in entry]
        if missing:
            raise plot.ExperimentInputError(f'{where} has no {missing[0]!r}.')
        metric = entry.get('metric', DEFAULT_METRIC)
        runs = experiment.runs_of(entry['run'])
        try:
            values = metric_values(runs, metric)
        except ValueError as err:
            raise plot.ExperimentInputError(f'{where}: {err}') from err
        ours = _format_values(values, metric)
        if not runs:
            ours = f'{plot.NO_VALUE} (no run labelled {entry["run"]!r})'
        row = [
            entry['quantity'],
            entry['run'],
            f'`{metric}`',
            _format_study_value(entry['value'], metric),
            ours,
            str(len(values)),
        ]
        if with_model:
            row.insert(1, entry.get('model') or plot.NO_VALUE)
        rows.append(row)
    return '\n'.join(plot.table_row(row) for row in rows) + '\n'


def _figure_link(name: str, kind: str, figures: str, page_folder: str) -> str:
    """A Markdown image of a figure, by its path relative to the page's folder."""
    path = plot.output_path(figures, name, kind)
    relative = os.path.relpath(os.path.abspath(path), page_folder).replace(os.sep, '/')
    if not os.path.isfile(path):
        return f'`{relative}` is missing: run `experiments/plot.py` first.\n'
    return f'![{name}: {kind}]({relative})\n'


def _overrides(experiment: plot.Experiment, label: str) -> str:
    """The config overrides of a label's runs, as ``field=value``."""
    texts = dict.fromkeys(
        ', '.join(f'`{key}={value}`' for key, value in run.overrides.items())
        for run in experiment.runs
        if run.label == label
    )
    return '; '.join(text for text in texts if text) or plot.NO_VALUE


def _format_metric(runs: Sequence[Run], metric: str) -> str:
    return _format_values(metric_values(runs, metric), metric)


def _format_values(values: Sequence[float], metric: str) -> str:
    percent = metric in _PERCENT_METRICS
    return plot.format_spread(
        plot.spread(values),
        scale=100.0 if percent else 1.0,
        digits=2 if percent else 4,
        with_range=True,
    )


def _format_study_value(value: Any, metric: str) -> str:
    if not isinstance(value, int | float):
        return str(value)
    if metric in _PERCENT_METRICS:
        return f'{100.0 * value:.2f}'
    return f'{value:.4g}'


def _best(run: Run, key: str) -> float | None:
    values = [record[key] for record in run.records if record.get(key) is not None]
    return max(values) if values else None


def _ensemble_value(run: Run, key: str) -> float | None:
    if run.ensemble is None or run.ensemble.get(key) is None:
        return None
    return float(run.ensemble[key])


def _best_member_accuracy(run: Run) -> float | None:
    if run.ensemble is None or not run.ensemble.get('member_accuracy'):
        return None
    return float(max(run.ensemble['member_accuracy']))


if __name__ == '__main__':
    main()
