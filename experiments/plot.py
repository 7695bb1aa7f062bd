"""Figures of the experiments that ``experiments/run.py`` trains.

    python experiments/plot.py --root=ROOT --out=DIR [--experiments=a,b]

For each experiment ``ROOT/<name>/experiment.json`` (all of them, or those named
by ``--experiments``) and each plot kind it lists, writes ``DIR/<name>_<kind>.png``;
the kind ``agreement`` is a Markdown table, ``DIR/<name>_agreement.md``.

| kind | what it shows |
| --- | --- |
| ``accuracy`` | eval accuracy (%) against epoch, one curve per label |
| ``distance`` | ‖θ − θ_k‖ against epoch, one panel per anchor slot k |
| ``ensemble_accuracy`` | snapshot-ensemble accuracy, the single model thinner |
| ``epoch_time`` | seconds of training per epoch; its mean by anchors stored |
| ``agreement`` | the runs' ``ensemble.json`` figures, one row per label |

A label is one curve: its seeds are averaged (mean), and a shaded band spans
their minimum to maximum. Dotted vertical lines mark the epochs after which an
anchor is stored (black) and, lighter, those after which only a snapshot is
saved; when the labels of an experiment differ in these epochs, each label's
lines take its colour.

The keys of ``experiment.json`` read here (others are ignored):

- ``runs`` (required): a list of runs, each with ``label`` (the curve), ``seed``,
  ``workdir`` (relative to the experiment's folder; a run directory with
  ``metrics.jsonl`` and, for ``agreement``, ``ensemble.json``), and optionally
  ``anchor_epochs`` and ``snapshot_epochs`` (lists of epochs) and
  ``overrides`` (config field to value).
- ``plots``: plot kinds, a subset of `PLOT_KINDS`; default none.
- ``title``: default the experiment's name (its folder's name).
- ``scale``: ``name``, ``model``, ``data``, ``num_epochs``,
  ``study_epochs_per_epoch``, ``train_split``, ``eval_split``, all optional.

The figure functions take a loaded `Experiment` and return a matplotlib
``Figure`` (made without pyplot, drawn with the Agg canvas), so they can be
tested without files.
"""

import argparse
import dataclasses
import itertools
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from landscape_jax import cli, metric_writers

EXPERIMENT_FILE = 'experiment.json'
ENSEMBLE_FILE = 'ensemble.json'
PLOT_KINDS = ('accuracy', 'distance', 'ensemble_accuracy', 'epoch_time', 'agreement')
# The kinds written as Markdown rather than as a PNG.
TABLE_KINDS = ('agreement',)

_DPI = 120
_ANCHOR_COLOR = 'black'
_SNAPSHOT_COLOR = '0.6'
# A table cell without a value.
NO_VALUE = '—'


class ExperimentInputError(ValueError):
    """An experiment folder cannot be read or plotted: bad input, not a bug."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of an experiment and what its run directory holds.

    Attributes:
      label: the curve the run belongs to; its seeds share it.
      seed: the run's seed.
      workdir: the run directory as ``experiment.json`` names it (relative to
        the experiment's folder).
      path: the run directory's path.
      anchor_epochs: epochs after which an anchor is stored.
      snapshot_epochs: epochs after which a snapshot is saved.
      overrides: config field to value, as ``experiment.json`` gives them.
      records: the lines of its ``metrics.jsonl``; empty before the first epoch.
      ensemble: its ``ensemble.json`` (see `landscape_jax.ensemble.evaluate_run`),
        or None when it has none.
    """

    label: str
    seed: int
    workdir: str
    path: str
    anchor_epochs: tuple[int, ...]
    snapshot_epochs: tuple[int, ...]
    overrides: dict[str, Any]
    records: list[dict[str, Any]]
    ensemble: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment folder: its ``experiment.json`` and its runs."""

    name: str
    directory: str
    spec: dict[str, Any]
    runs: list[Run]

    @property
    def title(self) -> str:
        return str(self.spec.get('title', self.name))

    @property
    def plots(self) -> list[str]:
        return list(self.spec.get('plots', []))

    @property
    def scale(self) -> dict[str, Any]:
        return dict(self.spec.get('scale') or {})

    @property
    def labels(self) -> list[str]:
        """The runs' labels, in the order they first appear."""
        return list(dict.fromkeys(run.label for run in self.runs))

    def runs_of(self, label: str) -> list[Run]:
        """The runs of ``label`` that have written at least one epoch."""
        return [run for run in self.runs if run.label == label and run.records]


