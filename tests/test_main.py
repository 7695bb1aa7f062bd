"""The main command end to end on mocked CIFAR-10: anchors, snapshots, resume."""

import json
import logging
import sys
from unittest import mock

import conftest
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from landscape_jax import checkpoints, ensemble, main, metric_writers, models, train

NUM_EXAMPLES = 96
# Compilations of the fused training step seen while making each run directory.
_STEP_COMPILATIONS = {}


def _run_main(workdir, *overrides: str) -> None:
    """Parses the command line as `python -m landscape_jax.main` would and runs it.

    ml_collections reads `--config.*` overrides from `sys.argv`, so it is set too.
    """
    argv = [
        'landscape_jax.main',
        '--config=configs/multi_ckpt.py',
        f'--workdir={workdir}',
        '--config.num_epochs=2',
        '--config.batch_size=32',
        '--config.eval_batch_size=64',
        '--config.distance.anchor_epochs=(1,2)',
        '--config.distance.strength=10',
        '--config.distance.width=10',
        *overrides,
    ]
    conftest.forget_config_overrides()
    flags.FLAGS.unparse_flags()
    with mock.patch.object(sys, 'argv', argv):
        remaining = flags.FLAGS(argv)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        main.main(remaining)


class _CompileCounter(logging.Handler):
    """Counts JAX's log records of compilations of the fused training step."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith('Compiling jit(fused_train_step)'):
            self.count += 1


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('run')
    counter = _CompileCounter()
    jax_logger = logging.getLogger('jax')
    jax_logger.addHandler(counter)
    try:
        with jax.log_compiles():
            _run_main(workdir)
    finally:
        jax_logger.removeHandler(counter)
    _STEP_COMPILATIONS[workdir] = counter.count
    return workdir


def test_one_compilation_serves_the_run(run_dir):
    # Two epochs and two anchors stored, one compiled training step.
    assert _STEP_COMPILATIONS[run_dir] == 1


def test_metrics_file_has_one_record_per_epoch(run_dir):
    records = metric_writers.read_metrics(run_dir)

    assert [r['epoch'] for r in records] == [1, 2]
    expected_keys = {
        'epoch',
        'learning_rate',
        'train_loss',
        'train_accuracy',
        'penalty',
        'l2',
        'objective',
        'grad_norm',
        'eval_loss',
        'eval_accuracy',
        'anchors',
        'epoch_time',
        'eval_time',
    }
    assert expected_keys <= set(records[0])
    for record in records:
        assert all(np.isfinite(v) for v in record.values())
        assert record['learning_rate'] == pytest.approx(0.01)
        assert 0.0 <= record['eval_accuracy'] <= 1.0


def test_distances_appear_when_anchors_are_stored(run_dir):
    first, second = metric_writers.read_metrics(run_dir)

    # The anchor of epoch 1 is stored after that epoch: no penalty during it.
    assert first['anchors'] == 1 and first['penalty'] == 0.0
    assert first['distance/0'] == 0.0 and 'distance/1' not in first
    assert second['anchors'] == 2 and second['penalty'] > 0.0
    assert second['distance/0'] > 0.0 and second['distance/1'] == 0.0


def test_ensemble_accuracy_is_logged_from_the_first_snapshot(run_dir):
    first, second = metric_writers.read_metrics(run_dir)

    # Epoch 1: the only member is the snapshot of epoch 1, the current model.
    assert first['ensemble_accuracy'] == pytest.approx(first['eval_accuracy'])
    # Epoch 2: the snapshots of epochs 1 and 2, as the ensemble command finds.
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        evaluated = ensemble.evaluate_run(str(run_dir))
    assert evaluated['members'] == [1, 2]
    assert second['ensemble_accuracy'] == pytest.approx(
        evaluated['ensemble_accuracy'], abs=1e-6
    )


def test_snapshots_restore_with_orbax(run_dir):
    assert checkpoints.snapshot_epochs(run_dir) == [1, 2]

    snapshot = checkpoints.load_snapshot(run_dir, 2)
    assert snapshot.meta['model'] == 'resnet32'
    assert snapshot.meta['image_shape'] == [32, 32, 3]
    model = models.create_model(snapshot.meta['model'], snapshot.meta['num_classes'])
    logits = model.apply(snapshot.variables, np.zeros((2, 32, 32, 3)), train=False)
    assert logits.shape == (2, snapshot.meta['num_classes'])

    # The snapshot of epoch 1 is the first anchor: distance 0 when it was stored,
    # and the distance logged at epoch 2 is the distance between the snapshots.
    first = checkpoints.load_snapshot(run_dir, 1)
    gap = jax.tree.map(
        lambda a, b: np.sum((np.asarray(a) - np.asarray(b)) ** 2),
        first.variables['params'],
        snapshot.variables['params'],
    )
    distance = float(np.sqrt(sum(jax.tree.leaves(gap))))
    logged = metric_writers.read_metrics(run_dir)[1]['distance/0']
    assert distance == pytest.approx(logged, rel=1e-4)


def test_run_directory_layout(run_dir):
    assert list(run_dir.glob('events.out.tfevents.*'))
    assert json.loads((run_dir / 'config.json').read_text())['num_epochs'] == 2
    assert (run_dir / 'checkpoints').is_dir()


def test_rerun_resumes_without_repeating_epochs(run_dir):
    before = metric_writers.read_metrics(run_dir)
    config = ml_collections.ConfigDict(
        json.loads((run_dir / 'config.json').read_text())
    )

    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        train.train_and_evaluate(config, str(run_dir))  # Finished: nothing to do.
        assert metric_writers.read_metrics(run_dir) == before

        config.num_epochs = 3
        with pytest.raises(ValueError, match=r'num_epochs \(2 -> 3\)'):
            train.train_and_evaluate(config, str(run_dir))
        train.train_and_evaluate(config, str(run_dir), allow_config_change=True)

    records = metric_writers.read_metrics(run_dir)
    assert [r['epoch'] for r in records] == [1, 2, 3]
    assert records[:2] == before
    assert records[2]['anchors'] == 2
