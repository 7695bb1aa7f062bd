"""experiments/plot.py and experiments/results.py on a hand-made experiments root."""

import json
import os

import numpy as np
import pytest

from experiments import plot, results

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
SCALE = {
    'name': 'small',
    'num_epochs': 4,
    'study_epochs_per_epoch': 150.0,
    'model': 'resnet8',
    'data': 'mnist5k',
    'train_split': 'train',
    'eval_split': 'test',
}
# Per label and seed, per epoch 1..4: eval accuracy, ‖θ − θ_0‖ (from the anchor's
# epoch 2 on), ensemble accuracy (from the first snapshot, epoch 2), epoch time (s).
EVAL_ACCURACY = {
    ('s = 10', 0): [0.5, 0.6, 0.7, 0.8],
    ('s = 10', 1): [0.4, 0.6, 0.8, 0.9],
    ('s = 10', 2): [0.6, 0.6, 0.6, 0.7],
    ('s = 1', 0): [0.3, 0.5, 0.65, 0.75],
}
DISTANCE = {
    ('s = 10', 0): [0.0, 1.0, 2.0],
    ('s = 10', 1): [0.0, 2.0, 4.0],
    ('s = 10', 2): [0.0, 3.0, 3.0],
    ('s = 1', 0): [0.0, 0.5, 1.0],
}
ENSEMBLE_ACCURACY = {
    ('s = 10', 0): [0.6, 0.75, 0.85],
    ('s = 10', 1): [0.6, 0.85, 0.95],
    ('s = 10', 2): [0.6, 0.65, 0.75],
    ('s = 1', 0): [0.5, 0.7, 0.8],
}
EPOCH_TIME = {
    ('s = 10', 0): [30.0, 2.0, 3.0, 3.5],
    ('s = 10', 1): [31.0, 2.5, 3.0, 4.0],
    ('s = 10', 2): [29.0, 1.5, 3.5, 4.5],
    ('s = 1', 0): [30.0, 2.0, 2.5, 2.5],
}
ANCHOR_EPOCHS = [2]
SNAPSHOT_EPOCHS = [2, 4]
# ensemble.json of the seeds of 's = 10'; 's = 1' has none.
ENSEMBLES = {
    0: {
        'members': [2, 4],
        'member_accuracy': [0.6, 0.8],
        'ensemble_accuracy': 0.85,
        'num_examples': 1000,
        'agreement': 800,
        'agreement_fraction': 0.8,
        'disagreement': 0.2,
        'nll': 0.5,
        'ece': 0.05,
    },
    1: {
        'members': [2, 4],
        'member_accuracy': [0.6, 0.9],
        'ensemble_accuracy': 0.95,
        'num_examples': 1000,
        'agreement': 850,
        'agreement_fraction': 0.85,
        'disagreement': 0.15,
        'nll': 0.3,
        'ece': 0.03,
    },
    2: {
        'members': [2, 4],
        'member_accuracy': [0.6, 0.7],
        'ensemble_accuracy': 0.75,
        'num_examples': 1000,
        'agreement': 900,
        'agreement_fraction': 0.9,
        'disagreement': 0.1,
        'nll': 0.7,
        'ece': 0.07,
    },
}
STUDY_RESULTS = [
    {
        'quantity': 'final eval accuracy',
        'run': 's = 10',
        'value': 0.89,
        'model': 'ResNet32',
    },
    {
        'quantity': 'snapshot ensemble accuracy',
        'run': 's = 10',
        'value': 0.915,
        'metric': 'ensemble_accuracy',
    },
    {
        'quantity': 'fraction of examples all members agree on',
        'run': 's = 10',
        'value': 0.77,
        'metric': 'agreement_fraction',
    },
]
COMMAND = 'python experiments/run.py --experiment=strength --scale=small'