@dataclasses.dataclass(frozen=True)
class Curve:
    """A metric against epoch over the seeds of one label.

    Attributes:
      epochs: int[E], the epochs at which at least one seed has the metric.
      mean: f64[E], the mean over the seeds that have it.
      low: f64[E], their minimum.
      high: f64[E], their maximum.
      counts: int[E], how many seeds have it.
    """

    epochs: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    counts: np.ndarray


@dataclasses.dataclass(frozen=True)
class Spread:
    """One number per seed, summarized.

    Attributes:
      values: the numbers, one per seed.
      mean: their mean.
      std: their sample standard deviation (n − 1); 0 for a single value.
      low: their minimum.
      high: their maximum.
    """

    values: tuple[float, ...]
    mean: float
    std: float
    low: float
    high: float


def find_experiments(root: str) -> list[str]:
    """The names of the folders of ``root`` that hold an ``experiment.json``.

    Raises:
      ExperimentInputError: if ``root`` is not a directory or holds none.
    """
    if not os.path.isdir(root):
        raise ExperimentInputError(f'--root={root} is not a directory.')
    names = sorted(
        name
        for name in os.listdir(root)
        if os.path.isfile(os.path.join(root, name, EXPERIMENT_FILE))
    )
    if not names:
        raise ExperimentInputError(
            f'--root={root} holds no experiment: no {root}/<name>/{EXPERIMENT_FILE}.'
        )
    return names


def select_experiments(root: str, requested: str | None) -> list[str]:
    """The experiments of ``root`` named in ``requested`` (comma separated).

    Args:
      root: the folder of the experiments.
      requested: comma-separated names, or None or '' for all of them.

    Raises:
      ExperimentInputError: if ``root`` is not a directory, or a requested
        experiment has no ``experiment.json`` in it.
    """
    if not os.path.isdir(root):
        raise ExperimentInputError(f'--root={root} is not a directory.')
    if not requested:
        return find_experiments(root)
    names = [name.strip() for name in requested.split(',') if name.strip()]
    for name in names:
        path = os.path.join(root, name, EXPERIMENT_FILE)
        if not os.path.isfile(path):
            raise ExperimentInputError(f'experiment {name!r}: no {path}.')
    return names


def load_experiment(root: str, name: str) -> Experiment:
    """Reads ``root/name/experiment.json`` and the run directories it lists.

    Raises:
      ExperimentInputError: if ``experiment.json`` is missing or malformed, lists
        an unknown plot kind, or a run's ``ensemble.json`` is not JSON.
    """
    directory = os.path.join(root, name)
    path = os.path.join(directory, EXPERIMENT_FILE)
    if not os.path.isfile(path):
        raise ExperimentInputError(f'experiment {name!r}: no {path}.')
    spec = _read_json(path, f'experiment {name!r}')
    if not isinstance(spec, dict):
        raise ExperimentInputError(f'{path} must hold a JSON object.')

    unknown = [kind for kind in spec.get('plots', []) if kind not in PLOT_KINDS]
    if unknown:
        raise ExperimentInputError(
            f'{path}: unknown plot kind {unknown[0]!r}; the kinds are '
            f'{", ".join(PLOT_KINDS)}.'
        )
    runs_spec = spec.get('runs')
    if not isinstance(runs_spec, list) or not runs_spec:
        raise ExperimentInputError(f'{path}: "runs" must be a non-empty list.')
    runs = [
        _load_run(directory, path, index, run) for index, run in enumerate(runs_spec)
    ]
    return Experiment(name=name, directory=directory, spec=spec, runs=runs)


