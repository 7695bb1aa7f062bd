"""Tests for landscape_jax.data.

No test touches the network: tfds data is either mocked, built in a temporary
folder from arrays, or its download is replaced by a function that fails.
"""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds

from landscape_jax import data

# The tiny real data set built by `LandscapeTestDigits` from an .npz file in
# manual_dir: 8x8 grayscale images with 3 classes.
_TINY_SHAPE = (8, 8, 1)
_TINY_CLASSES = 3
_TINY_ARCHIVE = 'tiny_digits.npz'


class LandscapeTestDigits(tfds.core.GeneratorBasedBuilder):
    """A real (unmocked) tfds builder that reads its source from manual_dir."""

    VERSION = tfds.core.Version('1.0.0')
    MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put {_TINY_ARCHIVE} in manual_dir.'

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=_TINY_SHAPE),
                    'label': tfds.features.ClassLabel(num_classes=_TINY_CLASSES),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        with (dl_manager.manual_dir / _TINY_ARCHIVE).open('rb') as f:
            arrays = dict(np.load(f))
        return {
            split: self._generate_examples(
                arrays[f'{split}_images'], arrays[f'{split}_labels']
            )
            for split in ('train', 'test')
        }

    def _generate_examples(self, images, labels):
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {'image': image, 'label': label}


