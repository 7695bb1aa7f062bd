"""The study's baseline: one anchor after epoch 100, s = 1, σ² = 1000.

The strength and width sweeps are overrides of this file, e.g.
``--config.distance.strength=10`` or ``--config.distance.width=0.1``.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.distance.anchor_epochs = (100,)
    return config
