"""Image-classification data held on the accelerator.

A whole tfds split is read once to host memory and put on the device as uint8
NHWC images and int32 labels. Shuffling, batching, augmentation and
normalization then happen inside jitted code, so a training step never copies
data from the host.

Any tfds data set with an `image` feature of fixed shape and a `ClassLabel`
feature named `label` works: cifar10, cifar100, svhn_cropped, mnist,
fashion_mnist, ...

Example:

  datasets = load_datasets(config.data)
  perm = epoch_permutation(rng, datasets.train.num_examples, batch_size)
  batch = take_batch(datasets.train, perm[step])
  images = normalize(augment(aug_rng, batch['image']), datasets.mean,
                     datasets.std)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging

# Examples per batch while reading a split to the host. Only the read speed
# depends on it; batch_size=-1 is avoided because it crashes under
# tfds.testing.mock_data.
_READ_BATCH_SIZE = 1024

# Number of distinct uint8 pixel values.
_NUM_PIXEL_VALUES = 256


class DatasetUnavailableError(RuntimeError):
    """A data set is neither prepared in `data_dir` nor can be prepared here."""


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=['images', 'labels'],
    meta_fields=['num_classes'],
)
@dataclasses.dataclass(frozen=True)
class DeviceData:
    """One split of an image-classification data set, held on the device.

    It is a pytree (`num_classes` is static), so it can be passed to jitted
    functions such as `take_batch`.

    Attributes:
      images: uint8[N, H, W, C] images; grayscale sets have C=1.
      labels: int32[N] class indices in [0, num_classes).
      num_classes: number of classes of the data set's `label` feature.
    """

    images: jax.Array
    labels: jax.Array
    num_classes: int

    @property
    def num_examples(self) -> int:
        """Number of examples N in the split."""
        return self.images.shape[0]


@dataclasses.dataclass(frozen=True)
class Datasets:
    """The training and evaluation splits and the normalization statistics.

    Attributes:
      train: the training split (`data.train_split`).
      eval: the evaluation split (`data.eval_split`).
      mean: float32[C] per-channel pixel mean of `train`, in [0, 1] units.
      std: float32[C] per-channel pixel standard deviation of `train`.
    """

    train: DeviceData
    eval: DeviceData
    mean: jax.Array
    std: jax.Array


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
) -> DeviceData:
    """Reads one split of a tfds data set and puts it on the default device.

    The data set is prepared first if `data_dir` does not hold it yet.

    Args:
      name: tfds data-set name, e.g. 'cifar10', 'mnist' or 'cifar10:3.0.2'.
      split: tfds split string, e.g. 'train', 'test' or 'train[:10%]'.
      data_dir: folder of prepared tfds data sets; None for the tfds default.
      manual_dir: folder holding the data set's original archives (e.g.
        `cifar-10-binary.tar.gz`), used instead of downloading them; None to
        download.

    Returns:
      The split as uint8 NHWC images and int32 labels on the device.

    Raises:
      ValueError: if `name` is not a tfds data set, lacks `image`/`label`
        features, or `split` is unknown or empty.
      DatasetUnavailableError: if the data set is not prepared and preparing it
        fails (e.g. no internet and no archive in `manual_dir`).
    """
    builder = _prepared_builder(name, data_dir=data_dir, manual_dir=manual_dir)
    images, labels = _read_split(builder, split, split_field='split')
    return _put_on_device(images, labels, builder)


def load_datasets(data_config: ml_collections.ConfigDict) -> Datasets:
    """Loads the training and evaluation splits named by a data config.

    Args:
      data_config: `config.data` with fields `name`, `train_split`,
        `eval_split` and the optional `data_dir` and `manual_dir` (see
        `load_split`).

    Returns:
      Both splits on the device and the per-channel mean and standard deviation
      of the training images.

    Raises:
      ValueError: if a field is invalid or a split is empty.
      DatasetUnavailableError: if the data set cannot be prepared.
    """
    builder = _prepared_builder(
        data_config.name,
        data_dir=data_config.get('data_dir'),
        manual_dir=data_config.get('manual_dir'),
    )

    train_images, train_labels = _read_split(
        builder, data_config.train_split, split_field='data.train_split'
    )
    mean, std = channel_stats(train_images)
    train = _put_on_device(train_images, train_labels, builder)
    del train_images, train_labels

    eval_images, eval_labels = _read_split(
        builder, data_config.eval_split, split_field='data.eval_split'
    )
    eval_data = _put_on_device(eval_images, eval_labels, builder)

    logging.info(
        'Per-channel pixel mean %s, std %s (from %s).',
        np.round(np.asarray(mean), 4),
        np.round(np.asarray(std), 4),
        data_config.train_split,
    )
    return Datasets(train=train, eval=eval_data, mean=mean, std=std)


def channel_stats(images: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

    The statistics are exact: they come from a histogram of the 256 pixel
    values of each channel, accumulated in float64. The standard deviation is
    the population one (divided by the number of pixels).

    Args:
      images: uint8[..., C] images, e.g. uint8[N, H, W, C].

    Returns:
      (mean, std), each float32[C].

    Raises:
      ValueError: if `images` is not uint8 or holds no pixels.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f'channel_stats expects uint8 images, got {images.dtype}.')
    if images.ndim < 2 or images.size == 0:
        raise ValueError(
            f'channel_stats expects non-empty [..., C] images, got {images.shape}.'
        )

    pixel_values = np.arange(_NUM_PIXEL_VALUES, dtype=np.float64) / 255.0
    pixels = images.reshape(-1, images.shape[-1])
    means, stds = [], []
    for channel in range(pixels.shape[1]):
        counts = np.bincount(pixels[:, channel], minlength=_NUM_PIXEL_VALUES)
        mean = counts @ pixel_values / pixels.shape[0]
        variance = counts @ (pixel_values - mean) ** 2 / pixels.shape[0]
        means.append(mean)
        stds.append(np.sqrt(variance))
    return jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)


@functools.partial(jax.jit, static_argnames=('padding', 'flip'))
def augment(
    rng: jax.Array, images: jax.Array, *, padding: int = 4, flip: bool = True
) -> jax.Array:
    """Random crop with zero padding and random horizontal flip, per example.

    The crop matches torchvision's `RandomCrop(H, padding=padding)`: each image
    is padded by `padding` zeros on every side and an HxW window is picked
    uniformly among the (2 * padding + 1)**2 positions. Each image is then
    mirrored left-right with probability 0.5.

    Args:
      rng: PRNG key.
      images: uint8[B, H, W, C] images (any dtype works).
      padding: zero padding on each side before cropping; 0 disables the crop.
      flip: whether to flip horizontally at random.

    Returns:
      The augmented images, same shape and dtype as `images`.
    """
    if images.ndim != 4:
        raise ValueError(f'augment expects [B, H, W, C] images, got {images.shape}.')
    if padding < 0:
        raise ValueError(f'padding must be >= 0, got {padding}.')
    batch_size, height, width, channels = images.shape
    crop_rng, flip_rng = jax.random.split(rng)

    if padding > 0:
        padded = jnp.pad(
            images, ((0, 0), (padding, padding), (padding, padding), (0, 0))
        )
        offsets = jax.random.randint(
            crop_rng, (batch_size, 2), 0, 2 * padding + 1, dtype=jnp.int32
        )

        def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
            start = (offset[0], offset[1], jnp.zeros((), jnp.int32))
            return jax.lax.dynamic_slice(image, start, (height, width, channels))

        images = jax.vmap(crop)(padded, offsets)

    if flip:
        do_flip = jax.random.bernoulli(flip_rng, 0.5, (batch_size,))
        images = jnp.where(do_flip[:, None, None, None], images[:, :, ::-1], images)
    return images


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Scales uint8 pixels to [0, 1] and standardizes each channel.

    Args:
      images: uint8[..., C] images.
      mean: float32[C] per-channel mean in [0, 1] units.
      std: float32[C] per-channel standard deviation in [0, 1] units.

    Returns:
      float32[..., C] images `(images / 255 - mean) / std`.
    """
    scaled = images.astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@functools.partial(jax.jit, static_argnames=('num_examples', 'batch_size'))
