"""Measures one benchmark workload in this process; `bench.py` runs it in a fresh subprocess.

The process must be fresh so that compile time and peak memory belong to this workload alone,
and the fake-device count (XLA_FLAGS / PJRT_NPROC) must be in the environment before JAX is
imported, which is why `bench.py` sets them on the child's environment rather than here.

Order matters for the peak-memory figure: the PES workload is built, initialized, compiled
and timed first, and `ru_maxrss` is read right after; only then come the extra compiles for
FLOP counting, the Adam baseline and the matmul reference (whose peak is reported separately).

  python bench/measure.py --workload mlp32 --devices 1 --steps 50 --warmup 5 --out r.json
"""

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import optax

# Modules next to this script (its folder is on sys.path when run as a script).
import adam_baseline
import timing
import lopt_tpu
from lopt_tpu import compile_cache
from lopt_tpu.outer import sharding
from lopt_tpu.outer.estimators import base as est_base

TRUNC_LENGTH = 50
MIN_LENGTH, MAX_LENGTH = 100, 300
OFFSET = 300
DATASET_NOTE = ("digits8 (scikit-learn 8x8 digits; Fashion-MNIST 8x8 needs internet, "
                "so digits_mlp stands in for fmnist8_mlp)")

# workload name -> [(family name, num_tasks)]
WORKLOADS = {
    "part5": [("quadratic", 4), ("mlp", 4)],
    "mlp4": [("mlp", 4)],
    "mlp32": [("mlp", 32)],
    "mlp128": [("mlp", 128)],
    "quadratic": [("quadratic", 4)],
}


def make_family(name):
  if name == "quadratic":
    return lopt_tpu.FixedDimQuadraticFamily(10)
  return lopt_tpu.single_task_to_family(lopt_tpu.digits_mlp())


