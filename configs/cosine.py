"""Cosine decay from 0.01 to 0 with a warm restart every 150 epochs, no anchors.

An ensemble snapshot is saved at the end of each cycle (epochs 150, 300, 450, 600).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.schedule.name = 'cosine'
    return config
