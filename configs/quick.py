"""A few minutes on a laptop CPU: a slice of CIFAR-10, 4 epochs, anchors at 2 and 3."""

from configs import default


def get_config():
    config = default.get_config()
    config.num_epochs = 4
    config.data.train_split = 'train[:5%]'
    config.data.eval_split = 'test[:10%]'
    config.distance.anchor_epochs = (2, 3)
    return config
