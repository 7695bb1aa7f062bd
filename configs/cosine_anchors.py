"""Cosine decay with warm restarts and an anchor at each restart."""

from configs import cosine


def get_config():
    config = cosine.get_config()
    config.distance.anchor_epochs = (150, 300, 450)
    return config