@pytest.fixture(scope='module')
def root(tmp_path_factory) -> str:
    """Two experiments: 'strength' (every plot kind) and 'placement'."""
    root = tmp_path_factory.mktemp('experiments')
    runs = []
    for (label, seed), accuracy in EVAL_ACCURACY.items():
        workdir = f'{label.replace(" = ", "")}/seed{seed}'
        runs.append(_run_spec(label, seed, workdir, ANCHOR_EPOCHS, SNAPSHOT_EPOCHS))
        records = []
        for index, epoch in enumerate(range(1, 5)):
            record = {
                'epoch': epoch,
                'eval_accuracy': accuracy[index],
                'eval_loss': 1.0,
                'train_loss': 1.0,
                'train_accuracy': 0.5,
                'penalty': 0.0,
                'learning_rate': 0.01,
                'epoch_time': EPOCH_TIME[label, seed][index],
                'anchors': int(epoch >= 2),
            }
            if epoch >= 2:
                record['distance/0'] = DISTANCE[label, seed][index - 1]
                record['ensemble_accuracy'] = ENSEMBLE_ACCURACY[label, seed][index - 1]
            records.append(record)
        ensemble = ENSEMBLES[seed] if label == 's = 10' else None
        _write_run(root / 'strength' / workdir, records, ensemble)
    _write_json(
        root / 'strength' / 'experiment.json',
        {
            'name': 'strength',
            'title': 'Penalty strength s with one anchor',
            'study_section': '4.2.1',
            'study_figures': ['4.2'],
            'plots': list(plot.PLOT_KINDS),
            'scale': SCALE,
            'study_results': STUDY_RESULTS,
            'command': COMMAND,
            'device': 'cpu',
            'runs': runs,
        },
    )

    # Labels with their own anchor epochs, and a run that has not started.
    placement_runs = [
        _run_spec('early', 0, 'early', [1], [1]),
        _run_spec('late', 0, 'late', [3], [3]),
        _run_spec('late', 1, 'late1', [3], [3]),
    ]
    for name in ('early', 'late'):
        records = [
            {'epoch': epoch, 'eval_accuracy': 0.1 * epoch, 'anchors': 0}
            for epoch in range(1, 5)
        ]
        _write_run(root / 'placement' / name, records, None)
    _write_json(
        root / 'placement' / 'experiment.json',
        {'name': 'placement', 'plots': ['accuracy'], 'runs': placement_runs},
    )
    return str(root)


@pytest.fixture(scope='module')
def strength(root) -> plot.Experiment:
    return plot.load_experiment(root, 'strength')


@pytest.fixture(scope='module')
def figures(root, tmp_path_factory) -> str:
    """The folder that `plot.py --root=root` writes."""
    out = tmp_path_factory.mktemp('figures')
    plot.main([f'--root={root}', f'--out={out}'])
    return out


def test_command_writes_every_listed_plot(figures):
    kinds = [kind for kind in plot.PLOT_KINDS if kind != 'agreement']
    expected = [f'strength_{kind}.png' for kind in kinds]
    expected += ['strength_agreement.md', 'placement_accuracy.png']
    assert sorted(os.listdir(figures)) == sorted(expected)
    for name in expected:
        content = (figures / name).read_bytes()
        assert content
        if name.endswith('.png'):
            assert content.startswith(PNG_SIGNATURE)


def test_experiments_flag_selects(root, tmp_path, capsys):
    out = tmp_path / 'figures'
    plot.main([f'--root={root}', f'--out={out}', '--experiments=placement'])
    assert os.listdir(out) == ['placement_accuracy.png']
    # Its run without metrics is named on stderr.
    assert capsys.readouterr().err == (
        'warning: placement: run late1 (late, seed 1) has no metrics.jsonl '
        'records; it is left out.\n'
    )


def test_curve_means_and_bands(strength):
    line = plot.curve(strength.runs_of('s = 10'), 'eval_accuracy', 100.0)
    seeds = np.array([EVAL_ACCURACY['s = 10', seed] for seed in range(3)]) * 100
    np.testing.assert_array_equal(line.epochs, [1, 2, 3, 4])
    np.testing.assert_allclose(line.mean, seeds.mean(axis=0))
    np.testing.assert_allclose(line.low, seeds.min(axis=0))
    np.testing.assert_allclose(line.high, seeds.max(axis=0))
    np.testing.assert_array_equal(line.counts, [3, 3, 3, 3])

    # Keys written from a later epoch on start there.
    distance = plot.curve(strength.runs_of('s = 10'), 'distance/0')
    np.testing.assert_array_equal(distance.epochs, [2, 3, 4])
    np.testing.assert_allclose(distance.mean, [0.0, 2.0, 3.0])


