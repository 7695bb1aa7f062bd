"""Vectorized sweeps: every member of a vmapped sweep trains as its own run would."""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from landscape_jax import (
    checkpoints,
    conv,
    data,
    ensemble,
    metric_writers,
    models,
    optim,
    schedules,
    sweep,
    train,
)

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 4
BATCH_SIZE = 4
NUM_EXAMPLES = 16
NUM_STEPS = 3
LEARNING_RATE = 0.01
MOMENTUM = 0.9

# Members 0-2 sweep the strength on one seed; members 1 and 3 differ in seed,
# learning rate and weight decay.
MEMBERS = sweep.Members(
    seeds=(0, 0, 0, 1),
    strengths=(0.0, 1.0, 10.0, 1.0),
    widths=(1.0, 1.0, 1.0, 1.0),
    learning_rate_scales=(1.0, 1.0, 1.0, 2.0),
    weight_decays=(1e-3, 1e-3, 1e-3, 5e-4),
)
METRIC_NAMES = ('train_loss', 'penalty', 'l2', 'objective', 'train_accuracy')

# Largest relative difference, per leaf, between a member and its own run. A
# vmapped convolution is a grouped one, which XLA sums in another order: the
# losses differ by ~5e-7 relative, parameters and BatchNorm statistics by up to
# ~8e-6 after three steps, and the momentum buffers (sums of gradients, whose
# BatchNorm-bias parts are small sums of large terms) by up to ~1.5e-5.
TOLERANCE = {'params': 2e-5, 'batch_stats': 2e-5, 'opt_state': 5e-5, 'anchors': 2e-5}


