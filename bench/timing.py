"""Timing helpers shared by the benchmark's measurements."""

import contextlib
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


# JAX's own monitoring events for the stages of a jit's first call (jax._src.dispatch).
_PHASE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                 "/jax/core/compile/backend_compile_duration": "xla_compile_s"}


@contextlib.contextmanager
def compile_phases():
  """Seconds spent tracing, lowering and XLA-compiling inside the `with` block.

  Read from the durations JAX itself reports (`jax.monitoring`), so the timed call is the
  ordinary one: a first step timed this way is the same call a user makes, split afterwards
  into its phases. Nested jits traced inside an outer one report nothing of their own (JAX
  times only the outermost trace), so the sums do not double count. `xla_compile_s` includes
  loading from a persistent compilation cache when one is warm.
  """
  phases = dict.fromkeys(_PHASE_EVENTS.values(), 0.0)

  def listener(event, duration, **_):
    if event in _PHASE_EVENTS:
      phases[_PHASE_EVENTS[event]] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield phases
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