def curve(runs: Sequence[Run], key: str, scale: float = 1.0) -> Curve:
    """``key`` of the runs' records against epoch: mean, min and max over seeds.

    Args:
      runs: the seeds of one label.
      key: a ``metrics.jsonl`` key, such as ``eval_accuracy`` or ``distance/0``.
      scale: a factor applied to every value (100 for percentages).

    Returns:
      The `Curve` over the epochs at which at least one run has ``key``.
    """
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for record in run.records:
            value = record.get(key)
            if value is not None:
                by_epoch.setdefault(int(record['epoch']), []).append(scale * value)
    epochs = sorted(by_epoch)
    values = [by_epoch[epoch] for epoch in epochs]
    return Curve(
        epochs=np.asarray(epochs, dtype=int),
        mean=np.asarray([np.mean(v) for v in values], dtype=float),
        low=np.asarray([np.min(v) for v in values], dtype=float),
        high=np.asarray([np.max(v) for v in values], dtype=float),
        counts=np.asarray([len(v) for v in values], dtype=int),
    )


def spread(values: Iterable[float]) -> Spread | None:
    """Mean, sample standard deviation and range of per-seed numbers; None if none."""
    values = tuple(float(value) for value in values)
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return Spread(
        values=values,
        mean=float(np.mean(values)),
        std=std,
        low=min(values),
        high=max(values),
    )


def format_spread(
    summary: Spread | None,
    *,
    scale: float = 1.0,
    digits: int = 2,
    with_range: bool = False,
) -> str:
    """``mean ± std`` (and ``(min–max)``) of a `Spread`; the value alone for one.

    Args:
      summary: the numbers, or None (formatted as a dash).
      scale: a factor applied first (100 for percentages).
      digits: digits after the decimal point.
      with_range: whether to add the minimum and maximum when there are several.
    """
    if summary is None:
        return NO_VALUE

    def number(value: float) -> str:
        return f'{scale * value:.{digits}f}'

    if len(summary.values) == 1:
        return number(summary.mean)
    text = f'{number(summary.mean)} ± {number(summary.std)}'
    if with_range:
        text += f' ({number(summary.low)}–{number(summary.high)})'
    return text


def final_value(run: Run, key: str) -> float | None:
    """``key`` in the last record of ``run`` that has it; None if none has."""
    for record in reversed(run.records):
        if record.get(key) is not None:
            return float(record[key])
    return None


def describe_scale(scale: dict[str, Any]) -> str:
    """One line on the model, data and length of runs at ``scale``.

    For example ``resnet8 on mnist5k, 12 epochs, 1 epoch = 50 study epochs
    (scale small)``; parts that ``scale`` does not give are left out.
    """
    parts = []
    if scale.get('model') or scale.get('data'):
        parts.append(f'{scale.get("model", "?")} on {scale.get("data", "?")}')
    if scale.get('num_epochs') is not None:
        parts.append(f'{scale["num_epochs"]} epochs')
    per_epoch = scale.get('study_epochs_per_epoch')
    if per_epoch is not None and per_epoch != 1:
        parts.append(f'1 epoch = {per_epoch:g} study epochs')
    text = ', '.join(parts)
    if scale.get('name'):
        text = f'{text} (scale {scale["name"]})' if text else f'scale {scale["name"]}'
    return text


def accuracy_figure(experiment: Experiment) -> Figure:
    """Eval accuracy (%) against epoch, one curve per label."""
    figure = _new_figure(experiment, 'eval accuracy')
    axes = figure.add_subplot()
    colors = _colors(experiment)
    for label in experiment.labels:
        runs = experiment.runs_of(label)
        if runs:
            _plot_curve(axes, curve(runs, 'eval_accuracy', 100.0), colors[label], label)
    _mark_epochs(axes, experiment, colors)
    _set_epoch_axis(axes, experiment)
    axes.set_ylabel('eval accuracy (%)')
    _finish_axes(axes, experiment)
    return figure


