"""Multiple anchors with s = 100 and no L2 regularization."""

from configs import multi_ckpt


def get_config():
    config = multi_ckpt.get_config()
    config.optimizer.weight_decay = 0.0
    config.distance.strength = 100.0
    return config
