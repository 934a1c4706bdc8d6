"""A persistent XLA compilation cache, so restarts and resumes do not recompile."""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

CACHE_SUBDIR = "xla_cache"
CACHE_DIR_ENV = "FCN_JAX_XLA_CACHE_DIR"


def use_persistent_cache(workdir: str, min_compile_seconds: float) -> str:
    """Caches executables that took >= `min_compile_seconds` under the workdir,
    or in `$FCN_JAX_XLA_CACHE_DIR` when set (shared by many workdirs).

    Returns the cache directory. Resets JAX's cache first, so a process that
    trains several workdirs in turn (tests, notebooks) uses each one's own.
    """
    path = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.path.abspath(workdir), CACHE_SUBDIR
    )
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