@pytest.fixture(autouse=True, scope='module')
def one_convolution_library():
    """Sweeps and single runs compiled with XLA's default CPU convolutions.

    With `conv.compiler_options` a single run's convolutions are XLA's own,
    while a vmapped (grouped) one is lowered another way; their float32
    rounding differs, and these tiny runs amplify it to ~1e-4 of the parameters
    in four steps (measured; the same single run differs by ~8e-4 between the
    two libraries). With one library for both, only the vmapping differs and
    the tolerances below hold.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv, 'compiler_options', lambda *args, **kwargs: {})
        yield


# Wall-clock figures differ between runs; everything else must match.
TIMINGS = ('epoch_time', 'eval_time')
# A sweep member's run directory against its own run's, after two epochs of two
# steps on the tiny 8x8 images (measured): the first member (seed 0, s = 1)
# matches to < 3e-7 relative, the second (seed 1, s = 10, σ² = 10, half the
# learning rate) to < 6e-5. Its penalty gradient is large against these small
# parameters, so rounding differences grow quickly: at twice the base learning
# rate instead of half, the same member drifts by ~1e-2 in the eval loss.
RUN_RTOL = 1e-3
# Accuracies may differ by the flipped predictions of a few examples.
ACCURACY_ATOL = 2 / 64


@pytest.fixture(scope='module')
def runs() -> dict:
    """Three steps of the sweep and of each member's own run; an anchor after one."""
    model = models.create_model('resnet32', NUM_CLASSES)
    rng = np.random.default_rng(0)
    train_data = data.DeviceData(
        images=rng.integers(0, 256, (NUM_EXAMPLES, *IMAGE_SHAPE), np.uint8),
        labels=rng.integers(0, NUM_CLASSES, NUM_EXAMPLES).astype(np.int32),
        num_classes=NUM_CLASSES,
    )
    mean, std = data.channel_stats(train_data.images)
    orders = sweep.epoch_orders(MEMBERS.seeds, 1, NUM_EXAMPLES, BATCH_SIZE)
    eval_batch = {
        'image': train_data.images[:8],
        'label': train_data.labels[:8],
        'mask': np.arange(8) < 6,
    }
    zero_eval_totals = {
        'loss_sum': np.zeros(MEMBERS.num_members, np.float32),
        'correct': np.zeros(MEMBERS.num_members, np.int32),
        'count': np.zeros(MEMBERS.num_members, np.int32),
    }

    state = sweep.create_sweep_state(
        MEMBERS,
        model,
        IMAGE_SHAPE,
        schedules.constant(LEARNING_RATE),
        MOMENTUM,
        num_anchor_slots=1,
    )
    totals = {
        name: jnp.zeros(MEMBERS.num_members, jnp.float32)
        for name in (*METRIC_NAMES, 'grad_norm')
    }
    step = sweep.compile_train_step()
    penalty_config = MEMBERS.penalty_config()
    for index in range(NUM_STEPS):
        state, totals, _ = step(
            state, totals, train_data, orders, mean, std, penalty_config
        )
        if index == 0:
            state = sweep.store_anchor(state)
    eval_totals, eval_outputs = sweep.compile_eval_batch()(
        state, zero_eval_totals, eval_batch, mean, std
    )

    # Each member on its own, with its own optimizer: those with the same
    # learning rate and weight decay share one, and so one compilation.
    optimizers = {}
    own_step, own_eval = jax.jit(train.train_step), jax.jit(train.eval_step)
    own_runs = []
    for member in range(MEMBERS.num_members):
        learning_rate = LEARNING_RATE * MEMBERS.learning_rate_scales[member]
        weight_decay = MEMBERS.weight_decays[member]
        optimizer = optimizers.setdefault(
            (learning_rate, weight_decay),
            optim.sgd_coupled_l2(
                schedules.constant(learning_rate), MOMENTUM, weight_decay
            ),
        )
        own_state = train.create_train_state(
            jax.random.PRNGKey(MEMBERS.seeds[member]),
            model,
            IMAGE_SHAPE,
            optimizer,
            num_anchor_slots=1,
        )
        own_penalty = train.PenaltyConfig(
            strength=MEMBERS.strengths[member],
            width=MEMBERS.widths[member],
            weight_decay=weight_decay,
        )
        own_totals = dict.fromkeys(totals, 0.0)
        for index in range(NUM_STEPS):
            augment_rng = jax.random.fold_in(own_state.rng, own_state.step)
            batch = data.take_batch(train_data, orders[member, index])
            batch['image'] = data.normalize(
                data.augment(augment_rng, batch['image']), mean, std
            )
            own_state, metrics = own_step(own_state, batch, own_penalty)
            own_totals = {name: own_totals[name] + metrics[name] for name in metrics}
            if index == 0:
                own_state = train.store_anchor(own_state)
        own_eval_batch = dict(
            eval_batch, image=data.normalize(eval_batch['image'], mean, std)
        )
        own_runs.append(
            {
                'optimizer': optimizer,
                'state': own_state,
                'totals': own_totals,
                'eval': own_eval(own_state, own_eval_batch),
            }
        )
    return {
        'state': state,
        'totals': totals,
        'eval': {**eval_totals, **eval_outputs},
        'step': step,
        'own': own_runs,
    }


@pytest.mark.parametrize('member', range(MEMBERS.num_members))
def test_member_equals_its_own_run(runs, member):
    own = runs['own'][member]
    unstacked = sweep.unstack(runs['state'], member, optimizer=own['optimizer'])
    assert jax.tree.structure(unstacked) == jax.tree.structure(own['state'])

    for name, tolerance in TOLERANCE.items():
        difference = _relative_difference(
            getattr(unstacked, name), getattr(own['state'], name)
        )
        assert difference < tolerance, (name, difference)
    for name in ('step', 'rng', 'anchor_mask'):
        np.testing.assert_array_equal(
            getattr(unstacked, name), getattr(own['state'], name)
        )
    for name, total in own['totals'].items():
        np.testing.assert_allclose(
            runs['totals'][name][member], total, rtol=1e-5, atol=1e-7, err_msg=name
        )
    for name, result in own['eval'].items():
        # After three steps the running BatchNorm statistics are still near their
        # initial values, so in evaluation the activations grow from block to
        # block and the logits reach tens: per-example probabilities carry the
        # rounding differences of the logits (measured up to 3e-5) in absolute terms.
        np.testing.assert_allclose(
            runs['eval'][name][member],
            result,
            rtol=1e-5,
            atol=1e-4 if name == 'probabilities' else 0,
            err_msg=name,
        )


