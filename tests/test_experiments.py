"""The experiments runner: the study's epochs scaled down, configs, one real run."""

import json
import os

import pytest

from experiments import run as runner
from landscape_jax import config_validation, conv, schedules

SMALL = {
    'name': 'small',
    'num_epochs': 12,
    'model': 'resnet8',
    'data': 'mnist5k',
    'data_dir': '/data',
    'train_split': 'train[:50%]',
    'eval_split': 'test',
}
FULL = dict(SMALL, name='full', num_epochs=600, model='resnet32', data='cifar10')


def _tiny_scale(data_dir: str, num_epochs: int) -> dict:
    """The small scale on the tests' tiny data set, trained on all of it."""
    return dict(
        SMALL,
        num_epochs=num_epochs,
        data='landscape_tiny',
        data_dir=data_dir,
        train_split='train',
    )


@pytest.mark.parametrize(
    'epoch, num_epochs, expected',
    [
        (100, 12, 2),
        (150, 12, 3),
        (450, 12, 9),
        (50, 12, 1),
        (100, 600, 100),
        (1, 12, 1),
    ],
)
def test_scaled_epoch(epoch, num_epochs, expected):
    assert runner.scaled_epoch(epoch, num_epochs) == expected


@pytest.mark.parametrize('scale', [SMALL, FULL], ids=['small', 'full'])
def test_every_run_of_every_experiment_is_a_valid_config(scale):
    for experiment in runner.EXPERIMENTS.values():
        for run in experiment.runs:
            config = runner.build_config(run, seed=3, scale=scale)
            config_validation.validate_config(config)
            assert config.seed == 3
            assert config.num_epochs == scale['num_epochs']
            assert config.model.name == scale['model']
            assert config.data.name == scale['data']
            assert config.data.train_split == 'train[:50%]'


def test_small_scale_divides_every_epoch_field():
    runs = {run.label: run for run in runner.EXPERIMENTS['multi_anchor'].runs}
    multi = runner.build_config(runs['s = 100'], 0, SMALL)
    cosine = runner.build_config(runs['cosine restarts, no penalty'], 0, SMALL)
    step_run = runner.EXPERIMENTS['schedules'].runs[1]
    step = runner.build_config(step_run, 0, SMALL)

    assert tuple(multi.distance.anchor_epochs) == (3, 6, 9)
    assert multi.distance.strength == 100.0
    assert cosine.schedule.period_epochs == 3
    assert schedules.cycle_end_epochs(cosine, 12) == (3, 6, 9, 12)
    assert (step.schedule.decay_epochs, step.schedule.restart_epochs) == (1, 3)
    assert tuple(step.distance.anchor_epochs) == (2,)
    assert step.distance.strength == 0.0


def test_full_scale_is_the_study_setup():
    baseline = runner.build_config(runner.EXPERIMENTS['baseline'].runs[1], 0, FULL)

    assert baseline.num_epochs == 600
    assert tuple(baseline.distance.anchor_epochs) == (100,)
    assert (baseline.distance.strength, baseline.distance.width) == (1.0, 1000.0)
    assert baseline.optimizer.learning_rate == 0.01
    assert baseline.schedule.restart_epochs == 150


def test_runs_differing_in_sweepable_fields_are_grouped():
    def groups(name):
        jobs = [
            (runner.build_config(run, seed, SMALL), f'{run.label}/{seed}')
            for run in runner.EXPERIMENTS[name].runs
            for seed in (0, 1)
        ]
        return [[workdir for _, workdir in group] for group in runner._groups(jobs)]

    assert len(groups('strength')) == 1
    assert len(groups('width')) == 1
    # Constant, step and cosine schedules cannot share a program.
    assert len(groups('schedules')) == 3
    # Each holds the two seeds of one schedule.
    assert all(len(group) == 2 for group in groups('schedules'))


def test_labels_make_distinct_folders():
    for experiment in runner.EXPERIMENTS.values():
        slugs = [runner._slug(run.label) for run in experiment.runs]
        assert len(set(slugs)) == len(slugs)
        assert all(slug and '/' not in slug and ' ' not in slug for slug in slugs)