def test_accuracy_figure(strength):
    axes = plot.accuracy_figure(strength).axes[0]

    curves = {
        line.get_label(): line for line in axes.get_lines() if _gid(line, 'curve')
    }
    assert list(curves) == ['s = 10', 's = 1']
    np.testing.assert_allclose(curves['s = 10'].get_ydata(), [50.0, 60.0, 70.0, 80.0])
    np.testing.assert_allclose(curves['s = 1'].get_ydata(), [30.0, 50.0, 65.0, 75.0])
    assert _vertical_lines(axes, 'anchor') == [2.0]
    assert _vertical_lines(axes, 'snapshot') == [4.0]
    assert all(
        line.get_linestyle() == ':' for line in axes.get_lines() if _gid(line, 'anchor')
    )

    # One band, for the label with several seeds, from their minimum to maximum.
    (band,) = [item for item in axes.collections if _gid(item, 'band')]
    vertices = band.get_paths()[0].vertices
    for epoch, low, high in [(1, 40, 60), (2, 60, 60), (3, 60, 80), (4, 70, 90)]:
        at_epoch = vertices[np.isclose(vertices[:, 0], epoch), 1]
        assert at_epoch.min() == pytest.approx(low)
        assert at_epoch.max() == pytest.approx(high)

    assert axes.get_xlabel() == 'epoch (1 epoch = 150 study epochs)'
    assert axes.get_ylabel() == 'eval accuracy (%)'
    assert axes.get_legend() is not None
    title = axes.figure.get_suptitle()
    assert 'strength' in title
    assert 'resnet8 on mnist5k, 4 epochs, 1 epoch = 150 study epochs' in title
    assert 'scale small' in title


def test_anchor_lines_per_label_when_labels_differ(root):
    experiment = plot.load_experiment(root, 'placement')
    axes = plot.accuracy_figure(experiment).axes[0]
    colors = {
        line.get_label(): line.get_color()
        for line in axes.get_lines()
        if _gid(line, 'curve')
    }
    anchors = [line for line in axes.get_lines() if _gid(line, 'anchor')]
    assert {(line.get_xdata()[0], line.get_color()) for line in anchors} == {
        (1, colors['early']),
        (3, colors['late']),
    }


def test_distance_figure(strength):
    (axes,) = plot.distance_figure(strength).axes
    curves = {
        line.get_label(): line for line in axes.get_lines() if _gid(line, 'curve')
    }
    assert list(curves) == ['s = 10', 's = 1']
    np.testing.assert_array_equal(curves['s = 10'].get_xdata(), [2, 3, 4])
    np.testing.assert_allclose(curves['s = 10'].get_ydata(), [0.0, 2.0, 3.0])
    np.testing.assert_allclose(curves['s = 1'].get_ydata(), DISTANCE['s = 1', 0])
    assert _vertical_lines(axes, 'anchor') == [2.0]
    assert 'θ_0' in axes.get_ylabel()


def test_ensemble_accuracy_figure(strength):
    axes = plot.ensemble_accuracy_figure(strength).axes[0]
    curves = {
        line.get_label(): line for line in axes.get_lines() if _gid(line, 'curve')
    }
    assert list(curves) == ['s = 10', 's = 1']
    np.testing.assert_allclose(curves['s = 10'].get_ydata(), [60.0, 75.0, 85.0])
    singles = [line for line in axes.get_lines() if _gid(line, 'single')]
    assert len(singles) == 2
    np.testing.assert_allclose(singles[0].get_ydata(), [50.0, 60.0, 70.0, 80.0])
    assert singles[0].get_linewidth() < curves['s = 10'].get_linewidth()
    assert singles[0].get_color() == curves['s = 10'].get_color()


