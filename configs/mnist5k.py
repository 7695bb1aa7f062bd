"""A short real-data run that needs no download: 5000 MNIST digits, 28x28x1.

Prepare the data set once (see experiments/prepare_mnist5k.py), then pass its
folder: ``--config.data.data_dir=DIR``. Anchors after epochs 3 and 6.
"""

from configs import baseline


def get_config():
    config = baseline.get_config()
    config.data.name = 'mnist5k'
    config.num_epochs = 8
    config.distance.anchor_epochs = (3, 6)
    return config