def test_baseline_experiment_runs_end_to_end(tiny_data_dir, tmp_path):
    scale = _tiny_scale(tiny_data_dir, num_epochs=2)

    manifest = runner.run_experiment(
        'baseline', str(tmp_path), seeds=[0], scale=scale, agreement=True
    )

    folder = tmp_path / 'baseline'
    assert json.loads((folder / 'experiment.json').read_text()) == manifest
    assert [run['label'] for run in manifest['runs']] == [
        'no penalty',
        's = 1, σ² = 1000',
    ]
    assert manifest['scale']['study_epochs_per_epoch'] == 300
    for entry in manifest['runs']:
        workdir = folder / entry['workdir']
        records = [
            json.loads(line)
            for line in (workdir / 'metrics.jsonl').read_text().splitlines()
        ]
        assert [record['epoch'] for record in records] == [1, 2]
        # The anchor is stored after epoch 1 (study epoch 100 of 600 at 2 epochs).
        assert entry['anchor_epochs'] == [1]
        assert records[0]['distance/0'] == 0.0 < records[1]['distance/0']
        figures = json.loads((workdir / 'ensemble.json').read_text())
        assert figures['members'] == [1, 'final']
        assert figures['member_accuracy'][0] == pytest.approx(
            records[0]['eval_accuracy'], abs=1e-6
        )
    penalties = [
        json.loads(
            (folder / e['workdir'] / 'metrics.jsonl').read_text().splitlines()[1]
        )['penalty']
        for e in manifest['runs']
    ]
    assert penalties[0] == 0.0 < penalties[1]


def test_vectorized_runs_match_the_same_runs_one_after_another(
    tiny_data_dir, tmp_path, monkeypatch
):
    scale = _tiny_scale(tiny_data_dir, num_epochs=2)
    # One convolution library for sweeps and single runs (see test_sweep.py).
    monkeypatch.setattr(conv, 'compiler_options', lambda *args, **kwargs: {})
    swept = []
    train_sweep = runner.sweep.train_and_evaluate_sweep

    def spy(configs, workdirs):
        swept.append(workdirs)
        return train_sweep(configs, workdirs)

    monkeypatch.setattr(runner.sweep, 'train_and_evaluate_sweep', spy)

    manifests = {
        vectorize: runner.run_experiment(
            'baseline',
            str(tmp_path / vectorize),
            seeds=[0],
            scale=scale,
            vectorize=vectorize,
            agreement=True,
        )
        for vectorize in ('always', 'never')
    }

    # Both runs (no penalty and s = 1) were one vectorized program.
    assert [len(workdirs) for workdirs in swept] == [2]
    assert manifests['always']['runs'] == manifests['never']['runs']
    for entry in manifests['always']['runs']:
        folders = {
            vectorize: tmp_path / vectorize / 'baseline' / entry['workdir']
            for vectorize in manifests
        }
        records = {
            vectorize: [
                json.loads(line)
                for line in (folder / 'metrics.jsonl').read_text().splitlines()
            ]
            for vectorize, folder in folders.items()
        }
        assert [r['epoch'] for r in records['always']] == [1, 2]
        # A vmapped convolution is a grouped one that sums in another order; the
        # drift after 32 steps is about 1e-3 of the eval loss.
        for vectorized, sequential in zip(
            records['always'], records['never'], strict=True
        ):
            for key in ('train_loss', 'eval_loss', 'penalty', 'distance/0'):
                if key in sequential:
                    assert vectorized[key] == pytest.approx(
                        sequential[key], rel=2e-3, abs=1e-6
                    ), key
        figures = {
            vectorize: json.loads((folder / 'ensemble.json').read_text())
            for vectorize, folder in folders.items()
        }
        assert (
            figures['always']['members']
            == figures['never']['members']
            == [
                1,
                'final',
            ]
        )
        # One example of the evaluation split may fall the other way.
        assert figures['always']['ensemble_accuracy'] == pytest.approx(
            figures['never']['ensemble_accuracy'],
            abs=1.0 / figures['never']['num_examples'] + 1e-6,
        )


def test_rerunning_a_finished_experiment_trains_nothing(tiny_data_dir, tmp_path):
    scale = dict(SMALL, num_epochs=1, data='landscape_tiny', data_dir=tiny_data_dir)
    runner.run_experiment('epoch_time', str(tmp_path), seeds=[0], scale=scale)
    metrics = tmp_path / 'epoch_time' / 'no_anchors' / 'seed0' / 'metrics.jsonl'
    before = metrics.read_text()

    runner.run_experiment('epoch_time', str(tmp_path), seeds=[0], scale=scale)

    assert metrics.read_text() == before
    assert os.path.exists(tmp_path / 'epoch_time' / 'experiment.json')


def test_command_line_errors_exit_2(capsys):
    for argv, message in [
        (['--root=/tmp/x'], '--experiment is required'),
        (['--experiment=baseline'], '--root is required'),
        (['--experiment=baseline', '--root=/tmp/x', '--seeds=0'], '--seeds must be'),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            runner.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_list_names_every_experiment(capsys):
    runner.main(['--list'])

    out = capsys.readouterr().out
    assert all(name in out for name in runner.EXPERIMENTS)