class LandscapeTestUnlabelled(tfds.core.GeneratorBasedBuilder):
    """A builder whose examples have no `label` feature; never prepared."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=_TINY_SHAPE),
                    'digit': tfds.features.ClassLabel(num_classes=_TINY_CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        raise AssertionError('the feature check must come before preparation')

    def _generate_examples(self):
        raise AssertionError('never generated')


def _tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        'train_images': rng.integers(0, 256, (10, *_TINY_SHAPE), dtype=np.uint8),
        'train_labels': np.arange(10, dtype=np.int64) % _TINY_CLASSES,
        'test_images': rng.integers(0, 256, (4, *_TINY_SHAPE), dtype=np.uint8),
        'test_labels': np.array([2, 0, 1, 2], dtype=np.int64),
    }


@pytest.fixture(scope='module')
def tiny_prepared(tmp_path_factory):
    """Prepares `LandscapeTestDigits` through `load_split`, once per module."""
    root = tmp_path_factory.mktemp('tiny')
    manual_dir = root / 'manual'
    manual_dir.mkdir()
    arrays = _tiny_arrays()
    np.savez(manual_dir / _TINY_ARCHIVE, **arrays)
    data_dir = root / 'tfds'
    train = data.load_split(
        'landscape_test_digits', 'train', data_dir=data_dir, manual_dir=manual_dir
    )
    return {'data_dir': data_dir, 'arrays': arrays, 'train': train}


def _data_config(**fields) -> ml_collections.ConfigDict:
    config = {
        'name': 'cifar10',
        'data_dir': None,
        'manual_dir': None,
        'train_split': 'train',
        'eval_split': 'test',
    }
    config.update(fields)
    return ml_collections.ConfigDict(config)


def _device_data(num_examples: int, num_classes: int = 5) -> data.DeviceData:
    rng = np.random.default_rng(num_examples)
    images = rng.integers(0, 256, (num_examples, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (num_examples,), dtype=np.int32)
    return data.DeviceData(jnp.asarray(images), jnp.asarray(labels), num_classes)


# Loading under tfds.testing.mock_data.


@pytest.mark.parametrize(
    ('name', 'image_shape'), [('cifar10', (32, 32, 3)), ('mnist', (28, 28, 1))]
)
def test_load_split_mock(name, image_shape, caplog):
    # absl's logger has its own level, which parsing flags elsewhere may raise.
    caplog.set_level(logging.INFO, logger='absl')
    with tfds.testing.mock_data(num_examples=13):
        split = data.load_split(name, 'train')

    assert split.images.shape == (13, *image_shape)
    assert split.images.dtype == jnp.uint8
    assert split.labels.shape == (13,)
    assert split.labels.dtype == jnp.int32
    assert split.num_classes == 10
    assert split.num_examples == 13
    labels = np.asarray(split.labels)
    assert labels.min() >= 0 and labels.max() < 10
    for array in (split.images, split.labels):
        assert isinstance(array, jax.Array)
        assert array.devices() <= set(jax.devices())
    assert f'Read {name}[train]: 13 examples' in caplog.text


def test_load_split_accepts_sliced_split():
    with tfds.testing.mock_data(num_examples=6):
        split = data.load_split('cifar10', 'train[:10%]')
    assert split.images.shape == (6, 32, 32, 3)


def test_load_datasets_mock():
    config = _data_config(train_split='train[:50%]', eval_split='test')
    with tfds.testing.mock_data(num_examples=9):
        datasets = data.load_datasets(config)

    assert datasets.train.images.shape == (9, 32, 32, 3)
    assert datasets.eval.images.shape == (9, 32, 32, 3)
    assert datasets.mean.shape == datasets.std.shape == (3,)
    assert datasets.mean.dtype == datasets.std.dtype == jnp.float32
    expected_mean, expected_std = data.channel_stats(datasets.train.images)
    np.testing.assert_array_equal(datasets.mean, expected_mean)
    np.testing.assert_array_equal(datasets.std, expected_std)


def test_load_datasets_empty_split_names_the_field():
    with (
        tfds.testing.mock_data(num_examples=0),
        pytest.raises(ValueError, match=r"data\.train_split='train'.*empty"),
    ):
        data.load_datasets(_data_config())


# Loading real tfds data prepared offline in a temporary data_dir.


def test_load_split_prepares_real_dataset_from_manual_dir(tiny_prepared):
    arrays, train = tiny_prepared['arrays'], tiny_prepared['train']
    np.testing.assert_array_equal(train.images, arrays['train_images'])
    np.testing.assert_array_equal(train.labels, arrays['train_labels'])
    assert train.images.dtype == jnp.uint8
    assert train.labels.dtype == jnp.int32
    assert train.num_classes == _TINY_CLASSES


def test_load_datasets_reuses_prepared_real_dataset(tiny_prepared, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('a prepared data set must not be prepared again')

    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
    config = _data_config(
        name='landscape_test_digits',
        data_dir=str(tiny_prepared['data_dir']),
        train_split='train[:50%]',
    )
    datasets = data.load_datasets(config)

    arrays = tiny_prepared['arrays']
    np.testing.assert_array_equal(datasets.train.images, arrays['train_images'][:5])
    np.testing.assert_array_equal(datasets.eval.images, arrays['test_images'])
    np.testing.assert_array_equal(datasets.eval.labels, arrays['test_labels'])
    train_pixels = arrays['train_images'][:5].astype(np.float64) / 255
    np.testing.assert_allclose(datasets.mean, [train_pixels.mean()], rtol=1e-6)
    np.testing.assert_allclose(datasets.std, [train_pixels.std()], rtol=1e-6)


@pytest.mark.parametrize(
    ('field', 'split'),
    [('data.train_split', 'train[:0]'), ('data.eval_split', 'validation')],
)
def test_load_datasets_bad_split_names_the_field(tiny_prepared, field, split):
    fields = {field.split('.')[1]: split}
    config = _data_config(
        name='landscape_test_digits', data_dir=str(tiny_prepared['data_dir']), **fields
    )
    with pytest.raises(ValueError, match=rf'{field}={split!r}'.replace('[', r'\[')):
        data.load_datasets(config)


def test_load_split_reads_dataset_stored_as_files(tmp_path):
    arrays = _tiny_arrays(seed=1)
    features = tfds.features.FeaturesDict(
        {
            'image': tfds.features.Image(shape=_TINY_SHAPE),
            'label': tfds.features.ClassLabel(num_classes=_TINY_CLASSES),
        }
    )
    examples = [
        (index, {'image': image, 'label': label})
        for index, (image, label) in enumerate(
            zip(arrays['test_images'], arrays['test_labels'], strict=True)
        )
    ]
    tfds.dataset_builders.store_as_tfds_dataset(
        name='landscape_stored_digits',
        version='1.0.0',
        features=features,
        split_datasets={'test': examples},
        data_dir=tmp_path,
        disable_shuffling=True,
    )

    split = data.load_split('landscape_stored_digits', 'test', data_dir=tmp_path)

    np.testing.assert_array_equal(split.images, arrays['test_images'])
    np.testing.assert_array_equal(split.labels, arrays['test_labels'])
    assert split.num_classes == _TINY_CLASSES


# Error messages.


def test_unknown_dataset_name_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"data\.name='no_such_dataset_xyz'"):
        data.load_split('no_such_dataset_xyz', 'train', data_dir=tmp_path)
    with pytest.raises(ValueError, match=r'data\.name'):
        data.load_datasets(_data_config(name='no_such_dataset_xyz'))


def test_dataset_without_label_feature_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"needs 'image' and 'label' features"):
        data.load_split('landscape_test_unlabelled', 'train', data_dir=tmp_path)


@pytest.mark.parametrize(
    ('name', 'archive'),
    [('cifar10', 'cifar-10-binary.tar.gz'), ('cifar100', 'cifar-100-binary.tar.gz')],
)
def test_failed_download_explains_how_to_provide_data(
    tmp_path, monkeypatch, name, archive
):
    def fail_offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError(
            "Failed to resolve 'www.cs.toronto.edu'"
        )

    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail_offline)
    with pytest.raises(data.DatasetUnavailableError) as raised:
        data.load_split(name, 'train', data_dir=tmp_path)

    message = str(raised.value)
    for part in (
        repr(name),
        str(tmp_path),
        archive,
        '--config.data.manual_dir=DIR',
        '--config.data.data_dir=DIR',
        'ConnectionError',
    ):
        assert part in message
    assert isinstance(raised.value.__cause__, requests.exceptions.ConnectionError)


def test_manual_dir_without_archive_fails_before_downloading(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('must fail before trying to download')

    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
    manual_dir = tmp_path / 'manual'
    manual_dir.mkdir()
    (manual_dir / 'cifar-10-python.tar.gz').touch()  # The wrong archive.

    with pytest.raises(data.DatasetUnavailableError) as raised:
        data.load_split('cifar10', 'train', data_dir=tmp_path, manual_dir=manual_dir)

    message = str(raised.value)
    assert f'manual_dir={manual_dir} lacks cifar-10-binary.tar.gz' in message
    assert '--config.data.data_dir=DIR' in message


def test_real_preparation_without_manual_files_fails_clearly(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as raised:
        data.load_split('landscape_test_digits', 'train', data_dir=tmp_path)

    message = str(raised.value)
    assert "'landscape_test_digits' is not prepared in" in message
    assert str(tmp_path) in message
    assert '--config.data.manual_dir' in message
    assert raised.value.__cause__ is not None


# On-device batching, augmentation and normalization.


def test_channel_stats_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    mean, std = data.channel_stats(images)

    pixels = images.astype(np.float64) / 255
    assert mean.dtype == std.dtype == jnp.float32
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    mean_from_device, _ = data.channel_stats(jnp.asarray(images))
    np.testing.assert_array_equal(mean_from_device, mean)
    with pytest.raises(ValueError, match='uint8'):
        data.channel_stats(pixels)


def test_normalize_closed_form():
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
    mean = np.array([0.2, 0.5, 0.7], np.float32)
    std = np.array([0.1, 0.25, 2.0], np.float32)
    with jax.numpy_dtype_promotion('strict'):
        normalized = data.normalize(jnp.asarray(images), jnp.asarray(mean), std)

    assert normalized.dtype == jnp.float32
    expected = (images / 255 - mean) / std
    np.testing.assert_allclose(normalized, expected, rtol=1e-5, atol=1e-6)


def test_augment_preserves_shape_and_dtype():
    images = jnp.zeros((5, 8, 6, 3), jnp.uint8)
    with jax.numpy_dtype_promotion('strict'):
        augmented = data.augment(jax.random.key(0), images)
    assert augmented.shape == images.shape
    assert augmented.dtype == jnp.uint8


def test_augment_without_padding_or_flip_is_identity():
    images = _device_data(6).images
    augmented = data.augment(jax.random.key(0), images, padding=0, flip=False)
    np.testing.assert_array_equal(augmented, images)


def test_augment_flip_mirrors_about_half_the_examples():
    images = np.asarray(_device_data(200).images)
    augmented = np.asarray(
        data.augment(jax.random.key(1), jnp.asarray(images), padding=0)
    )

    unchanged = (augmented == images).all(axis=(1, 2, 3))
    mirrored = (augmented == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (unchanged | mirrored).all()
    assert 0.35 < mirrored.mean() < 0.65


def _crop_offsets(augmented: np.ndarray, images: np.ndarray, padding: int):
    """Offset of each output's window in its zero-padded input; -1 if none."""
    _, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
    offsets = []
    for output, source in zip(augmented, padded, strict=True):
        found = [
            (row, col)
            for row in range(2 * padding + 1)
            for col in range(2 * padding + 1)
            if (source[row : row + height, col : col + width] == output).all()
        ]
        offsets.append(found[0] if found else (-1, -1))
    return offsets