def test_strength_pushes_members_of_one_seed_apart(runs):
    distances = np.asarray(sweep.anchor_distances(runs['state']))[:, 0]
    assert runs['totals']['penalty'][0] == 0.0
    assert distances[0] < distances[1] < distances[2]


def test_sweep_step_compiles_once(runs):
    assert runs['step']._cache_size() == 1


def test_unstack_keeps_the_sweep_optimizer_by_default(runs):
    member = sweep.unstack(runs['state'], 3)
    np.testing.assert_allclose(member.opt_state.hyperparams['learning_rate_scale'], 2.0)
    np.testing.assert_allclose(member.opt_state.hyperparams['weight_decay'], 5e-4)
    with pytest.raises(ValueError, match='index'):
        sweep.unstack(runs['state'], MEMBERS.num_members)


def test_members_from_configs():
    configs = []
    for seed, strength, learning_rate in ((0, 0.0, 0.1), (0, 1.0, 0.1), (1, 1.0, 0.2)):
        config = default.get_config()
        config.seed = seed
        config.distance.strength = strength
        config.optimizer.learning_rate = learning_rate
        configs.append(config)

    members = sweep.members_from_configs(configs)

    assert members.seeds == (0, 0, 1)
    assert members.strengths == (0.0, 1.0, 1.0)
    assert members.learning_rate_scales == (1.0, 1.0, 2.0)
    assert members.widths == (1000.0,) * 3
    np.testing.assert_array_equal(members.penalty_config().strength, [0, 1, 1])


def test_members_from_configs_rejects_other_differences():
    base, other = default.get_config(), default.get_config()
    other.batch_size = 2 * base.batch_size
    with pytest.raises(ValueError, match='batch_size is 128 in config 0 and 256'):
        sweep.members_from_configs([base, other])


def test_members_from_configs_rejects_learning_rates_a_schedule_cannot_scale():
    base = default.get_config()
    base.schedule.name = 'cosine'
    base.schedule.end_value = 1e-4
    other = ml_collections.ConfigDict(base.to_dict())
    other.optimizer.learning_rate = 2 * base.optimizer.learning_rate
    with pytest.raises(ValueError, match='end_value'):
        sweep.members_from_configs([base, other])


def test_members_validate_their_fields():
    with pytest.raises(ValueError, match='one entry per member'):
        sweep.Members(
            seeds=(0, 1),
            strengths=(1.0,),
            widths=(1.0,),
            learning_rate_scales=(1.0,),
            weight_decays=(0.0,),
        )
    with pytest.raises(ValueError, match=r'widths\[0\]'):
        sweep.Members(
            seeds=(0,),
            strengths=(1.0,),
            widths=(0.0,),
            learning_rate_scales=(1.0,),
            weight_decays=(0.0,),
        )
    with pytest.raises(ValueError, match='momentum'):
        sweep.sweep_optimizer(schedules.constant(0.1), momentum=1.0)


def _run_config(data_dir: str, **changes) -> ml_collections.ConfigDict:
    """Two epochs of two steps on 'landscape_tiny', an anchor after epoch 1."""
    config = default.get_config()
    config.data.name = 'landscape_tiny'
    config.data.data_dir = data_dir
    config.data.train_split = 'train[:128]'
    config.num_epochs = 2
    config.batch_size = 64
    config.eval_batch_size = 128
    config.distance.anchor_epochs = (1,)
    config.distance.width = 10.0
    for name, value in changes.items():
        config[name] = value
    return config


def _sweep_configs(data_dir: str) -> list[ml_collections.ConfigDict]:
    """Strengths 1 and 10; the second member also has its own seed and rate."""
    first = _run_config(data_dir)
    first.distance.strength = 1.0
    second = _run_config(data_dir, seed=1)
    second.distance.strength = 10.0
    second.optimizer.learning_rate = 0.005
    return [first, second]


