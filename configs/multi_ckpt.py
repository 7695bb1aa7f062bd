"""Multiple anchors: one every 150 epochs (after epochs 150, 300 and 450).

A snapshot is saved before each anchor, so with the final model the run yields a
four-member snapshot ensemble.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.distance.anchor_epochs = (150, 300, 450)
    return config