def round_up(n, multiple):
  return -(-n // multiple) * multiple


def build(workload, devices, tasks_per_chunk=None):
  """The learner, its estimators and a note on task counts rounded up for the mesh.

  `tasks_per_chunk` is passed to every TruncatedUnroll (None: the library's default)."""
  lopt = lopt_tpu.MLPLOpt()
  sched = lopt_tpu.LogUniformLengthSchedule(min_length=MIN_LENGTH, max_length=MAX_LENGTH)
  estimators, notes = [], []
  for fam_name, num_tasks in WORKLOADS[workload]:
    tasks = round_up(num_tasks, devices)
    if tasks != num_tasks:
      notes.append(f"{fam_name}: num_tasks {num_tasks} -> {tasks} (divisible by {devices})")
    unroll = lopt_tpu.TruncatedUnroll(make_family(fam_name), lopt, sched, num_tasks=tasks,
                                      random_initial_iteration_offset=OFFSET,
                                      tasks_per_chunk=tasks_per_chunk)
    estimators.append(lopt_tpu.TruncatedPES(unroll, trunc_length=TRUNC_LENGTH))
  mesh = sharding.task_mesh() if devices > 1 else None
  learner = lopt_tpu.SingleMachineGradientLearner(lopt, estimators, optax.adam(1e-3), mesh=mesh)
  return learner, estimators, mesh, "; ".join(notes)


def tasks_per_chunk(est, est_state, devices):
  """The chunk size the PES unroll uses on each device (its [2, T / devices] pair of states)."""
  local = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((2, x.shape[1] // devices) + x.shape[2:], x.dtype),
      est_state.pair)
  return est.unroll.tasks_per_chunk_of(local)


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def cpu_seconds():
  """User + system CPU seconds of this process (all its threads) so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def flops_of(compiled):
  """Total 'flops' of a compiled executable; cost_analysis() is a dict or a list of dicts."""
  ca = compiled.cost_analysis()
  if isinstance(ca, dict):
    ca = [ca]
  return float(sum(d.get("flops", 0.0) for d in ca or []))


def abstract(tree):
  """ShapeDtypeStructs without sharding: lowering them gives the unsharded, global program."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def one_inner_step_flops(est, theta, est_state, key):
  """XLA flops of one inner step of all of an estimator's antithetic runs (global, unsharded).

  XLA's cost analysis counts a while-loop body once, whatever its trip count, so the flops it
  reports for the outer step hold one inner step per estimator, not `trunc_length`; this is
  the missing per-step amount. The perturbed thetas are inputs here, so that drawing the
  perturbations (once per outer step, already counted) is not charged to every inner step.
  """
  thetas = jax.eval_shape(
      lambda th, idx: est_base.antithetic_thetas(
          th, est_base.sample_perturbations(th, key, idx, est.std)),
      theta, est_state.pair.task_index[0])
  one_step = lambda thetas, pair, key: est.unroll.unroll(thetas, pair, key, 1)
  lowered = jax.jit(one_step).lower(abstract(thetas), abstract(est_state.pair), abstract(key))
  return flops_of(lowered.compile())


def step_flops(learner, estimators, state, key):
  """XLA's raw flops of the compiled outer step, and the trip-count-corrected total."""
  update = learner._update  # pylint: disable=protected-access
  raw = flops_of(update.lower(state, key, with_metrics=True).compile())
  # A sharded program's cost analysis is per device (checked: raw scales as 1/devices).
  devices = 1 if learner.mesh is None else learner.mesh.devices.size
  theta = state.gradient_learner_state.theta
  per_step = [one_inner_step_flops(est, theta, s, key)
              for est, s in zip(estimators, state.gradient_estimator_states)]
  total = raw * devices + sum((est.trunc_length - 1) * b for est, b in zip(estimators, per_step))
  return {"xla_raw_flops": raw, "xla_raw_flops_times_devices": raw * devices,
          "inner_step_flops": per_step, "flops_per_step": total}


def matmul_gflops(n=2048, repeats=7):
  """FLOP/s of a jitted float32 n x n @ n x n matmul on the default device (median of runs)."""
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  cpu_before = cpu_seconds()
  _, times = timing.timed_steps(lambda _: mm(a, b), None, repeats)
  stats = dict(timing.spread(times), cores_busy=(cpu_seconds() - cpu_before) / sum(times))
  return 2 * n**3 / statistics.median(times) / 1e9, stats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--out", required=True)
  parser.add_argument("--compilation_cache", default="",
                      help="persistent compilation cache directory (default: none)")
  parser.add_argument("--first_step_only", action="store_true",
                      help="only build, init and run one step: for warm-cache timings")
  args = parser.parse_args()
  if args.compilation_cache:
    compile_cache.enable(args.compilation_cache)
  if jax.device_count() != args.devices:
    raise SystemExit(f"expected {args.devices} devices, JAX sees {jax.device_count()}: "
                     "set XLA_FLAGS before JAX starts (bench.py does)")
  result = {"workload": args.workload, "devices": args.devices, "steps": args.steps,
            "warmup": args.warmup, "platform": jax.devices()[0].platform}
  result.update(first_step(args) if args.first_step_only else measure_pes(args))
  print(json.dumps(result, indent=1, sort_keys=True))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)


def first_step(args):
  """Seconds to init and to the first outer step's result, and nothing else."""
  learner, _, _, _ = build(args.workload, args.devices)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  state = jax.block_until_ready(learner.init(key))
  t1 = time.perf_counter()
  with timing.compile_phases() as phases:
    jax.block_until_ready(learner.update(state, key)[1])
  return {"init_s": t1 - t0, "first_step_s": time.perf_counter() - t1,
          "first_step_phases": phases}


def time_learner(args):
  """Builds, initializes and times the PES learner; the figures, then what analysis needs."""
  t0 = time.perf_counter()
  learner, estimators, mesh, note = build(args.workload, args.devices)
  setup_s = time.perf_counter() - t0
  key = jax.random.key(0)
  t0 = time.perf_counter()
  state = jax.block_until_ready(learner.init(key))
  init_s = time.perf_counter() - t0
  losses = []

  def step(state):
    state, loss, _ = learner.update(state, key)
    losses.append(loss)
    return state

  with timing.compile_phases() as first_phases:
    state, (first_s,) = timing.timed_steps(step, state, 1)
  state, _ = timing.timed_steps(step, state, args.warmup)
  cache_before = learner._update._cache_size()  # pylint: disable=protected-access
  cpu_before = cpu_seconds()
  state, times = timing.timed_steps(step, state, args.steps)
  cores_busy = (cpu_seconds() - cpu_before) / sum(times)
  stats = timing.spread(times)
  inner = sum(est.inner_steps_per_call for est in estimators)
  figures = {
      "num_tasks": {est.unroll.task_family.name: est.unroll.num_tasks for est in estimators},
      "num_tasks_note": note, "trunc_length": TRUNC_LENGTH,
      "tasks_per_chunk": {  # per device: the unroll advances this many tasks at a time
          est.unroll.task_family.name: tasks_per_chunk(est, s, args.devices)
          for est, s in zip(estimators, state.gradient_estimator_states)},
      "setup_s": setup_s, "init_s": init_s, "first_step_s": first_s,
      "first_step_phases": first_phases, "step_s": stats,
      "recompiles_while_timing":
          learner._update._cache_size() - cache_before,  # pylint: disable=protected-access
      "cores_busy": cores_busy, "inner_steps_per_call": inner,
      "inner_steps_per_s": inner / stats["median"], "peak_rss_gib": peak_rss_gib(),
      "final_meta_loss": float(losses[-1]),
  }
  return figures, (learner, estimators, mesh, state, key)


def measure_pes(args):
  """The learner's figures, then FLOPs, the Adam baseline and the matmul reference."""
  figures, (learner, estimators, mesh, state, key) = time_learner(args)
  t0 = time.perf_counter()
  # Counted on the same step without task chunking: same arithmetic, but chunking adds a loop
  # (lax.map) whose body XLA's cost analysis would count once instead of once per chunk.
  flop_learner, flop_estimators, _, _ = build(args.workload, args.devices, tasks_per_chunk=0)
  flops = step_flops(flop_learner, flop_estimators, state, key)
  t1 = time.perf_counter()
  adam = adam_baseline.measure([est.unroll.task_family for est in estimators],
                               [est.unroll.num_tasks for est in estimators], TRUNC_LENGTH,
                               mesh, args.steps, args.warmup)
  t2 = time.perf_counter()
  mm_gflops, mm_spread = matmul_gflops()
  median = figures["step_s"]["median"]
  achieved = flops["flops_per_step"] / median / 1e9
  uses_mlp = any(f == "mlp" for f, _ in WORKLOADS[args.workload])
  return dict(
      figures, **flops, dataset=DATASET_NOTE if uses_mlp else "none (quadratic only)",
      peak_rss_gib_incl_baselines=peak_rss_gib(), achieved_gflops=achieved,
      matmul_gflops=mm_gflops, matmul_s=mm_spread, pct_of_matmul=100 * achieved / mm_gflops,
      adam_step_s=adam["step_s"], adam_first_step_s=adam["first_step_s"],
      adam_inner_steps_per_call=adam["inner_steps_per_call"],
      pes_over_adam=median / adam["step_s"]["median"],
      bench_overhead_s={"flop_analysis": t1 - t0, "adam_baseline": t2 - t1,
                        "matmul": time.perf_counter() - t2})


if __name__ == "__main__":
  main()
