"""Learning rate 0.1 with cosine warm restarts and an anchor at each restart.

The study's case where anchors helped most. Without anchors:
``--config.distance.anchor_epochs='()'``; at a constant rate:
``--config.schedule.name=constant``.
"""

from configs import cosine_anchors


def get_config():
    config = cosine_anchors.get_config()
    config.optimizer.learning_rate = 0.1
    return config