def distance_figure(experiment: Experiment) -> Figure:
    """‖θ − θ_k‖ against epoch: one panel per anchor slot k, one curve per label."""
    slots = sorted(
        {
            int(key.split('/', 1)[1])
            for run in experiment.runs
            for record in run.records
            for key in record
            if key.startswith('distance/')
        }
    )
    figure = _new_figure(experiment, 'distance to the anchors', panels=len(slots))
    if not slots:
        _no_data(figure.add_subplot(), 'no distance/<k> in metrics.jsonl')
        return figure
    colors = _colors(experiment)
    all_axes = figure.subplots(1, len(slots), squeeze=False)[0]
    for slot, axes in zip(slots, all_axes, strict=True):
        key = f'distance/{slot}'
        for label in experiment.labels:
            line = curve(experiment.runs_of(label), key)
            if line.epochs.size:
                _plot_curve(axes, line, colors[label], label)
        _mark_epochs(axes, experiment, colors)
        axes.set_title(f'anchor {slot}')
        # Every panel spans the whole run, though a distance starts with its anchor.
        axes.set_xlim(*_epoch_limits(experiment))
        _set_epoch_axis(axes, experiment)
        axes.set_ylabel(f'‖θ − θ_{slot}‖ (L2 norm over parameters)')
        _finish_axes(axes, experiment)
    return figure


def ensemble_accuracy_figure(experiment: Experiment) -> Figure:
    """Snapshot-ensemble accuracy (%) per label; the single model's as a thin line."""
    figure = _new_figure(experiment, 'snapshot-ensemble accuracy')
    axes = figure.add_subplot()
    colors = _colors(experiment)
    plotted = False
    for label in experiment.labels:
        runs = experiment.runs_of(label)
        ensemble = curve(runs, 'ensemble_accuracy', 100.0)
        if not ensemble.epochs.size:
            continue
        plotted = True
        _plot_curve(axes, ensemble, colors[label], label)
        single = curve(runs, 'eval_accuracy', 100.0)
        axes.plot(
            single.epochs,
            single.mean,
            color=colors[label],
            linewidth=0.8,
            alpha=0.7,
            gid='single',
            label='_nolegend_',
        )
    if not plotted:
        _no_data(axes, 'no ensemble_accuracy in metrics.jsonl')
        return figure
    # A legend entry for the thin lines, in no particular label's colour.
    axes.plot([], [], color='0.3', linewidth=0.8, label='thin: single model', gid='key')
    _mark_epochs(axes, experiment, colors)
    _set_epoch_axis(axes, experiment)
    axes.set_ylabel('eval accuracy (%)')
    _finish_axes(axes, experiment)
    return figure


def epoch_time_figure(experiment: Experiment) -> Figure:
    """Seconds of training per epoch against epoch, and their mean by anchors.

    The left panel has one curve per label and, dashed on the right axis, the
    number of anchors stored by the end of each epoch (the count during the
    next epoch). The right panel is `mean_epoch_time_by_anchors` per label.
    """
    figure = _new_figure(experiment, 'training time per epoch', panels=2)
    time_axes, by_anchors_axes = figure.subplots(1, 2)
    anchor_axes = time_axes.twinx()
    colors = _colors(experiment)
    for label in experiment.labels:
        runs = experiment.runs_of(label)
        if not runs:
            continue
        _plot_curve(time_axes, curve(runs, 'epoch_time'), colors[label], label)
        stored = curve(runs, 'anchors')
        anchor_axes.plot(
            stored.epochs,
            stored.mean,
            color=colors[label],
            linestyle='--',
            linewidth=0.9,
            drawstyle='steps-post',
            gid='anchors',
        )
        means = mean_epoch_time_by_anchors(runs)
        by_anchors_axes.plot(
            list(means),
            list(means.values()),
            marker='o',
            color=colors[label],
            label=label,
            gid='curve',
        )

    _mark_epochs(time_axes, experiment, colors)
    _set_epoch_axis(time_axes, experiment)
    time_axes.set_ylabel('training time per epoch (s)')
    anchor_axes.set_ylabel('anchors stored (dashed)')
    anchor_axes.yaxis.get_major_locator().set_params(integer=True)
    _finish_axes(time_axes, experiment)
    by_anchors_axes.set_xlabel('anchors stored during the epoch')
    by_anchors_axes.set_ylabel('mean training time per epoch (s)')
    by_anchors_axes.xaxis.get_major_locator().set_params(integer=True)
    by_anchors_axes.set_title('first epoch (compilation) left out', fontsize='small')
    by_anchors_axes.legend(fontsize='small')
    by_anchors_axes.grid(alpha=0.3)
    return figure


