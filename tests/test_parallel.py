"""Data parallelism: a step split over two devices equals the single-device step.

The comparison needs two devices before JAX starts its backend, which in a pytest
session has already happened; so it runs this file as a script in a subprocess
with two host CPU devices, which prints its measurements as one JSON line.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from landscape_jax import data, models, optim, parallel, train

NUM_DEVICES = 2
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 4
BATCH_SIZE = 8
NUM_EXAMPLES = 32
METRIC_NAMES = ('train_loss', 'penalty', 'l2', 'objective', 'train_accuracy')


@pytest.fixture(scope='module')
def measured() -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=' '.join(
            [
                os.environ.get('XLA_FLAGS', ''),
                f'--xla_force_host_platform_device_count={NUM_DEVICES}',
            ]
        ),
        JAX_PLATFORMS='cpu',
    )
    cache_dir = jax.config.jax_compilation_cache_dir
    if cache_dir:
        env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
        env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = str(
            jax.config.jax_persistent_cache_min_compile_time_secs
        )
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_step_on_two_devices_equals_single_device_step(measured):
    assert measured['num_devices'] == NUM_DEVICES
    for name in ('params', 'batch_stats', 'opt_state', 'anchors'):
        assert measured['state'][name] < 1e-5, (name, measured['state'])
    assert measured['state']['step'] == 0.0
    for name in METRIC_NAMES:
        assert measured['metrics'][name] < 1e-5, (name, measured['metrics'])
    # The sum of 8 gradients in two halves: a little more rounding.
    assert measured['metrics']['grad_norm'] < 1e-5
    assert measured['penalty'] > 0.01  # both anchors push


def test_step_is_really_split_over_the_devices(measured):
    # Each device convolves its half of the batch, and gradients and BatchNorm
    # statistics are all-reduced: the step is data-parallel, not replicated.
    assert measured['per_device_batch_in_hlo']
    assert not measured['global_batch_in_hlo']
    assert measured['all_reduces'] > 0
    assert measured['outputs_replicated']
    assert measured['compilations_after_two_steps'] == 1


@pytest.mark.parametrize('batch', ['eval', 'eval_sharded'])
def test_eval_on_two_devices_equals_single_device_eval(measured, batch):
    assert measured[batch]['count'] == 0.0
    assert measured[batch]['correct'] == 0.0
    assert measured[batch]['loss_sum'] < 1e-5


def test_shard_batch_splits_the_batch_axis(measured):
    assert measured['sharded_batch_rows'] == [BATCH_SIZE // NUM_DEVICES] * 2


def test_batch_size_must_split_evenly(measured):
    assert measured['odd_batch_error']


def test_initialize_distributed_is_a_no_op_without_a_cluster(monkeypatch):
    for name in (
        'JAX_COORDINATOR_ADDRESS',
        'SLURM_JOB_ID',
        'OMPI_MCA_orte_hnp_uri',
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, 'initialize', _fail_if_called)
    assert not parallel.initialize_distributed()


def test_initialize_distributed_reads_the_coordinator_variables(monkeypatch):
    calls = []
    monkeypatch.setattr(
        jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs)
    )
    monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'host0:1234')
    monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
    monkeypatch.setenv('JAX_PROCESS_ID', '3')
    assert parallel.initialize_distributed()
    assert calls == [
        {'coordinator_address': 'host0:1234', 'num_processes': 4, 'process_id': 3}
    ]

    monkeypatch.setenv('JAX_PROCESS_ID', '4')
    with pytest.raises(ValueError, match='JAX_PROCESS_ID=4'):
        parallel.initialize_distributed()
    monkeypatch.delenv('JAX_NUM_PROCESSES')
    with pytest.raises(ValueError, match='JAX_NUM_PROCESSES'):
        parallel.initialize_distributed()
    assert len(calls) == 1


def _fail_if_called(**kwargs):
    raise AssertionError(f'jax.distributed.initialize was called with {kwargs}.')


def _relative_difference(actual, expected) -> float:
    """Largest |actual - expected| over all leaves, relative to max |expected|."""
    differences = []
    for got, want in zip(
        jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True
    ):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
        differences.append(float(np.max(np.abs(got - want), initial=0.0)) / scale)
    return max(differences)


def _measure() -> dict:
    """One training step and one evaluation, on one device and split over all."""
    mesh = parallel.create_mesh()
    rng = np.random.default_rng(0)
    model = models.create_model('resnet32', NUM_CLASSES)
    optimizer = optim.sgd_coupled_l2(0.05, momentum=0.9, weight_decay=1e-3)
    state = train.create_train_state(
        jax.random.PRNGKey(0), model, IMAGE_SHAPE, optimizer, num_anchor_slots=2
    )
    # Two anchors near the initial parameters, so that the penalty pushes.
    anchors = jax.tree.map(
        lambda param: (
            np.asarray(param)
            + 0.01 * rng.standard_normal((2, *param.shape), np.float32)
        ),
        state.params,
    )
    state = state.replace(anchors=anchors, anchor_mask=np.ones(2, bool))
    train_data = data.DeviceData(
        images=rng.integers(0, 256, (NUM_EXAMPLES, *IMAGE_SHAPE), np.uint8),
        labels=rng.integers(0, NUM_CLASSES, NUM_EXAMPLES).astype(np.int32),
        num_classes=NUM_CLASSES,
    )
    steps_per_epoch = NUM_EXAMPLES // BATCH_SIZE
    order = rng.permutation(NUM_EXAMPLES).astype(np.int32).reshape(steps_per_epoch, -1)
    mean, std = data.channel_stats(train_data.images)
    penalty_config = train.PenaltyConfig(strength=1.0, width=100.0, weight_decay=1e-3)
    totals = {name: np.zeros((), np.float32) for name in (*METRIC_NAMES, 'grad_norm')}

    # The single-device step on the batch that the loop's first step draws.
    augment_rng = jax.random.fold_in(state.rng, state.step)
    batch = data.take_batch(train_data, order[0])
    batch['image'] = data.normalize(
        data.augment(augment_rng, batch['image']), mean, std
    )
    expected_state, expected_metrics = jax.jit(train.train_step)(
        state, batch, penalty_config
    )

    step = train.compile_train_step(mesh)
    arguments = parallel.replicate(
        (state, totals, train_data, order, mean, std, penalty_config), mesh
    )
    hlo = step.lower(*arguments).compile().as_text()
    parallel_state, parallel_totals, _ = step(*arguments)

    differences = {
        'num_devices': len(mesh.devices),
        'state': {
            name: _relative_difference(
                getattr(parallel_state, name), getattr(expected_state, name)
            )
            for name in ('params', 'batch_stats', 'opt_state', 'anchors', 'step')
        },
        'metrics': {
            name: _relative_difference(parallel_totals[name], expected_metrics[name])
            for name in expected_metrics
        },
        'penalty': float(expected_metrics['penalty']),
        'per_device_batch_in_hlo': f'f32[{BATCH_SIZE // NUM_DEVICES},8,8,16]' in hlo,
        'global_batch_in_hlo': f'f32[{BATCH_SIZE},8,8,16]' in hlo,
        'all_reduces': hlo.count('all-reduce('),
        'outputs_replicated': all(
            leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2
            for leaf in jax.tree.leaves((parallel_state, parallel_totals))
        ),
    }

    # A second step reuses the compilation: the donated outputs are placed as
    # the inputs were.
    step(parallel_state, parallel_totals, *arguments[2:])
    differences['compilations_after_two_steps'] = step._cache_size()

    eval_batch = {
        'image': train_data.images[:BATCH_SIZE],
        'label': train_data.labels[:BATCH_SIZE],
        'mask': np.arange(BATCH_SIZE) < BATCH_SIZE - 3,
    }
    eval_totals = {
        'loss_sum': np.float32(0.0),
        'correct': np.int32(0),
        'count': np.int32(0),
    }
    expected_sums = jax.jit(train.eval_step)(
        expected_state,
        dict(eval_batch, image=data.normalize(eval_batch['image'], mean, std)),
    )
    eval_step = train.compile_eval_batch(mesh)
    replicated_state, replicated_totals, mean, std = parallel.replicate(
        (expected_state, eval_totals, mean, std), mesh
    )
    # The batch as `data.eval_batches` gives it from replicated data, and split.
    for name, batch in (
        ('eval', parallel.replicate(eval_batch, mesh)),
        ('eval_sharded', parallel.shard_batch(eval_batch, mesh)),
    ):
        sums, probabilities = eval_step(
            replicated_state, replicated_totals, batch, mean, std
        )
        outputs = dict(sums, probabilities=probabilities)
        differences[name] = {
            key: _relative_difference(outputs[key], expected_sums[key])
            for key in expected_sums
        }
    differences['sharded_batch_rows'] = [
        shard.data.shape[0] for shard in batch['image'].addressable_shards
    ]

    try:
        parallel.check_batch_size(BATCH_SIZE - 1, mesh)
        differences['odd_batch_error'] = False
    except ValueError:
        differences['odd_batch_error'] = True
    return differences


if __name__ == '__main__':
    print(json.dumps(_measure()))
