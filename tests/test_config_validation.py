"""Bad configurations and work directories fail up front with one line per problem."""

import importlib
import json
import math
import os
import pathlib
import subprocess
import sys
from unittest import mock

import conftest
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from configs import quick
from landscape_jax import checkpoints, cli, config_validation, main, train

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_NAMES = sorted(
    path.stem
    for path in (REPO_ROOT / 'configs').glob('*.py')
    if path.stem != '__init__'
)

# (field, bad value) for fields checked whatever the schedule; configs/quick.py
# otherwise (4 epochs, learning rate 0.01).
BAD_VALUES = [
    ('seed', -1),
    ('seed', 2**32),
    ('seed', True),
    ('seed', 1.0),
    ('num_epochs', 0),
    ('num_epochs', 4.0),
    ('num_epochs', True),
    ('batch_size', 0),
    ('batch_size', '128'),
    ('eval_batch_size', -5),
    ('checkpoints_to_keep', 0),
    ('model.name', 'vgg'),
    ('model.name', None),
    ('model.dtype', 'float16'),
    ('model.conv_impl', 'cudnn'),
    ('data.name', ''),
    ('data.name', 3),
    ('data.data_dir', ''),
    ('data.manual_dir', 5),
    ('data.train_split', ''),
    ('data.eval_split', None),
    ('optimizer.learning_rate', 0.0),
    ('optimizer.learning_rate', -0.1),
    ('optimizer.learning_rate', math.nan),
    ('optimizer.learning_rate', math.inf),
    ('optimizer.momentum', 1.0),
    ('optimizer.momentum', -0.1),
    ('optimizer.weight_decay', -1e-4),
    ('optimizer.weight_decay', math.inf),
    ('schedule.name', 'linear'),
    ('distance.strength', -1.0),
    ('distance.strength', math.nan),
    ('distance.width', 0.0),
    ('distance.width', math.inf),
    ('distance.anchor_epochs', (0, 2)),
    ('distance.anchor_epochs', (2, 5)),
    ('distance.anchor_epochs', (3, 2)),
    ('distance.anchor_epochs', (2, 2)),
    ('distance.anchor_epochs', (2.0,)),
    ('distance.anchor_epochs', ('2',)),
    ('distance.anchor_epochs', 3),
]

# (schedule, field, bad value) for the fields a schedule reads.
BAD_SCHEDULE_VALUES = [
    ('step', 'schedule.decay_rate', 0.0),
    ('step', 'schedule.decay_rate', 1.5),
    ('step', 'schedule.decay_epochs', 0),
    ('step', 'schedule.restart_epochs', 2.5),
    ('cosine', 'schedule.period_epochs', 0),
    ('cosine', 'schedule.end_value', -0.1),
    ('cosine', 'schedule.end_value', 0.01),  # Equal to the learning rate.
]


def _config(**fields) -> ml_collections.ConfigDict:
    """configs/quick.py with fields replaced (by dotted path, any type)."""
    config = ml_collections.ConfigDict(quick.get_config().to_dict(), type_safe=False)
    for field, value in fields.items():
        parent, _, key = field.rpartition('.')
        (config[parent] if parent else config)[key] = value
    return config


def _problems(config: ml_collections.ConfigDict) -> list[str]:
    with pytest.raises(ValueError) as error:
        config_validation.validate_config(config)
    return str(error.value).splitlines()


@pytest.mark.parametrize(('field', 'value'), BAD_VALUES)
def test_bad_value_is_named_with_what_is_allowed(field, value):
    (line,) = _problems(_config(**{field: value}))
    _assert_names(line, field, value)


@pytest.mark.parametrize(('schedule', 'field', 'value'), BAD_SCHEDULE_VALUES)
def test_bad_schedule_value_is_named_with_what_is_allowed(schedule, field, value):
    (line,) = _problems(_config(**{'schedule.name': schedule, field: value}))
    _assert_names(line, field, value)


def test_schedule_fields_unused_by_the_schedule_are_not_checked():
    config = _config(**{'schedule.decay_rate': 5.0, 'schedule.period_epochs': 0})
    config_validation.validate_config(config)


def test_end_value_message_names_the_learning_rate():
    config = _config(**{'schedule.name': 'cosine', 'schedule.end_value': 0.5})
    (line,) = _problems(config)
    assert 'below optimizer.learning_rate=0.01' in line


