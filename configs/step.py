"""Step decay x0.1 every 50 epochs with a warm restart every 150, no anchors."""

from configs import default


def get_config():
    config = default.get_config()
    config.schedule.name = 'step'
    return config