@pytest.fixture(scope='module')
def sweep_runs(tmp_path_factory, tiny_data_dir) -> dict:
    """A two-member sweep and each member's own run, in run directories."""
    root = tmp_path_factory.mktemp('sweep_runs')
    configs = _sweep_configs(tiny_data_dir)
    sweep_dirs = [str(root / f'sweep_{index}') for index in range(len(configs))]
    own_dirs = [str(root / f'own_{index}') for index in range(len(configs))]
    states = sweep.train_and_evaluate_sweep(configs, sweep_dirs)
    own_states = [
        train.train_and_evaluate(config, workdir)
        for config, workdir in zip(configs, own_dirs, strict=True)
    ]
    return {
        'configs': configs,
        'sweep_dirs': sweep_dirs,
        'own_dirs': own_dirs,
        'states': states,
        'own_states': own_states,
    }


@pytest.mark.parametrize('member', range(2))
def test_sweep_writes_the_run_directory_of_each_member(sweep_runs, member):
    sweep_dir, own_dir = (
        sweep_runs['sweep_dirs'][member],
        sweep_runs['own_dirs'][member],
    )
    records = metric_writers.read_metrics(sweep_dir)
    own_records = metric_writers.read_metrics(own_dir)

    assert [record['epoch'] for record in records] == [1, 2]
    for record, own_record in zip(records, own_records, strict=True):
        assert record.keys() == own_record.keys()
        assert {'ensemble_accuracy', 'anchors', 'distance/0'} <= record.keys()
        for name in record.keys() - set(TIMINGS):
            tolerance = (
                {'atol': ACCURACY_ATOL} if 'accuracy' in name else {'rtol': RUN_RTOL}
            )
            np.testing.assert_allclose(
                record[name], own_record[name], err_msg=name, **tolerance
            )
    assert records[1]['learning_rate'] == pytest.approx((0.01, 0.005)[member])
    assert records[1]['penalty'] > 0.0
    assert checkpoints.read_config(sweep_dir) == checkpoints.read_config(own_dir)


def test_members_of_a_sweep_differ(sweep_runs):
    first, second = (
        metric_writers.read_metrics(workdir)[-1] for workdir in sweep_runs['sweep_dirs']
    )
    assert first['penalty'] < second['penalty']
    assert first['distance/0'] != second['distance/0']


@pytest.mark.parametrize('member', range(2))
def test_sweep_snapshots_restore(sweep_runs, member):
    sweep_dir, own_dir = (
        sweep_runs['sweep_dirs'][member],
        sweep_runs['own_dirs'][member],
    )
    snapshots = ensemble.load_snapshots(sweep_dir)
    own_snapshot = checkpoints.load_snapshot(own_dir, 1)

    assert [snapshot.epoch for snapshot in snapshots] == [1]
    assert snapshots[0].meta == own_snapshot.meta
    assert _relative_difference(snapshots[0].variables, own_snapshot.variables) < 1e-5


def test_sweep_states_are_those_of_single_runs(sweep_runs):
    for state, own_state in zip(
        sweep_runs['states'], sweep_runs['own_states'], strict=True
    ):
        # The optimizer itself (static, not compared) is each member's own.
        for name in ('params', 'batch_stats', 'opt_state', 'anchors'):
            assert jax.tree.structure(getattr(state, name)) == jax.tree.structure(
                getattr(own_state, name)
            ), name
        # Measured: ‖Δθ‖ / ‖θ‖ < 1.4e-6; leaf by leaf, the second member's
        # smallest batch-norm biases (~1e-3) differ by up to 1e-3 of their size.
        assert _norm_relative_difference(state.params, own_state.params) < 1e-5
        assert int(state.step) == int(own_state.step) == 4

    # A single run resumes from a member's saved state: finished, it trains no
    # further and returns the state the sweep saved.
    config, workdir = sweep_runs['configs'][1], sweep_runs['sweep_dirs'][1]
    records = metric_writers.read_metrics(workdir)
    resumed = train.train_and_evaluate(config, workdir)
    assert metric_writers.read_metrics(workdir) == records
    assert _relative_difference(resumed, sweep_runs['states'][1]) == 0.0