def epoch_permutation(rng: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """Shuffled example indices for one epoch, grouped into batches.

    The last `num_examples % batch_size` indices of the permutation are dropped,
    so every batch is full.

    Args:
      rng: PRNG key; the same key gives the same permutation.
      num_examples: number of examples in the split (static).
      batch_size: examples per batch (static).

    Returns:
      int32[num_examples // batch_size, batch_size] distinct indices in
      [0, num_examples).

    Raises:
      ValueError: if `batch_size` is not positive or exceeds `num_examples`.
    """
    if batch_size <= 0 or batch_size > num_examples:
        raise ValueError(
            f'batch_size must be in [1, num_examples={num_examples}], got {batch_size}.'
        )
    num_steps = num_examples // batch_size
    permutation = jax.random.permutation(rng, num_examples)
    indices = permutation[: num_steps * batch_size].astype(jnp.int32)
    return indices.reshape(num_steps, batch_size)


def take_batch(data: DeviceData, indices: jax.Array) -> dict[str, jax.Array]:
    """Gathers a batch of examples on the device; jittable.

    Args:
      data: the split to gather from.
      indices: int[B] example indices, e.g. a row of `epoch_permutation`.

    Returns:
      {'image': uint8[B, H, W, C], 'label': int32[B]}.
    """
    return {
        'image': jnp.take(data.images, indices, axis=0),
        'label': jnp.take(data.labels, indices, axis=0),
    }


def eval_batches(data: DeviceData, batch_size: int) -> Iterator[dict[str, jax.Array]]:
    """Yields every example once, in order, in batches of one fixed shape.

    The last batch is padded to `batch_size` by repeating the last example, and
    its `mask` is False there, so one compiled evaluation step serves all
    batches. Weight per-example metrics by `mask`.

    Args:
      data: the split to evaluate on.
      batch_size: examples per batch.

    Yields:
      {'image': uint8[B, H, W, C], 'label': int32[B], 'mask': bool[B]}.
    """
    if batch_size <= 0:
        raise ValueError(f'batch_size must be positive, got {batch_size}.')
    for start in range(0, data.num_examples, batch_size):
        yield _eval_batch(data, start, batch_size)


@functools.partial(jax.jit, static_argnames='batch_size')
def _eval_batch(
    data: DeviceData, start: int | jax.Array, batch_size: int
) -> dict[str, jax.Array]:
    """Examples [start, start + batch_size), padded past the end of `data`."""
    indices = start + jnp.arange(batch_size, dtype=jnp.int32)
    mask = indices < data.num_examples
    batch = take_batch(data, jnp.minimum(indices, data.num_examples - 1))
    batch['mask'] = mask
    return batch


def _prepared_builder(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None,
    manual_dir: str | os.PathLike[str] | None,
) -> tfds.core.DatasetBuilder:
    """Returns the builder of `name`, preparing the data set if needed."""
    if not isinstance(name, str) or not name:
        raise ValueError(f'data.name must be a tfds data-set name, got {name!r}.')
    if data_dir is not None:
        data_dir = os.path.expanduser(os.fspath(data_dir))
    if manual_dir is not None:
        manual_dir = os.path.expanduser(os.fspath(manual_dir))

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as err:
        # tfds's own message lists every registered data set; keep its first line.
        reason = str(err).splitlines()[0]
        raise ValueError(
            f'data.name={name!r} is not a tfds data set, nor one prepared in '
            f'data_dir={data_dir or "<tfds default>"} ({reason}). Use a name from '
            'tfds.list_builders(), e.g. cifar10, cifar100, svhn_cropped, mnist.'
        ) from None
    _check_features(builder)

    if not builder.is_prepared():
        _prepare(builder, manual_dir=manual_dir)
    return builder


def _check_features(builder: tfds.core.DatasetBuilder) -> None:
    """Raises ValueError unless the data set has fixed-shape images and labels."""
    features = builder.info.features
    keys = (
        set(features.keys())
        if isinstance(features, tfds.features.FeaturesDict)
        else set()
    )
    if not {'image', 'label'} <= keys:
        raise ValueError(
            f'data.name={builder.name!r} is not an image-classification data set: '
            f"it needs 'image' and 'label' features, but has {sorted(keys)}."
        )

    image, label = features['image'], features['label']
    if not isinstance(image, tfds.features.Image):
        raise ValueError(
            f"The 'image' feature of {builder.name!r} is a {type(image).__name__}, "
            'not a tfds.features.Image.'
        )
    if len(image.shape) != 3 or None in image.shape or image.np_dtype != np.uint8:
        raise ValueError(
            f'{builder.name!r} has images of shape {image.shape} and dtype '
            f'{np.dtype(image.np_dtype)}; only fixed-shape uint8 [H, W, C] '
            'images are supported.'
        )
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(
            f"The 'label' feature of {builder.name!r} is a {type(label).__name__}, "
            'not a tfds.features.ClassLabel.'
        )


def _prepare(builder: tfds.core.DatasetBuilder, *, manual_dir: str | None) -> None:
    """Downloads (or reads from `manual_dir`) and prepares the data set."""
    archives = _archive_names(builder)
    if manual_dir is not None:
        # Fail at once rather than after tfds's download retries (minutes offline).
        missing = [
            archive
            for archive in archives
            if not os.path.exists(os.path.join(manual_dir, archive))
        ]
        if missing:
            raise DatasetUnavailableError(
                f'Data set {builder.name!r} is not prepared in {builder.data_dir}, '
                f'and manual_dir={manual_dir} lacks {", ".join(missing)}. '
                + _how_to_provide(builder, archives)
            )

    logging.info(
        'Preparing %s in %s (manual_dir=%s).',
        builder.name,
        builder.data_dir,
        manual_dir,
    )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as err:  # A failed download raises many unrelated types.
        raise DatasetUnavailableError(
            f'Data set {builder.name!r} is not prepared in {builder.data_dir} and '
            f'preparing it failed with {type(err).__name__}: {err}\n'
            + _how_to_provide(builder, archives)
        ) from err


def _archive_names(builder: tfds.core.DatasetBuilder) -> list[str]:
    """File names tfds looks for in `manual_dir`, from the builder's URLs."""
    url_infos = getattr(builder, 'url_infos', None) or {}
    return sorted(info.filename for info in url_infos.values() if info.filename)


def _how_to_provide(builder: tfds.core.DatasetBuilder, archives: list[str]) -> str:
    """Instructions for making a data set available without internet access."""
    if archives:
        manual = (
            f'put the genuine original archive(s) {", ".join(archives)} (tfds '
            'verifies their checksums) in a folder DIR and pass '
            '--config.data.manual_dir=DIR'
        )
    else:
        manual = (
            "put the files named by the data set's tfds manual-download "
            'instructions in a folder DIR and pass --config.data.manual_dir=DIR'
        )
    return (
        f'To provide {builder.name!r} offline, either {manual}, or prepare it on '
        f'a machine with internet access (tfds.builder({builder.name!r}, '
        'data_dir=DIR).download_and_prepare()), copy DIR here and pass '
        f'--config.data.data_dir=DIR (this run looked in {builder.data_dir_root}).'
    )


def _read_split(
    builder: tfds.core.DatasetBuilder, split: str, *, split_field: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split to host memory as uint8 NHWC images, int32 labels."""
    read_config = tfds.ReadConfig(try_autocache=False)
    try:
        dataset = builder.as_dataset(
            split=split,
            batch_size=_READ_BATCH_SIZE,
            shuffle_files=False,
            read_config=read_config,
        )
    except (ValueError, KeyError) as err:
        raise ValueError(
            f'{split_field}={split!r} is not a usable split of {builder.name!r}: {err}'
        ) from err

    image_chunks, label_chunks = [], []
    with tqdm.tqdm(
        desc=f'Reading {builder.name}[{split}]', unit=' examples', disable=None
    ) as progress:
        for batch in tfds.as_numpy(dataset):
            image_chunks.append(batch['image'])
            label_chunks.append(batch['label'])
            progress.update(len(batch['label']))
    if not label_chunks:
        raise ValueError(f'{split_field}={split!r} of {builder.name!r} is empty.')

    images = np.concatenate(image_chunks).astype(np.uint8, copy=False)
    labels = np.concatenate(label_chunks).astype(np.int32)
    logging.info(
        'Read %s[%s]: %d examples, images %s %s, %d classes.',
        builder.name,
        split,
        len(labels),
        images.shape[1:],
        images.dtype,
        builder.info.features['label'].num_classes,
    )
    return images, labels


def _put_on_device(
    images: np.ndarray, labels: np.ndarray, builder: tfds.core.DatasetBuilder
) -> DeviceData:
    """Copies host arrays to the default device."""
    return DeviceData(
        images=jax.device_put(images),
        labels=jax.device_put(labels),
        num_classes=builder.info.features['label'].num_classes,
    )