def mean_epoch_time_by_anchors(runs: Sequence[Run]) -> dict[int, float]:
    """Mean ``epoch_time`` over the epochs trained with k anchors stored, by k.

    An epoch trains with the anchors stored by the end of the epoch before (its
    record's ``anchors`` counts one stored at its own end too). The first record
    of a run is left out: that epoch's time includes compiling the step. (So
    does the first epoch after a run resumes, which the records do not show.)

    Returns:
      k to the mean over every such epoch of every run, in increasing k.
    """
    times: dict[int, list[float]] = {}
    for run in runs:
        for previous, record in itertools.pairwise(run.records):
            if record.get('epoch_time') is None:
                continue
            anchors = int(previous.get('anchors', 0))
            times.setdefault(anchors, []).append(float(record['epoch_time']))
    return {k: float(np.mean(times[k])) for k in sorted(times)}


def agreement_table(experiment: Experiment) -> str:
    """The runs' ``ensemble.json`` figures as a Markdown table, one row per label.

    Columns: seeds (with an ``ensemble.json``, of all that have trained),
    members, agreement (examples on which every member predicts the same class,
    of ``num_examples``), mean pairwise disagreement, ensemble accuracy, the
    best member's accuracy, and the ensemble's NLL and ECE. Over several seeds a
    cell is ``mean ± std`` (sample standard deviation). Accuracies are in %.
    """
    header = (
        'run',
        'seeds',
        'members',
        'agreement (examples)',
        'disagreement',
        'ensemble accuracy (%)',
        'best member accuracy (%)',
        'NLL',
        'ECE',
    )
    lines = [table_row(header), table_row(['---'] * len(header))]
    for label in experiment.labels:
        runs = experiment.runs_of(label)
        ensembles = [run.ensemble for run in runs if run.ensemble is not None]
        seeds = str(len(ensembles))
        if len(ensembles) < len(runs):
            seeds += f' of {len(runs)}'
        if not ensembles:
            lines.append(table_row([label, seeds] + [NO_VALUE] * (len(header) - 2)))
            continue
        lines.append(table_row([label, seeds, *_agreement_cells(ensembles)]))
    return '\n'.join(lines) + '\n'


# The figure function of each PNG plot kind.
FIGURES: dict[str, Callable[[Experiment], Figure]] = {
    'accuracy': accuracy_figure,
    'distance': distance_figure,
    'ensemble_accuracy': ensemble_accuracy_figure,
    'epoch_time': epoch_time_figure,
}


def output_path(out: str, experiment: str, kind: str) -> str:
    """Where the plot ``kind`` of ``experiment`` is written in ``out``."""
    extension = 'md' if kind in TABLE_KINDS else 'png'
    return os.path.join(out, f'{experiment}_{kind}.{extension}')


def render(experiment: Experiment, out: str) -> list[str]:
    """Writes every plot kind that ``experiment`` lists into ``out``.

    Returns:
      The paths written, in the order of the experiment's ``plots``.

    Raises:
      ExperimentInputError: if no run of the experiment has written an epoch.
    """
    if not any(run.records for run in experiment.runs):
        raise ExperimentInputError(
            f'experiment {experiment.name!r}: no run has written a '
            f'{metric_writers.METRICS_FILE} record yet.'
        )
    os.makedirs(out, exist_ok=True)
    paths = []
    for kind in experiment.plots:
        path = output_path(out, experiment.name, kind)
        if kind == 'agreement':
            with open(path, 'w') as file:
                file.write(agreement_table(experiment))
        else:
            figure = FIGURES[kind](experiment)
            figure.savefig(path, dpi=_DPI)
        paths.append(path)
    return paths


def run_notes(experiment: Experiment) -> list[str]:
    """One sentence per run that has no epochs yet or stopped before the last."""
    num_epochs = experiment.scale.get('num_epochs')
    notes = []
    for run in experiment.runs:
        if not run.records:
            notes.append(
                f'run {run.workdir} ({run.label}, seed {run.seed}) has no '
                f'{metric_writers.METRICS_FILE} records; it is left out.'
            )
        elif num_epochs is not None and run.records[-1]['epoch'] < num_epochs:
            notes.append(
                f'run {run.workdir} ({run.label}, seed {run.seed}) has '
                f'{run.records[-1]["epoch"]} of {num_epochs} epochs.'
            )
    return notes