def test_epoch_time_figure(strength):
    time_axes, by_anchors_axes, anchor_axes = plot.epoch_time_figure(strength).axes
    curves = {
        line.get_label(): line for line in time_axes.get_lines() if _gid(line, 'curve')
    }
    np.testing.assert_allclose(curves['s = 10'].get_ydata(), [30.0, 2.0, 9.5 / 3, 4.0])
    assert time_axes.get_ylabel() == 'training time per epoch (s)'
    stored = [line for line in anchor_axes.get_lines() if _gid(line, 'anchors')]
    np.testing.assert_allclose(stored[0].get_ydata(), [0, 1, 1, 1])

    # Epoch 2 trains with no anchor, epochs 3 and 4 with one; epoch 1 is left out.
    means = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in by_anchors_axes.get_lines()
        if _gid(line, 'curve')
    }
    assert means['s = 10'][0] == [0, 1]
    np.testing.assert_allclose(
        means['s = 10'][1], [2.0, (3 + 3.5 + 3 + 4 + 3.5 + 4.5) / 6]
    )
    np.testing.assert_allclose(means['s = 1'][1], [2.0, 2.5])
    assert by_anchors_axes.get_xlabel() == 'anchors stored during the epoch'


def test_agreement_table(strength):
    rows = [
        [cell.strip() for cell in line.strip('|').split('|')]
        for line in plot.agreement_table(strength).splitlines()
    ]
    header, _, ten, one = rows
    assert header[:4] == ['run', 'seeds', 'members', 'agreement (examples)']
    assert ten == [
        's = 10',
        '3',
        '2 (2, 4)',
        '850.0 ± 50.0 of 1000 (85.00 ± 5.00 %)',
        '0.1500 ± 0.0500',
        '85.00 ± 10.00',
        '80.00 ± 10.00',
        '0.5000 ± 0.2000',
        '0.0500 ± 0.0200',
    ]
    assert one[:2] == ['s = 1', '0 of 1']
    assert set(one[2:]) == {plot.NO_VALUE}


def test_results_page(root, figures, tmp_path):
    out = tmp_path / 'RESULTS.md'
    results.main([f'--root={root}', f'--figures={figures}', f'--out={out}'])
    page = out.read_text()

    assert 'resnet8 on mnist5k (written by `experiments/prepare_mnist5k.py`)' in page
    # In the study's order, experiments that are not the study's last.
    assert page.index('(`strength`)') < page.index('## placement')
    assert "scaled down from the study's 600-epoch CIFAR-10 runs" in page
    assert "4 epochs, each standing for 150 of the study's epochs" in page
    assert COMMAND in page
    assert f'python experiments/plot.py --root={root} --out={figures}' in page
    assert 'Study: section 4.2.1, figure 4.2.' in page
    assert '(scale small) (device: cpu).' in page

    # 's = 10': final eval accuracy 0.8, 0.9, 0.7; best the same; final distance
    # 2, 4, 3; final ensemble accuracy 0.85, 0.95, 0.75. 's = 1': one seed.
    ten = _row(page, '| s = 10 | 3 (0, 1, 2) |')
    assert ten[3:] == [
        '80.00 ± 10.00 (70.00–90.00)',
        '80.00 ± 10.00 (70.00–90.00)',
        '3.0000 ± 1.0000 (2.0000–4.0000)',
        '85.00 ± 10.00 (75.00–95.00)',
    ]
    assert _row(page, '| s = 1 | 1 (0) |')[3:] == ['75.00', '75.00', '1.0000', '80.00']

    # The study's numbers beside ours.
    assert _row(page, '| final eval accuracy |') == [
        'final eval accuracy',
        'ResNet32',
        's = 10',
        '`eval_accuracy`',
        '89.00',
        '80.00 ± 10.00 (70.00–90.00)',
        '3',
    ]
    assert _row(page, '| snapshot ensemble accuracy |')[4:6] == [
        '91.50',
        '85.00 ± 10.00 (75.00–95.00)',
    ]
    assert _row(page, '| fraction of examples all members agree on |')[4:6] == [
        '77.00',
        '85.00 ± 5.00 (80.00–90.00)',
    ]

    # Figures linked relative to the page; the agreement table inlined.
    folder = f'../{figures.name}'
    assert f'![strength: accuracy]({folder}/strength_accuracy.png)' in page
    assert f'![placement: accuracy]({folder}/placement_accuracy.png)' in page
    assert plot.agreement_table(plot.load_experiment(root, 'strength')) in page
    assert 'late1' in page  # the run without metrics is named


