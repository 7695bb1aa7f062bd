"""Shared test settings."""

import os
import tempfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

# Several tests compile the same ResNet32 step; XLA on CPU takes seconds for each.
# A persistent cache lets a computation compiled once be reused within the session.
jax.config.update(
    'jax_compilation_cache_dir',
    os.path.join(tempfile.gettempdir(), 'landscape_jax_jit'),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory) -> str:
    """A real tfds data set on disk, 'landscape_tiny': 8x8x1 images, 4 classes.

    Each class is a noisy image of its own brightness, so a model learns it in a
    few steps. Unlike `tfds.testing.mock_data`, it is found by a subprocess too.
    """
    data_dir = tmp_path_factory.mktemp('tfds')
    rng = np.random.default_rng(0)
    features = tfds.features.FeaturesDict(
        {
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=4),
        }
    )

    def examples(count: int) -> list:
        labels = rng.integers(0, 4, size=count)
        noise = rng.normal(0, 20, size=(count, 8, 8, 1))
        images = np.clip(40 + 50 * labels[:, None, None, None] + noise, 0, 255)
        return [
            (index, {'image': image.astype(np.uint8), 'label': label})
            for index, (image, label) in enumerate(zip(images, labels, strict=True))
        ]

    tfds.dataset_builders.store_as_tfds_dataset(
        name='landscape_tiny',
        version='1.0.0',
        features=features,
        split_datasets={'train': examples(2048), 'test': examples(256)},
        data_dir=data_dir,
        disable_shuffling=True,
    )
    return str(data_dir)


def forget_config_overrides() -> None:
    """Removes the `--config.*` flags that an earlier in-process parse defined.

    ml_collections defines one flag per override when it parses a command line;
    parsing another command line with the same override in the same process
    would define it twice.
    """
    for name in list(flags.FLAGS):
        if name.startswith('config.'):
            delattr(flags.FLAGS, name)
