"""Snapshot ensembles: hand-computed figures, and a real run directory restored.

The run directory is trained by `train.train_and_evaluate` on a tiny real tfds
data set (8x8 grayscale, 3 classes) built in a temporary folder, so that the
command can also be run in a subprocess.
"""

import functools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from landscape_jax import checkpoints, ensemble, models, train

_IMAGE_SHAPE = (8, 8, 1)
_NUM_CLASSES = 3
_DATASET = 'landscape_ensemble_test'


# Figures on hand-made predictions.

# Three members, four examples; all agree on examples 0 and 3.
_PREDICTIONS = np.array([[0, 1, 2, 1], [0, 1, 1, 1], [0, 2, 2, 1]])
_LABELS = np.array([0, 1, 2, 1])


def test_agreement_counts_unanimous_examples():
    assert int(ensemble.agreement(_PREDICTIONS)) == 2
    assert int(ensemble.agreement(_PREDICTIONS[:1])) == 4
    assert int(jax.jit(ensemble.agreement)(jnp.asarray(_PREDICTIONS))) == 2


def test_disagreement_is_the_mean_over_pairs():
    # Pairs (0, 1) and (0, 2) differ on one example of four, (1, 2) on two.
    expected = (0.25 + 0.25 + 0.5) / 3
    assert float(ensemble.disagreement(_PREDICTIONS)) == pytest.approx(expected)
    with pytest.raises(ValueError, match='predictions'):
        ensemble.disagreement(_PREDICTIONS[:1])


def test_normalized_disagreement_divides_by_the_mean_error():
    # Member errors: 0, 1/4 and 1/4; mean 1/6. Disagreement 1/3.
    value = ensemble.normalized_disagreement(_PREDICTIONS, _LABELS)
    assert float(value) == pytest.approx(2.0)
    perfect = np.array([_LABELS, _LABELS])
    assert float(ensemble.normalized_disagreement(perfect, _LABELS)) == 0.0


def test_ece_with_three_occupied_bins():
    probs = np.array([[0.9, 0.1], [0.88, 0.12], [0.15, 0.85], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 0])
    # Bin (14/15, 13/15] holds 0.9 (right) and 0.88 (wrong): |0.5 - 0.89| x 2/4.
    # 0.85 (right) and 0.7 (wrong) are alone in their bins.
    expected = 0.39 * 2 / 4 + 0.15 / 4 + 0.7 / 4
    assert float(ensemble.ece(probs, labels)) == pytest.approx(expected, rel=1e-5)
    # Confident and right: calibrated, and a confidence of 1 is in the last bin.
    assert float(ensemble.ece(np.eye(2), np.array([0, 1]))) == 0.0
    assert float(ensemble.ece(probs, labels, num_bins=1)) == pytest.approx(
        abs(0.5 - np.mean([0.9, 0.88, 0.85, 0.7]))
    )


def test_nll_closed_form_and_zero_probability():
    probs = np.array([[0.5, 0.5], [0.25, 0.75]], np.float32)
    expected = -(np.log(0.5) + np.log(0.75)) / 2
    assert float(ensemble.nll(probs, np.array([0, 1]))) == pytest.approx(expected)
    hopeless = ensemble.nll(np.array([[1.0, 0.0]], np.float32), np.array([1]))
    assert np.isfinite(hopeless) and float(hopeless) > 80


def test_weighted_average_of_softmax_outputs():
    probs = np.array([[[1.0, 0.0]], [[0.2, 0.8]]], np.float32)
    np.testing.assert_allclose(ensemble.ensemble_probabilities(probs), [[0.6, 0.4]])
    weighted = ensemble.ensemble_probabilities(probs, weights=[1.0, 3.0])
    np.testing.assert_allclose(weighted, [[0.4, 0.6]], rtol=1e-6)
    jitted = jax.jit(ensemble.ensemble_probabilities)(probs, jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(jitted, weighted, rtol=1e-6)

    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match='weights'):
            ensemble.ensemble_probabilities(probs, weights=bad)


def test_accuracy_per_member_under_jit():
    probs = np.array([[[0.9, 0.1], [0.3, 0.7]], [[0.2, 0.8], [0.6, 0.4]]], np.float32)
    labels = np.array([0, 1])
    np.testing.assert_allclose(ensemble.accuracy(probs, labels), [1.0, 0.0])

    @jax.jit
    def ensemble_accuracy(probs, labels):
        return ensemble.accuracy(ensemble.ensemble_probabilities(probs), labels)

    # Averaged: [0.55, 0.45] and [0.45, 0.55], both right.
    assert float(ensemble_accuracy(probs, labels)) == 1.0


