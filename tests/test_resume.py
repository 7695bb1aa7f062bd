"""Reliability of real runs: resume after SIGKILL, divergence, refused workdirs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from ml_collections import config_dict

from configs import default
from landscape_jax import checkpoints, metric_writers, train

REPO = pathlib.Path(__file__).resolve().parents[1]
# Wall-clock figures differ between runs; everything else must match exactly.
TIMINGS = ('epoch_time', 'eval_time')


def _overrides(data_dir: str) -> list[str]:
    return [
        '--config=configs/default.py',
        '--config.data.name=landscape_tiny',
        f'--config.data.data_dir={data_dir}',
        '--config.num_epochs=4',
        '--config.batch_size=16',
        '--config.eval_batch_size=64',
        '--config.distance.anchor_epochs=(1,3)',
        '--config.distance.strength=10',
        '--config.distance.width=10',
    ]


def _main_command(workdir: pathlib.Path, data_dir: str) -> list[str]:
    return [
        sys.executable,
        '-m',
        'landscape_jax.main',
        f'--workdir={workdir}',
        *_overrides(data_dir),
    ]


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2')


def test_run_killed_mid_epoch_resumes_to_identical_metrics(tmp_path, tiny_data_dir):
    reference_dir, killed_dir = tmp_path / 'reference', tmp_path / 'killed'
    subprocess.run(
        _main_command(reference_dir, tiny_data_dir),
        cwd=REPO,
        env=_env(),
        check=True,
        capture_output=True,
    )

    process = subprocess.Popen(
        _main_command(killed_dir, tiny_data_dir),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 900
        while len(metric_writers.read_metrics(killed_dir)) < 2:
            assert process.poll() is None, 'the run ended before it could be killed'
            assert time.monotonic() < deadline, 'the run made no progress'
            time.sleep(0.05)
        time.sleep(0.5)  # Into epoch 3, which takes seconds here.
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    interrupted = metric_writers.read_metrics(killed_dir)
    assert [r['epoch'] for r in interrupted] == [1, 2]

    subprocess.run(
        _main_command(killed_dir, tiny_data_dir),
        cwd=REPO,
        env=_env(),
        check=True,
        capture_output=True,
    )

    reference = metric_writers.read_metrics(reference_dir)
    resumed = metric_writers.read_metrics(killed_dir)
    assert [r['epoch'] for r in resumed] == [1, 2, 3, 4]
    assert _without_timings(resumed) == _without_timings(reference)
    assert checkpoints.snapshot_epochs(killed_dir) == [1, 3]


def _config(data_dir: str, **changes) -> config_dict.ConfigDict:
    config = default.get_config()
    config.data.name = 'landscape_tiny'
    config.data.data_dir = data_dir
    config.num_epochs = 3
    config.batch_size = 64
    config.eval_batch_size = 64
    config.distance.anchor_epochs = (1,)
    for name, value in changes.items():
        config[name] = value
    return config


def test_diverging_run_stops_and_keeps_its_checkpoints(tmp_path, tiny_data_dir):
    config = _config(tiny_data_dir)
    train.train_and_evaluate(config, str(tmp_path), allow_config_change=True)

    config.num_epochs = 5
    config.optimizer.learning_rate = 1e12
    with pytest.raises(FloatingPointError, match='diverged in epoch 4'):
        train.train_and_evaluate(config, str(tmp_path), allow_config_change=True)

    records = metric_writers.read_metrics(str(tmp_path))
    assert [r['epoch'] for r in records] == [1, 2, 3]
    assert checkpoints.snapshot_epochs(str(tmp_path)) == [1]
    snapshot = checkpoints.load_snapshot(str(tmp_path), 1)
    assert snapshot.meta['epoch'] == 1
    # The last good state still loads: resuming with a sane rate carries on.
    config.optimizer.learning_rate = 0.01
    train.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
    assert [r['epoch'] for r in metric_writers.read_metrics(str(tmp_path))] == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_workdir_of_another_config_is_refused(tmp_path, tiny_data_dir):
    config = _config(tiny_data_dir, num_epochs=1)
    train.train_and_evaluate(config, str(tmp_path))
    (tmp_path / 'marker').write_text('')

    config.distance.strength = 5.0
    with pytest.raises(ValueError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert 'distance.strength (1.0 -> 5.0)' in message
    assert '\n' not in message
    recorded = json.loads((tmp_path / 'config.json').read_text())
    assert recorded['distance']['strength'] == 1.0


def test_same_config_and_seed_give_the_same_metrics(tmp_path, tiny_data_dir):
    config = _config(tiny_data_dir, num_epochs=2)
    train.train_and_evaluate(config, str(tmp_path / 'first'))
    train.train_and_evaluate(config, str(tmp_path / 'second'))
    config.seed = 1
    train.train_and_evaluate(config, str(tmp_path / 'other_seed'))

    first, second, other = (
        _without_timings(metric_writers.read_metrics(str(tmp_path / name)))
        for name in ('first', 'second', 'other_seed')
    )
    assert first == second
    assert first != other


def test_damaged_or_missing_snapshot_is_named(tmp_path, tiny_data_dir):
    train.train_and_evaluate(_config(tiny_data_dir, num_epochs=1), str(tmp_path))
    snapshot_dir = tmp_path / 'snapshots' / '1'

    with pytest.raises(
        FileNotFoundError, match='No snapshot of epoch 2 .* epochs \\[1\\]'
    ):
        checkpoints.load_snapshot(str(tmp_path), 2)

    for path in (snapshot_dir / 'model').rglob('*'):
        if path.is_file() and path.parent.name == 'd':
            path.write_bytes(b'damaged')
    with pytest.raises(checkpoints.DamagedSnapshotError, match=str(snapshot_dir)):
        checkpoints.load_snapshot(str(tmp_path), 1)


def test_unfinished_saves_are_ignored_on_resume(tmp_path, tiny_data_dir):
    config = _config(tiny_data_dir, num_epochs=2)
    train.train_and_evaluate(config, str(tmp_path))
    finished = metric_writers.read_metrics(str(tmp_path))
    # What a kill during the saves of epoch 3 leaves: orbax's temporary
    # directory of the training state, and half a line of metrics.
    unfinished = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1234'
    unfinished.mkdir()
    (unfinished / 'params').write_bytes(b'partial')
    with (tmp_path / 'metrics.jsonl').open('a') as file:
        file.write('{"epoch": 3, "train_lo')

    config.num_epochs = 3
    train.train_and_evaluate(config, str(tmp_path), allow_config_change=True)

    records = metric_writers.read_metrics(str(tmp_path))
    assert [r['epoch'] for r in records] == [1, 2, 3]
    assert records[:2] == finished
