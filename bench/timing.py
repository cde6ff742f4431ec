"""Timing helpers shared by the benchmark's measurements."""

import time

import jax
import numpy as np


def spread(times):
  """Median, mean, min, p10, p90, max and count of a list of seconds."""
  t = np.asarray(times)
  return {"median": float(np.median(t)), "mean": float(np.mean(t)), "min": float(t.min()),
          "p10": float(np.percentile(t, 10)), "p90": float(np.percentile(t, 90)),
          "max": float(t.max()), "n": int(t.size)}


def timed_steps(step, state, num):
  """Runs `state = step(state)` `num` times, blocking on each; returns (state, seconds)."""
  times = []
  for _ in range(num):
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(state))
    times.append(time.perf_counter() - t0)
  return state, times