def main(argv: Sequence[str] | None = None) -> None:
    """Renders the plots of the experiments the command line names.

    Bad input (a missing root or experiment, an unknown plot kind) ends the
    command with exit status 2 and one ``error: ...`` line on stderr.
    """
    args = _parser().parse_args(argv)
    try:
        names = select_experiments(args.root, args.experiments)
        experiments = [load_experiment(args.root, name) for name in names]
        for experiment in experiments:
            for note in run_notes(experiment):
                print(f'warning: {experiment.name}: {note}', file=sys.stderr)
            for path in render(experiment, args.out):
                print(f'wrote {path}')
    except ExperimentInputError as err:
        cli.exit_with_error(str(err))


def table_row(cells: Iterable[str]) -> str:
    """One row of a Markdown table."""
    return '| ' + ' | '.join(str(cell) for cell in cells) + ' |'


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Plots the experiments of a root folder.'
    )
    parser.add_argument('--root', required=True, help='Folder of the experiments.')
    parser.add_argument('--out', required=True, help='Folder to write the plots to.')
    parser.add_argument(
        '--experiments', default='', help='Comma-separated names; default all.'
    )
    return parser


def _load_run(directory: str, path: str, index: int, spec: Any) -> Run:
    """One entry of ``runs`` in ``experiment.json`` and its run directory."""
    where = f'{path}: runs[{index}]'
    if not isinstance(spec, dict):
        raise ExperimentInputError(f'{where} must be a JSON object.')
    missing = [key for key in ('label', 'seed', 'workdir') if key not in spec]
    if missing:
        raise ExperimentInputError(f'{where} has no {missing[0]!r}.')
    run_path = os.path.join(directory, spec['workdir'])
    ensemble_path = os.path.join(run_path, ENSEMBLE_FILE)
    ensemble = None
    if os.path.isfile(ensemble_path):
        ensemble = _read_json(ensemble_path, where)
    return Run(
        label=str(spec['label']),
        seed=int(spec['seed']),
        workdir=str(spec['workdir']),
        path=run_path,
        anchor_epochs=tuple(int(e) for e in spec.get('anchor_epochs') or ()),
        snapshot_epochs=tuple(int(e) for e in spec.get('snapshot_epochs') or ()),
        overrides=dict(spec.get('overrides') or {}),
        records=metric_writers.read_metrics(run_path),
        ensemble=ensemble,
    )


def _read_json(path: str, where: str) -> Any:
    try:
        with open(path) as file:
            return json.load(file)
    except json.JSONDecodeError as err:
        raise ExperimentInputError(f'{where}: {path} is not JSON ({err}).') from err


def _new_figure(experiment: Experiment, what: str, panels: int = 1) -> Figure:
    """An empty figure titled with the experiment, its model, data and scale."""
    width = 7.0 if panels <= 1 else 5.5 * panels
    figure = Figure(figsize=(width, 4.8), layout='constrained')
    title = experiment.name
    if experiment.title != experiment.name:
        title += f': {experiment.title}'
    title += f' — {what}'
    # About 11 characters of the title's font per inch of the figure.
    title = textwrap.fill(title, width=int(11 * width))
    scale = describe_scale(experiment.scale)
    figure.suptitle(f'{title}\n{scale}' if scale else title, fontsize='medium')
    return figure


def _colors(experiment: Experiment) -> dict[str, str]:
    """A colour per label, the same in every figure of the experiment."""
    return {label: f'C{index % 10}' for index, label in enumerate(experiment.labels)}


def _plot_curve(axes: Axes, line: Curve, color: str, label: str) -> None:
    """The mean as a line; a min–max band where several seeds have the value."""
    axes.plot(line.epochs, line.mean, color=color, label=label, gid='curve')
    if line.counts.size and line.counts.max() > 1:
        axes.fill_between(
            line.epochs, line.low, line.high, color=color, alpha=0.2, linewidth=0
        ).set_gid('band')


