"""Trains a model with anchor-distance penalties.

    python -m landscape_jax.main --config=configs/multi_ckpt.py --workdir=DIR \
        [--config.distance.strength=10 ...]

Rerunning the same command on an existing DIR resumes the run.
"""

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from landscape_jax import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the run.')
config_flags.DEFINE_config_file(
    'config', None, 'Path to a configuration file.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    # tfds reads data through TensorFlow; keep it off the accelerators JAX uses.
    tf.config.set_visible_devices([], 'GPU')
    logging.info('JAX devices: %s', jax.devices())
    train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main)