def test_pairwise_kl():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    probs = np.array([[p], [q], [p]], np.float32)
    kl = np.asarray(ensemble.pairwise_kl(probs))

    expected = np.sum(p * np.log(p / q))
    assert kl.shape == (3, 3)
    assert kl[0, 1] == pytest.approx(expected, rel=1e-5)
    assert kl[1, 0] == pytest.approx(np.sum(q * np.log(q / p)), rel=1e-5)
    np.testing.assert_array_equal(np.diag(kl), 0.0)
    assert kl[0, 2] == kl[2, 0] == 0.0  # Identical members.


# A real run directory.


def _split(rng: np.random.Generator, num_examples: int):
    """Images whose brightness depends on the class, with noise: learnable."""
    labels = np.arange(num_examples) % _NUM_CLASSES
    shape = (num_examples, *_IMAGE_SHAPE)
    images = 70 + 60 * labels[:, None, None, None] + rng.normal(0, 45, shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope='module')
def arrays():
    rng = np.random.default_rng(0)
    train_images, train_labels = _split(rng, 64)
    test_images, test_labels = _split(rng, 40)
    return {
        'train_images': train_images,
        'train_labels': train_labels,
        'test_images': test_images,
        'test_labels': test_labels,
    }


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, arrays):
    directory = tmp_path_factory.mktemp('tfds')
    features = tfds.features.FeaturesDict(
        {
            'image': tfds.features.Image(shape=_IMAGE_SHAPE),
            'label': tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
        }
    )

    def examples(split):
        pairs = zip(arrays[f'{split}_images'], arrays[f'{split}_labels'], strict=True)
        return [
            (index, {'image': image, 'label': label})
            for index, (image, label) in enumerate(pairs)
        ]

    tfds.dataset_builders.store_as_tfds_dataset(
        name=_DATASET,
        version='1.0.0',
        features=features,
        split_datasets={'train': examples('train'), 'test': examples('test')},
        data_dir=directory,
        disable_shuffling=True,
    )
    return directory


def _config(data_dir, num_epochs: int) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.num_epochs = num_epochs
    # Small batches: enough steps for the BatchNorm running statistics to move
    # and for the members to differ.
    config.batch_size = 8
    config.eval_batch_size = 40
    config.optimizer.learning_rate = 0.05
    config.data.name = _DATASET
    config.data.data_dir = str(data_dir)
    config.distance.anchor_epochs = (1, 2)
    return config


@pytest.fixture(scope='module')
def run(tmp_path_factory, data_dir):
    """Three epochs with snapshots (and anchors) after epochs 1 and 2."""
    workdir = str(tmp_path_factory.mktemp('run'))
    state = train.train_and_evaluate(_config(data_dir, num_epochs=3), workdir)
    return {'workdir': workdir, 'state': state}


@pytest.fixture(scope='module')
def results(run):
    return ensemble.evaluate_run(run['workdir'], batch_size=16)


def _independent_probabilities(arrays, variables_list):
    """Softmax outputs by plain `model.apply`, normalizing with NumPy."""
    train_pixels = arrays['train_images'].astype(np.float64) / 255
    mean = train_pixels.mean(axis=(0, 1, 2))
    std = train_pixels.std(axis=(0, 1, 2))
    images = jnp.asarray((arrays['test_images'] / 255 - mean) / std, jnp.float32)
    model = models.create_model('resnet32', _NUM_CLASSES)
    apply = jax.jit(functools.partial(model.apply, train=False))
    return np.stack(
        [jax.nn.softmax(apply(variables, images)) for variables in variables_list]
    )


def test_final_model_equal_to_a_snapshot_is_counted_once(run, tmp_path):
    # Without the state of epoch 3 the run ends at epoch 2, which has a snapshot.
    workdir = tmp_path / 'run'
    shutil.copytree(run['workdir'], workdir)
    shutil.rmtree(workdir / checkpoints.CHECKPOINTS_DIR / '3')

    members = ensemble.load_members(str(workdir))
    assert list(members) == [1, 2]
    final = ensemble.load_final(str(workdir))
    assert final.epoch == 2
    jax.tree.map(np.testing.assert_array_equal, members[2].variables, final.variables)


def test_load_final_restores_the_trained_model(run):
    final = ensemble.load_final(run['workdir'])
    assert final.epoch == 3
    assert final.meta == {
        'model': 'resnet32',
        'dtype': 'float32',
        'num_classes': _NUM_CLASSES,
        'image_shape': list(_IMAGE_SHAPE),
        'epoch': 3,
    }
    expected = {'params': run['state'].params, 'batch_stats': run['state'].batch_stats}
    jax.tree.map(np.testing.assert_array_equal, final.variables, expected)


