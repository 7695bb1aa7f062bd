"""Shared test settings."""

import os
import tempfile

import jax

# Several tests compile the same ResNet32 step; XLA on CPU takes seconds for each.
# A persistent cache lets a computation compiled once be reused within the session.
jax.config.update(
    'jax_compilation_cache_dir',
    os.path.join(tempfile.gettempdir(), 'landscape_jax_jit'),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