def test_every_problem_is_reported_one_line_each():
    config = _config(num_epochs=0, **{'model.name': 'vgg', 'distance.width': -1})
    problems = _problems(config)

    assert [line.split(' ', 1)[0] for line in problems] == [
        'num_epochs',
        'model.name',
        'distance.width',
    ]  # Not distance.anchor_epochs: it is checked against num_epochs once valid.


def test_missing_field_is_reported():
    config = _config()
    del config.optimizer['momentum']
    assert _problems(config) == ['optimizer.momentum is missing; it must be in [0, 1).']


def test_ints_for_floats_lists_and_numpy_numbers_are_accepted():
    config = _config(
        **{
            'optimizer.learning_rate': 1,
            'optimizer.weight_decay': np.float32(0.0),
            'distance.anchor_epochs': [np.int64(1), 4],
            'batch_size': np.int32(64),
        }
    )
    config_validation.validate_config(config)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_shipped_config_passes(name):
    config = importlib.import_module(f'configs.{name}').get_config()
    config_validation.validate_config(config)


def test_config_read_back_from_a_run_directory_passes():
    # config.json holds lists for tuples and null for unset directories.
    config = ml_collections.ConfigDict(json.loads(quick.get_config().to_json()))
    config_validation.validate_config(config)


def test_workdir_may_exist_or_be_creatable(tmp_path):
    config_validation.validate_workdir(str(tmp_path))
    config_validation.validate_workdir(str(tmp_path / 'new' / 'run'))
    config_validation.validate_workdir('gs://bucket/run')  # Not checked.


@pytest.mark.parametrize('relative', ['afile', 'afile/run'])
def test_workdir_in_place_of_a_file_is_rejected(tmp_path, relative):
    (tmp_path / 'afile').write_text('')
    workdir = str(tmp_path / relative)

    with pytest.raises(ValueError) as error:
        config_validation.validate_workdir(workdir)

    message = str(error.value)
    assert message.startswith('workdir must be a writable directory')
    assert f'got {workdir!r}' in message and 'is a file' in message
    assert '\n' not in message


def test_empty_workdir_is_rejected():
    with pytest.raises(ValueError, match=r"^workdir must be a non-empty path, got ''"):
        config_validation.validate_workdir('')


@pytest.fixture
def saved_run(tmp_path):
    """A run directory as a run of configs/quick.py leaves it after epoch 1."""
    (tmp_path / checkpoints.CONFIG_FILE).write_text(quick.get_config().to_json())
    (tmp_path / checkpoints.CHECKPOINTS_DIR / '1').mkdir(parents=True)
    return str(tmp_path)


def test_resume_with_the_same_shapes_passes(saved_run):
    config = _config(num_epochs=8, **{'distance.anchor_epochs': (5, 6)})
    config_validation.validate_workdir(saved_run, config)


@pytest.mark.parametrize(
    ('field', 'value', 'expected'),
    [
        ('model.name', 'mobilenetv2', "model.name must be 'resnet32'"),
        ('distance.anchor_epochs', (2,), 'distance.anchor_epochs must hold 2 epochs'),
    ],
)
def test_resume_with_other_shapes_is_rejected(saved_run, field, value, expected):
    with pytest.raises(ValueError) as error:
        config_validation.validate_workdir(saved_run, _config(**{field: value}))

    message = str(error.value)
    assert message.startswith(expected)
    assert f'workdir={saved_run!r}' in message
    assert message.endswith(f'got {value!r}.')


def test_a_workdir_without_a_saved_state_takes_any_config(saved_run):
    os.rmdir(os.path.join(saved_run, checkpoints.CHECKPOINTS_DIR, '1'))
    config = _config(**{'model.name': 'mobilenetv2'})
    config_validation.validate_workdir(saved_run, config)


@pytest.mark.parametrize(
    ('message', 'expected'),
    [
        ("data.name='foo' is not a tfds data set.", True),
        ('schedule.decay_rate must be in (0, 1], got 2.0.', True),
        ('batch_size=128 is larger than the 8 training examples.', True),
        ("workdir must be a writable directory, got 'x'.", True),
        ('Requested shape: (3, 3) is not compatible.', False),
        ('batch_sizes must match.', False),
        ('', False),
    ],
)
def test_input_errors_are_those_that_start_with_a_field(message, expected):
    error = ValueError(message)
    assert config_validation.is_input_error(error, quick.get_config()) is expected