def test_run_given_a_relative_workdir_saves_and_restores(
    run, data_dir, tmp_path, monkeypatch
):
    # Orbax refuses relative paths; a run directory such as 'runs/x' is made
    # absolute for it.
    shutil.copytree(run['workdir'], tmp_path / 'run')
    monkeypatch.chdir(tmp_path)

    train.train_and_evaluate(
        _config(data_dir, num_epochs=4), 'run', allow_config_change=True
    )

    assert list(ensemble.load_members('run')) == [1, 2, ensemble.FINAL]
    assert ensemble.load_final('run').epoch == 4


def test_members_written_on_another_device_restore_here(run, tmp_path):
    # Pretend the run was trained on a GPU: orbax records each array's device.
    workdir = tmp_path / 'run'
    shutil.copytree(run['workdir'], workdir)
    for path in workdir.rglob('_sharding'):
        path.write_text(path.read_text().replace('cpu:0', 'cuda:0'))

    members = ensemble.load_members(str(workdir))
    assert list(members) == [1, 2, ensemble.FINAL]
    leaves = jax.tree.leaves([member.variables for member in members.values()])
    assert all(leaf.devices() == {jax.devices()[0]} for leaf in leaves)


def test_evaluate_run_matches_an_independent_recomputation(run, results, arrays):
    workdir = run['workdir']

    assert [s.epoch for s in ensemble.load_snapshots(workdir)] == [1, 2]
    assert results['members'] == [1, 2, ensemble.FINAL]
    assert results['final_epoch'] == 3
    assert results['split'] == 'test'
    assert results['num_examples'] == 40

    variables_list = [
        checkpoints.load_snapshot(workdir, 1).variables,
        checkpoints.load_snapshot(workdir, 2).variables,
        {'params': run['state'].params, 'batch_stats': run['state'].batch_stats},
    ]
    probs = _independent_probabilities(arrays, variables_list)
    labels = arrays['test_labels']
    predictions = probs.argmax(-1)
    np.testing.assert_allclose(
        results['member_accuracy'], (predictions == labels).mean(-1), rtol=1e-6
    )
    assert results['ensemble_accuracy'] == pytest.approx(
        np.mean(probs.mean(0).argmax(-1) == labels)
    )
    assert results['agreement'] == int(np.sum(np.all(predictions == predictions[0], 0)))
    label_probs = probs.mean(0)[np.arange(len(labels)), labels]
    tiny = np.finfo(np.float32).tiny  # The documented clipping.
    expected_nll = -np.mean(np.log(np.maximum(label_probs, tiny)))
    assert results['nll'] == pytest.approx(expected_nll, rel=1e-4)
    assert 0.0 <= results['ece'] <= 1.0
    assert 0.0 <= results['disagreement'] <= 1.0
    kl = np.array(results['pairwise_kl'])
    assert kl.shape == (3, 3) and np.all(np.diag(kl) == 0.0)


def test_command_prints_json(run, results, capsys):
    ensemble.main(['ensemble', f'--workdir={run["workdir"]}', '--batch_size=16'])
    printed = json.loads(capsys.readouterr().out)

    for key in (
        'members',
        'member_accuracy',
        'ensemble_accuracy',
        'num_examples',
        'agreement',
        'disagreement',
        'nll',
        'ece',
    ):
        assert printed[key] == results[key]


def test_command_without_snapshots_is_an_input_error(tmp_path, capsys):
    message = f'error: workdir={tmp_path} holds no ensemble snapshots'
    with pytest.raises(SystemExit) as raised:
        ensemble.main(['ensemble', f'--workdir={tmp_path}'])
    assert raised.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == ''
    assert printed.err.startswith(message) and printed.err.count('\n') == 1

    completed = subprocess.run(
        [sys.executable, '-m', 'landscape_jax.ensemble', f'--workdir={tmp_path}'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stdout == ''
    errors = [line for line in completed.stderr.splitlines() if 'error' in line]
    assert len(errors) == 1 and errors[0].startswith(message)


def test_command_with_an_unknown_split_is_an_input_error(run, capsys):
    with pytest.raises(SystemExit) as raised:
        ensemble.main(['ensemble', f'--workdir={run["workdir"]}', '--split=valid'])
    assert raised.value.code == 2
    assert capsys.readouterr().err.startswith("error: data.eval_split='valid'")
