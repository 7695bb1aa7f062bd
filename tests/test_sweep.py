"""Vectorized sweeps: every member of a vmapped sweep trains as its own run would."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from landscape_jax import data, models, optim, schedules, sweep, train

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
