"""A persistent XLA compilation cache for the application, so that a resumed run (after a
preemption, or the same command run again) loads its compiled programs instead of compiling.

The outer step of the Part 5 workload takes ~4-5 s to compile on a 2-core CPU and ~1 s to load
from this cache (BENCHMARKS.md); on accelerators the saving is larger. Entries are keyed by
JAX on the program, the compile options and the devices, so a changed config or JAX version
compiles afresh rather than loading something stale.
"""

import os
from typing import Optional

import jax

IN_WORKDIR = "workdir"  # config value: <workdir>/compilation_cache
SUBDIR = "compilation_cache"


def directory_for(setting: str, workdir: str) -> Optional[str]:
  """The cache directory a `compilation_cache` config value names (None: no cache)."""
  if not setting:
    return None
  if setting == IN_WORKDIR:
    return os.path.join(workdir, SUBDIR)
  return setting


def enable(directory: str, min_compile_seconds: float = 0.5):
  """Caches every program that takes at least `min_compile_seconds` to compile in `directory`
  (local or any path JAX's cache accepts, e.g. gs://). Call before the first compilation."""
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