def test_interrupted_sweep_resumes_to_the_same_metrics(sweep_runs, tmp_path):
    finished = sweep_runs['sweep_dirs']
    workdirs = [str(tmp_path / f'member_{index}') for index in range(len(finished))]
    for source, workdir in zip(finished, workdirs, strict=True):
        shutil.copytree(source, workdir)

    # What a kill in epoch 2 leaves in the first member: its state of epoch 1.
    shutil.rmtree(f'{workdirs[0]}/checkpoints/2')
    with pytest.raises(ValueError) as error:
        sweep.train_and_evaluate_sweep(sweep_runs['configs'], workdirs)
    message = str(error.value)
    assert f"'{workdirs[0]}' epoch 1" in message
    assert f"'{workdirs[1]}' epoch 2" in message
    assert [r['epoch'] for r in metric_writers.read_metrics(workdirs[0])] == [1, 2]

    shutil.rmtree(f'{workdirs[1]}/checkpoints/2')
    sweep.train_and_evaluate_sweep(sweep_runs['configs'], workdirs)

    for source, workdir in zip(finished, workdirs, strict=True):
        assert _without_timings(metric_writers.read_metrics(workdir)) == (
            _without_timings(metric_writers.read_metrics(source))
        )


def test_diverging_member_stops_the_sweep_before_saving(tmp_path, tiny_data_dir):
    configs = _sweep_configs(tiny_data_dir)
    # Parameters near 1e20 after one step: the squared norm overflows.
    configs[1].optimizer.learning_rate = 1e20
    workdirs = [str(tmp_path / 'sane'), str(tmp_path / 'diverging')]

    with pytest.raises(FloatingPointError) as error:
        sweep.train_and_evaluate_sweep(configs, workdirs)

    message = str(error.value)
    assert 'diverged in epoch 1' in message
    assert workdirs[1] in message and workdirs[0] not in message
    for workdir in workdirs:
        assert metric_writers.read_metrics(workdir) == []
        assert checkpoints.snapshot_epochs(workdir) == []
        assert not list((pathlib.Path(workdir) / 'checkpoints').iterdir())


def test_sweep_rejects_bad_workdirs_and_configs(tmp_path):
    configs = [default.get_config(), default.get_config()]
    configs[1].distance.strength = 10.0
    with pytest.raises(ValueError, match='workdirs must hold one run directory'):
        sweep.train_and_evaluate_sweep(configs, [str(tmp_path / 'only')])
    with pytest.raises(ValueError, match=r'workdirs\[0\] and workdirs\[1\]'):
        sweep.train_and_evaluate_sweep(
            configs, [str(tmp_path / 'same'), str(tmp_path / '.' / 'same')]
        )

    configs[1].batch_size = 64
    with pytest.raises(ValueError, match='batch_size is 128 in config 0 and 64'):
        sweep.train_and_evaluate_sweep(
            configs, [str(tmp_path / 'a'), str(tmp_path / 'b')]
        )

    configs[1].batch_size = 0
    with pytest.raises(ValueError, match='batch_size'):
        sweep.train_and_evaluate_sweep(
            configs, [str(tmp_path / 'a'), str(tmp_path / 'b')]
        )
    assert not list(tmp_path.iterdir())


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def _norm_relative_difference(actual, expected) -> float:
    """‖actual - expected‖ / ‖expected‖, the L2 norms over all leaves together."""
    pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    squared_difference = squared_norm = 0.0
    for got, want in pairs:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        squared_difference += float(np.sum((got - want) ** 2))
        squared_norm += float(np.sum(want**2))
    return (squared_difference / squared_norm) ** 0.5


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