def test_errors(root, tmp_path, capsys):
    missing = tmp_path / 'missing'
    _assert_error(
        lambda: plot.main([f'--root={missing}', f'--out={tmp_path}']),
        capsys,
        f'error: --root={missing} is not a directory.',
    )
    _assert_error(
        lambda: plot.main([f'--root={root}', f'--out={tmp_path}', '--experiments=x']),
        capsys,
        f"error: experiment 'x': no {root}/x/experiment.json.",
    )
    _assert_error(
        lambda: plot.main([f'--root={tmp_path}', f'--out={tmp_path}']),
        capsys,
        f'error: --root={tmp_path} holds no experiment: no '
        f'{tmp_path}/<name>/experiment.json.',
    )

    bad = tmp_path / 'bad'
    _write_json(
        bad / 'kinds' / 'experiment.json',
        {'plots': ['accuracy', 'loss'], 'runs': [_run_spec('a', 0, 'a', [], [])]},
    )
    _assert_error(
        lambda: plot.main([f'--root={bad}', f'--out={tmp_path}']),
        capsys,
        f"error: {bad}/kinds/experiment.json: unknown plot kind 'loss'; the kinds "
        'are accuracy, distance, ensemble_accuracy, epoch_time, agreement.',
    )

    metric = tmp_path / 'metric'
    _write_run(metric / 'm' / 'a', [{'epoch': 1, 'eval_accuracy': 0.5}], None)
    _write_json(
        metric / 'm' / 'experiment.json',
        {
            'runs': [_run_spec('a', 0, 'a', [], [])],
            'study_results': [
                {'quantity': 'q', 'run': 'a', 'value': 1, 'metric': 'speed'}
            ],
        },
    )
    args = [f'--root={metric}', f'--figures={tmp_path}', f'--out={tmp_path}/R.md']
    _assert_error(
        lambda: results.main(args),
        capsys,
        "error: experiment 'm': study_results[0]: metric must be one of "
        f"{', '.join(results.METRICS)} or distance/<k>, got 'speed'.",
    )


def _run_spec(label, seed, workdir, anchor_epochs, snapshot_epochs) -> dict:
    return {
        'label': label,
        'seed': seed,
        'workdir': workdir,
        'anchor_epochs': anchor_epochs,
        'snapshot_epochs': snapshot_epochs,
        'overrides': {'distance.strength': 1.0},
    }


def _write_run(workdir, records: list[dict], ensemble: dict | None) -> None:
    workdir.mkdir(parents=True)
    lines = ''.join(json.dumps(record) + '\n' for record in records)
    (workdir / 'metrics.jsonl').write_text(lines)
    if ensemble is not None:
        _write_json(workdir / 'ensemble.json', ensemble)


def _write_json(path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _gid(artist, gid: str) -> bool:
    return artist.get_gid() == gid


def _vertical_lines(axes, gid: str) -> list[float]:
    """The x positions of the vertical lines with ``gid``, in increasing order."""
    lines = [line for line in axes.get_lines() if _gid(line, gid)]
    for line in lines:
        assert line.get_xdata()[0] == line.get_xdata()[1]
    return sorted(float(line.get_xdata()[0]) for line in lines)


def _row(page: str, start: str) -> list[str]:
    """The cells of the table row of ``page`` that starts with ``start``."""
    (line,) = [line for line in page.splitlines() if line.startswith(start)]
    return [cell.strip() for cell in line.strip('|').split('|')]


def _assert_error(call, capsys, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == message
