"""Smoke test of bench/bench.py: the smallest workload end to end in a subprocess.

Not a benchmark (figures from 3 steps mean nothing); it checks that every figure the JSON
promises is there and is a finite positive number, and that the Markdown table is printed.
20-40 s on the 2-core CPU machine, depending on its load (most of it compiling).
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]

POSITIVE = ("setup_s", "init_s", "first_step_s", "inner_steps_per_call", "inner_steps_per_s",
            "peak_rss_gib", "peak_rss_gib_incl_baselines", "xla_raw_flops", "flops_per_step",
            "achieved_gflops", "matmul_gflops", "pct_of_matmul", "adam_first_step_s",
            "adam_inner_steps_per_call", "pes_over_adam", "cores_busy", "subprocess_wall_s")
SPREADS = ("step_s", "adam_step_s", "matmul_s")


def _positive(value, what):
  assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (what, value)


def test_bench_quadratic_smoke(tmp_path):
  out = tmp_path / "results.json"
  proc = subprocess.run(
      [sys.executable, str(REPO / "bench" / "bench.py"), "--workloads", "quadratic",
       "--steps", "3", "--warmup", "1", "--warm_cache", "--first_step_repeats", "1",
       "--out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "| quadratic | 1 |" in proc.stdout

  data = json.loads(out.read_text())
  machine = data["machine"]
  assert machine["cores"] >= 1 and machine["cpu_model"] and machine["date"]
  assert machine["versions"]["jax"] and machine["versions"]["jaxlib"]
  (r,) = data["results"]
  assert "error" not in r, r
  assert (r["workload"], r["devices"], r["steps"], r["warmup"]) == ("quadratic", 1, 3, 1)
  assert r["num_tasks"] == {"quadratic_family": 4}
  assert r["inner_steps_per_call"] == r["adam_inner_steps_per_call"] == 2 * 50 * 4
  assert r["recompiles_while_timing"] == 0
  for name in POSITIVE:
    _positive(r[name], name)
  for name in SPREADS:
    s = r[name]
    for k in ("min", "p10", "median", "p90", "max"):
      _positive(s[k], f"{name}.{k}")
    assert s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"], (name, s)
  assert r["step_s"]["n"] == 3
  # The trip-count correction adds the 49 missing inner steps to XLA's raw count.
  assert r["flops_per_step"] > r["xla_raw_flops"]
  _positive(r["inner_step_flops"][0], "inner_step_flops")
  # A process with a warm persistent compilation cache skips the compiles: its first step is
  # faster than that of the process that filled the cache (by ~2-3x here). Its init is too on a
  # quiet machine, but the init's smaller margin flipped once with the cores contended.
  cold, warm = r["warm_cache"]["cold"], r["warm_cache"]["warm"]
  assert warm["first_step_s"] < cold["first_step_s"], r
  _positive(warm["init_s"], "warm init_s")
  assert "Compilation cache, quadratic on 1 devices" in proc.stdout
  # One more cold first step in its own process; the table shows median [min-max] of both.
  (repeat,) = r["first_step_repeats_s"]
  _positive(repeat, "first_step_repeats_s")
  lo, hi = sorted([r["first_step_s"], repeat])
  assert f"| {(lo + hi) / 2:.2f} [{lo:.2f}–{hi:.2f}] |" in proc.stdout
  # The first step split into JAX's own phase timings: each positive, together within it.
  for phases, total in [(r["first_step_phases"], r["first_step_s"]),
                        (r["first_step_repeats_phases"][0], repeat),
                        (warm["first_step_phases"], warm["first_step_s"])]:
    for name in ("trace_s", "lower_s", "xla_compile_s"):
      _positive(phases[name], name)
    assert sum(phases.values()) <= total, (phases, total)
  # The warm cache skips XLA's work, not JAX's tracing and lowering.
  assert warm["first_step_phases"]["xla_compile_s"] < cold["first_step_phases"]["xla_compile_s"]
  assert "First step, quadratic on 1 devices (median of 2 cold processes, s): trace " in proc.stdout
  assert math.isfinite(r["final_meta_loss"])
  for name in ("loadavg_before", "loadavg_after"):
    assert len(r[name]) == 3 and all(math.isfinite(x) and x >= 0 for x in r[name])


def test_startup_smoke(tmp_path):
  """bench/startup.py times fresh main.py runs to their first outer step (one run of the tiny
  config here, ~15 s)."""
  out = tmp_path / "startup.json"
  proc = subprocess.run(
      [sys.executable, str(REPO / "bench" / "startup.py"), "--runs", "1", "--config",
       "configs/test.py", "--out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (tree,) = json.loads(out.read_text())["trees"].values()
  first, done = tree["first_update_s"], tree["exit_s"]
  _positive(first["median"], "first_update_s")
  assert first["n"] == 1 and first["median"] < done["median"], tree
  assert f"| {REPO} | {first['median']:.2f} [" in proc.stdout
