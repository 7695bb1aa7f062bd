"""landscape_jax: anchor-distance penalties for exploring the loss landscape."""

__version__ = '0.1.0'
