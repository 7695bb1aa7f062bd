"""Trains a model with anchor-distance penalties.

    python -m landscape_jax.main --config=configs/multi_ckpt.py --workdir=DIR \
        [--config.distance.strength=10 ...]

Rerunning the same command on an existing DIR resumes the run.

Bad input (a flag that does not parse, a configuration field out of range, an
unknown data set or split) ends the command before any work with exit status 2
and one line per problem on stderr, ``error: <field> must be ..., got <value>.``;
any other failure raises with its traceback.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from landscape_jax import cli, config_validation, parallel, train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the run.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change',
    False,
    'Continue a run in --workdir that was made with a different configuration '
    '(for example to train it for more epochs); without it such a run is refused.',
)
config_flags.DEFINE_config_file(
    'config', None, 'Path to a configuration file.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
    """Validates the configuration and work directory, then trains.

    Args:
      argv: the arguments left after the flags, program name first.
    """
    if len(argv) > 1:
        raise app.UsageError(
            f'Unexpected arguments: {" ".join(argv[1:])}',
            exitcode=cli.USAGE_ERROR_EXIT_CODE,
        )
    # Before any other JAX call: joins the other processes of a multi-host run.
    parallel.initialize_distributed()
    config, workdir = flags.FLAGS.config, _WORKDIR.value
    try:
        config_validation.validate_config(config)
        config_validation.validate_workdir(workdir, config)
        # tfds reads data through TensorFlow; keep it off the accelerators JAX uses.
        # Imported only now, so that bad input is reported without TensorFlow's
        # start-up notices on stderr.
        import tensorflow as tf

        tf.config.set_visible_devices([], 'GPU')
        logging.info('JAX devices: %s', jax.devices())
        train.train_and_evaluate(
            config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value
        )
    except ValueError as error:
        if not config_validation.is_input_error(error, config):
            raise
        cli.exit_with_error(str(error))


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the command line; a bad flag ends the command with exit status 2.

    absl would report a flag that does not parse with exit status 1 and a usage
    hint, and ml_collections reports an override of an unknown field, a config
    file that cannot be found or one that cannot import ``configs`` (run outside
    the repository root) with a traceback. Here each is one ``error:`` line.

    Args:
      argv: the command line, program name first.

    Returns:
      The arguments left after the flags, program name first.
    """
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        cli.exit_with_error(str(error))
    except AttributeError as error:
        # ml_collections looks each --config.<field> up in the loaded config.
        unknown = [arg for arg in argv if _names_missing_field(arg, str(error))]
        if not unknown:
            raise
        cli.exit_with_error(
            f'{unknown[0].split("=", 1)[0]} is not a field of the configuration '
            '(the fields are those of configs/default.py).'
        )
    except ModuleNotFoundError as error:
        if error.name != 'configs':
            raise
        cli.exit_with_error(
            f'--config could not be loaded: {error}; run the command from the '
            'repository root, where the configs package is.'
        )

    try:
        # ml_collections defers an error reading the config file to its first use.
        flags.FLAGS.config.keys()
    except OSError as error:
        reason = str(error).strip().splitlines()[-1].strip()
        filename = config_flags.get_config_filename(flags.FLAGS['config'])
        cli.exit_with_error(f'--config={filename} could not be loaded: {reason}')
    return remaining


def _names_missing_field(arg: str, missing_key: str) -> bool:
    """Whether arg is a --config.<path> override whose path has missing_key."""
    if not arg.startswith('--config.'):
        return False
    path = arg[len('--config.') :].split('=', 1)[0]
    return missing_key.strip('\'"') in path.split('.')


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