def test_train_and_evaluate_raises_before_touching_the_workdir(tmp_path):
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError, match=r'^optimizer\.momentum must be in'):
        train.train_and_evaluate(_config(**{'optimizer.momentum': 2.0}), str(workdir))
    assert not workdir.exists()


@pytest.fixture
def command_line():
    """Parses a command line in this process as `main.parse_flags` would."""

    def parse(*args: str) -> list[str]:
        argv = ['landscape_jax.main', *args]
        conftest.forget_config_overrides()
        flags.FLAGS.unparse_flags()
        # ml_collections reads `--config.*` overrides from sys.argv.
        with mock.patch.object(sys, 'argv', argv):
            return main.parse_flags(argv)

    yield parse
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    ('args', 'expected'),
    [
        (
            ['--config.num_epochs=abc'],
            'error: flag --config.num_epochs=abc: invalid literal for int() with '
            "base 10: 'abc'",
        ),
        (
            ['--config.model.size=3'],
            'error: --config.model.size is not a field of the configuration '
            '(the fields are those of configs/default.py).',
        ),
        (
            ['--config=configs/no_such_config.py'],
            'error: --config=configs/no_such_config.py could not be loaded: [Errno 2] '
            "No such file or directory: 'configs/no_such_config.py'",
        ),
    ],
)
def test_flag_errors_exit_2_with_one_line(command_line, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        command_line('--config=configs/quick.py', '--workdir=unused', *args)

    assert exit_info.value.code == cli.USAGE_ERROR_EXIT_CODE
    assert capsys.readouterr().err.splitlines() == [expected]


@pytest.mark.parametrize(
    ('args', 'expected'),
    [
        # Passes validation; data.py rejects it when it looks the data set up.
        (['--config.data.name=no_such_dataset'], "error: data.name='no_such_dataset'"),
        # Passes validation; the run rejects it once it knows the split's size.
        (['--config.batch_size=128'], 'error: batch_size=128 is larger than'),
    ],
)
def test_input_errors_found_while_loading_exit_2_with_one_line(
    command_line, capsys, tmp_path, args, expected
):
    workdir = tmp_path / 'run'
    remaining = command_line('--config=configs/quick.py', f'--workdir={workdir}', *args)

    with tfds.testing.mock_data(num_examples=8), pytest.raises(SystemExit) as exit_info:
        main.main(remaining)

    assert exit_info.value.code == cli.USAGE_ERROR_EXIT_CODE
    err_lines = capsys.readouterr().err.splitlines()
    assert err_lines[-1].startswith(expected)
    assert not any(line.startswith('Traceback') for line in err_lines)
    assert not workdir.exists()


# Each command imports JAX and TensorFlow (10 s or more), so both run at once.
COMMAND_ERRORS = {
    '--config.optimizer.momentum=1.5': (
        'error: optimizer.momentum must be in [0, 1), got 1.5.'
    ),
    '--config.seed=one': (
        "error: flag --config.seed=one: invalid literal for int() with base 10: 'one'"
    ),
}


def test_main_command_exits_2_with_one_line_and_no_traceback(tmp_path):
    # TensorFlow's C++ start-up notices go to stderr on some machines.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    workdir = tmp_path / 'run'
    processes = {
        arg: subprocess.Popen(
            [
                sys.executable,
                '-m',
                'landscape_jax.main',
                '--config=configs/quick.py',
                f'--workdir={workdir}',
                arg,
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arg in COMMAND_ERRORS
    }

    for arg, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == cli.USAGE_ERROR_EXIT_CODE, stderr
        assert stderr.splitlines() == [COMMAND_ERRORS[arg]]
    assert not workdir.exists()


def _assert_names(line: str, field: str, value) -> None:
    """The line names the field, says what is allowed and shows the value."""
    assert line.startswith(f'{field} must be ')
    assert line.endswith(f', got {value!r}.')
    allowed = line[len(f'{field} must be ') : -len(f', got {value!r}.')]
    assert allowed.strip()