def _mark_epochs(axes: Axes, experiment: Experiment, colors: dict[str, str]) -> None:
    """Dotted vertical lines after which anchors are stored or snapshots saved."""
    anchors, snapshots = {}, {}
    for label in experiment.labels:
        runs = [run for run in experiment.runs if run.label == label]
        anchor_epochs = {epoch for run in runs for epoch in run.anchor_epochs}
        snapshot_epochs = {epoch for run in runs for epoch in run.snapshot_epochs}
        anchors[label] = anchor_epochs
        snapshots[label] = snapshot_epochs - anchor_epochs
    for kind, epochs, color, text in (
        ('anchor', anchors, _ANCHOR_COLOR, 'anchor stored'),
        ('snapshot', snapshots, _SNAPSHOT_COLOR, 'snapshot saved'),
    ):
        if not any(epochs.values()):
            continue
        width = 1.2 if kind == 'anchor' else 0.9
        if len({frozenset(value) for value in epochs.values()}) == 1:
            groups = [(color, next(iter(epochs.values())))]
        else:
            groups = [(colors[label], epochs[label]) for label in epochs]
            # The lines take their label's colour; the legend names the kind once.
            axes.plot(
                [],
                [],
                color=color,
                linestyle=':',
                linewidth=width,
                gid='key',
                label=f"{text} (in its label's colour)",
            )
            text = '_nolegend_'
        for group_color, group_epochs in groups:
            for epoch in sorted(group_epochs):
                axes.axvline(
                    epoch,
                    color=group_color,
                    linestyle=':',
                    linewidth=width,
                    gid=kind,
                    label=text,
                )
                text = '_nolegend_'


def _epoch_limits(experiment: Experiment) -> tuple[float, float]:
    """The x limits that show every epoch of every run, with a margin."""
    epochs = [record['epoch'] for run in experiment.runs for record in run.records]
    first, last = min(epochs), max(epochs)
    margin = 0.05 * max(last - first, 1)
    return first - margin, last + margin


def _set_epoch_axis(axes: Axes, experiment: Experiment) -> None:
    """Labels the x axis with epochs (and study epochs), at whole epochs."""
    per_epoch = experiment.scale.get('study_epochs_per_epoch')
    label = 'epoch'
    if per_epoch is not None and per_epoch != 1:
        label = f'epoch (1 epoch = {per_epoch:g} study epochs)'
    axes.set_xlabel(label)
    axes.xaxis.get_major_locator().set_params(integer=True)


def _finish_axes(axes: Axes, experiment: Experiment) -> None:
    """Legend (noting the seed band when there is one) and a light grid."""
    several = any(len(experiment.runs_of(label)) > 1 for label in experiment.labels)
    title = 'mean over seeds, band: min–max' if several else None
    axes.legend(fontsize='small', title=title, title_fontsize='small')
    axes.grid(alpha=0.3)


def _no_data(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha='center', va='center', transform=axes.transAxes)
    axes.set_axis_off()


def _agreement_cells(ensembles: list[dict[str, Any]]) -> list[str]:
    """The table cells after ``run`` and ``seeds`` for one label's ``ensemble.json``."""
    members = {tuple(str(member) for member in e['members']) for e in ensembles}
    if len(members) == 1:
        only = next(iter(members))
        members_cell = f'{len(only)} ({", ".join(only)})'
    else:
        counts = sorted({len(member_list) for member_list in members})
        members_cell = '–'.join(str(count) for count in (counts[0], counts[-1]))

    num_examples = sorted({int(e['num_examples']) for e in ensembles})
    of = '–'.join(str(n) for n in dict.fromkeys((num_examples[0], num_examples[-1])))
    agreement = format_spread(
        spread(e['agreement'] for e in ensembles), digits=1 if len(ensembles) > 1 else 0
    )
    fraction = format_spread(
        spread(e['agreement'] / e['num_examples'] for e in ensembles), scale=100.0
    )
    disagreement = [e['disagreement'] for e in ensembles]
    disagreement_cell = (
        NO_VALUE
        if any(value is None for value in disagreement)
        else format_spread(spread(disagreement), digits=4)
    )
    return [
        members_cell,
        f'{agreement} of {of} ({fraction} %)',
        disagreement_cell,
        format_spread(spread(e['ensemble_accuracy'] for e in ensembles), scale=100.0),
        format_spread(
            spread(max(e['member_accuracy']) for e in ensembles), scale=100.0
        ),
        format_spread(spread(e['nll'] for e in ensembles), digits=4),
        format_spread(spread(e['ece'] for e in ensembles), digits=4),
    ]


if __name__ == '__main__':
    main()