def test_augment_crop_is_a_window_of_the_zero_padded_input():
    images = np.asarray(_device_data(16).images)
    augmented = data.augment(jax.random.key(2), jnp.asarray(images), flip=False)
    assert (-1, -1) not in _crop_offsets(np.asarray(augmented), images, 4)


def test_augment_crop_offsets_cover_all_positions():
    # Distinct nonzero pixels make every window position identifiable.
    image = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
    images = np.repeat(image, 400, axis=0)
    augmented = data.augment(
        jax.random.key(3), jnp.asarray(images), padding=2, flip=False
    )
    offsets = set(_crop_offsets(np.asarray(augmented), images, 2))
    assert offsets == {(row, col) for row in range(5) for col in range(5)}


def test_augment_differs_between_rngs():
    images = _device_data(16).images
    first = data.augment(jax.random.key(0), images, flip=False)
    second = data.augment(jax.random.key(1), images, flip=False)
    assert not np.array_equal(first, second)


def test_epoch_permutation():
    rng = jax.random.key(0)
    indices = np.asarray(data.epoch_permutation(rng, 103, 10))

    assert indices.shape == (10, 10)
    assert indices.dtype == np.int32
    assert indices.min() >= 0 and indices.max() < 103
    assert all(len(set(row)) == 10 for row in indices)
    assert len(set(indices.ravel())) == 100
    np.testing.assert_array_equal(indices, data.epoch_permutation(rng, 103, 10))
    other = data.epoch_permutation(jax.random.key(1), 103, 10)
    assert not np.array_equal(indices, other)
    with pytest.raises(ValueError, match='batch_size'):
        data.epoch_permutation(rng, 5, 10)


def test_take_batch_under_jit():
    split = _device_data(12)
    indices = jnp.array([3, 0, 11, 3], jnp.int32)
    batch = jax.jit(data.take_batch)(split, indices)

    np.testing.assert_array_equal(batch['image'], np.asarray(split.images)[indices])
    np.testing.assert_array_equal(batch['label'], np.asarray(split.labels)[indices])


def test_eval_batches_cover_every_example_once():
    split = _device_data(23)
    batches = list(data.eval_batches(split, 10))

    assert len(batches) == 3
    for batch in batches:
        assert batch['image'].shape == (10, 4, 4, 3)
        assert batch['label'].shape == batch['mask'].shape == (10,)
    masks = np.concatenate([batch['mask'] for batch in batches])
    np.testing.assert_array_equal(masks, np.arange(30) < 23)
    images = np.concatenate([batch['image'] for batch in batches])[masks]
    labels = np.concatenate([batch['label'] for batch in batches])[masks]
    np.testing.assert_array_equal(images, split.images)
    np.testing.assert_array_equal(labels, split.labels)
