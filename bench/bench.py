"""Benchmark of the meta-training outer step (issue 5): speed, compile time, memory, FLOP/s.

Each (workload, device count) pair runs in a fresh subprocess (`measure.py`), so compile
time and peak memory are its own and the fake-device count can be set before JAX starts.
Prints a Markdown table with the machine's facts and load averages, and writes every figure
to `--out` as JSON. See bench/README.md for what each figure means.

  python bench/bench.py                                   # all workloads, 1 device
  python bench/bench.py --devices 1,2,4,8 --workloads mlp32 --out scaling.json
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_WORKLOADS = "part5,mlp4,mlp32,mlp128,quadratic"
KNOWN_WORKLOADS = ("part5", "mlp4", "mlp32", "mlp128", "quadratic")


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def git_state():
  """Commit and the modified tracked files: numbers belong to the working tree they ran on."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout
  status = git("status", "--porcelain", "--untracked-files=no").splitlines()
  return {"commit": git("rev-parse", "--short", "HEAD").strip(),
          "modified": [line[3:] for line in status if line.strip()]}


def machine_facts():
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = None
  return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
          "versions": versions, "date": datetime.datetime.now().astimezone().isoformat(
              timespec="seconds"), "hostname": platform.node(), "git": git_state()}


def child_env(devices):
  """This environment with the fake-device count and the XLA CPU thread pool set for JAX."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  # One pool thread per core (at least one per device), as main.py sets it: more threads than
  # cores oversubscribe them. Fewer than 2 per device would deadlock steps dispatched without
  # waiting (shared/notes/multihost_on_cpu.md), but the bench waits for every step, as
  # main.py's loop does on several CPU devices (train.one_step_in_flight).
  env["PJRT_NPROC"] = str(max(devices, os.cpu_count() or 1))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return env


def measure_command(workload, devices, out, *options):
  """The command line running measure.py on one (workload, device count); `--out` comes last."""
  return [sys.executable, os.path.join(HERE, "measure.py"), "--workload", workload,
          "--devices", str(devices), *options, "--out", out]


def run_one(workload, devices, args):
  """Runs measure.py in a fresh process; returns its result plus load averages and wall time."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = measure_command(workload, devices, out, "--steps", str(args.steps), "--warmup",
                          str(args.warmup))
    git, load_before, t0 = git_state(), os.getloadavg(), time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(devices), cwd=REPO, capture_output=True,
                          text=True, timeout=args.timeout, check=False)
    wall, load_after = time.perf_counter() - t0, os.getloadavg()
    if proc.returncode != 0:
      sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
      return {"workload": workload, "devices": devices, "error": f"exit {proc.returncode}",
              "loadavg_before": load_before, "loadavg_after": load_after, "git": git}
    with open(out) as f:
      result = json.load(f)
  result.update(loadavg_before=list(load_before), loadavg_after=list(load_after),
                subprocess_wall_s=wall, command=" ".join(cmd[1:-2]), git=git)
  if args.first_step_repeats:
    repeats = [first_step_only(workload, devices, args) for _ in range(args.first_step_repeats)]
    result["first_step_repeats_s"] = [r["first_step_s"] for r in repeats]
    result["first_step_repeats_phases"] = [r["first_step_phases"] for r in repeats]
  if args.warm_cache:
    result["warm_cache"] = warm_cache_first_step(workload, devices, args)
  return result


def first_step_only(workload, devices, args, *options):
  """measure.py --first_step_only in a fresh process: its init and first-step seconds."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "first.json")
    cmd = measure_command(workload, devices, out, "--first_step_only", *options)
    subprocess.run(cmd, env=child_env(devices), cwd=REPO, capture_output=True, text=True,
                   timeout=args.timeout, check=True)
    with open(out) as f:
      return json.load(f)


def first_step_cell(r):
  """The first step's seconds; with repeats, their median and range over all processes."""
  times = [r["first_step_s"]] + r.get("first_step_repeats_s", [])
  if len(times) == 1:
    return f"{times[0]:.2f}"
  return f"{statistics.median(times):.2f} [{min(times):.2f}–{max(times):.2f}]"


PHASE_NAMES = (("trace_s", "trace"), ("lower_s", "lower"), ("xla_compile_s", "XLA compile"))


def first_step_phases_line(r):
  """Where the cold first step's seconds went: the median of each phase over the processes."""
  runs = [(r["first_step_s"], r["first_step_phases"])] + list(
      zip(r.get("first_step_repeats_s", []), r.get("first_step_repeats_phases", [])))
  parts = [f"{label} {statistics.median([p[key] for _, p in runs]):.2f}"
           for key, label in PHASE_NAMES]
  rest = statistics.median([total - sum(p.values()) for total, p in runs])
  return (f"First step, {r['workload']} on {r['devices']} devices (median of {len(runs)} cold "
          f"process{'es' if len(runs) > 1 else ''}, s): {' + '.join(parts)} + the rest "
          f"(running it, dispatch) {rest:.2f}")


def warm_trace_and_lower(r):
  """Seconds the warm-cache first step still spends in JAX: the cache only skips XLA."""
  phases = r["warm_cache"]["warm"]["first_step_phases"]
  return phases["trace_s"] + phases["lower_s"]


def warm_cache_first_step(workload, devices, args):
  """Init and first-step seconds of a fresh process whose compilation cache is warm: one
  process fills a new cache, a second one is timed (what a resumed run of main.py sees)."""
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    runs = [first_step_only(workload, devices, args, "--compilation_cache", cache)
            for _ in ("fill", "warm")]
  keys = ("init_s", "first_step_s", "first_step_phases")
  return {"cold": {k: runs[0][k] for k in keys}, "warm": {k: runs[1][k] for k in keys}}


def fmt_row(r):
  if "error" in r:
    return f"| {r['workload']} | {r['devices']} | FAILED ({r['error']}) |" + " |" * 11
  s = r["step_s"]
  load = f"{r['loadavg_before'][0]:.2f}→{r['loadavg_after'][0]:.2f}"
  return (f"| {r['workload']} | {r['devices']}"
          f" | {s['median']:.4g} [{s['p10']:.4g}–{s['p90']:.4g}]"
          f" | {r['inner_steps_per_s']:,.0f} | {first_step_cell(r)} | {r['init_s']:.2f}"
          f" | {r['peak_rss_gib']:.2f} | {r['achieved_gflops']:.2f}"
          f" | {r['matmul_gflops']:.1f} ({r['matmul_s']['cores_busy']:.1f})"
          f" | {r['pct_of_matmul']:.1f} | {r['pes_over_adam']:.1f} | {r['cores_busy']:.2f}"
          f" | {load} |")


def describe_git(git):
  changes = f" + uncommitted changes to {', '.join(git['modified'])}" if git["modified"] else ""
  return git["commit"] + changes


def markdown(facts, results):
  v = facts["versions"]
  lines = [
      f"Machine: {facts['cpu_model']}, {facts['cores']} cores; jax {v['jax']}, jaxlib "
      f"{v['jaxlib']}, flax {v['flax']}, optax {v['optax']}; Python {facts['python']}; "
      f"{facts['date']}; git {describe_git(facts['git'])}",
      "",
  ]
  datasets = sorted({r["dataset"] for r in results
                     if r.get("dataset", "none").startswith("digits")})
  notes = [f"{r['workload']} on {r['devices']} devices: {r['num_tasks_note']}"
           for r in results if r.get("num_tasks_note")]
  # The tree can change under a long run (shared checkout): say which rows saw what.
  notes += [f"{r['workload']} on {r['devices']} devices ran on git {describe_git(r['git'])}"
            for r in results if r["git"] != facts["git"]]
  lines += [f"Dataset of the MLP workloads: {d}" for d in datasets]
  lines += [f"Note: {n}" for n in notes]
  lines += [first_step_phases_line(r) for r in results if "first_step_phases" in r]
  lines += [f"Compilation cache, {r['workload']} on {r['devices']} devices: first step "
            f"{r['warm_cache']['warm']['first_step_s']:.2f} s with a warm cache, of which "
            f"trace + lower {warm_trace_and_lower(r):.2f} s (cold, same "
            f"run: {r['warm_cache']['cold']['first_step_s']:.2f} s); init "
            f"{r['warm_cache']['warm']['init_s']:.2f} s (cold {r['warm_cache']['cold']['init_s']:.2f} s)"
            for r in results if r.get("warm_cache")]
  lines += [""]
  lines += [
      "| workload | devices | s/outer step (median [p10–p90]) | inner steps/s | first step s "
      "| init s | peak GiB | GFLOP/s achieved | matmul GFLOP/s (cores) | % of matmul | PES/Adam "
      "| cores busy | load 1m before→after |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  return "\n".join(lines + [fmt_row(r) for r in results])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                      help=f"comma list of {', '.join(KNOWN_WORKLOADS)}")
  parser.add_argument("--devices", default="1",
                      help="comma list of fake CPU device counts, e.g. 1,2,4,8")
  parser.add_argument("--steps", type=int, default=50, help="timed outer steps (median of)")
  parser.add_argument("--warmup", type=int, default=5,
                      help="untimed outer steps after the first (compiling) one")
  parser.add_argument("--out", default=None, help="write all results here as JSON")
  parser.add_argument("--warm_cache", action="store_true",
                      help="also time init and the first step of a fresh process whose "
                      "persistent compilation cache is warm (two more processes per row)")
  parser.add_argument("--first_step_repeats", type=int, default=0,
                      help="time the first step in this many more fresh processes (cold, no "
                      "compilation cache); the table then shows the median [min-max]")
  parser.add_argument("--timeout", type=float, default=3600,
                      help="seconds allowed per workload subprocess")
  args = parser.parse_args(argv)
  args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  unknown = sorted(set(args.workloads) - set(KNOWN_WORKLOADS))
  if unknown:
    parser.error(f"unknown workloads {unknown}; known: {', '.join(KNOWN_WORKLOADS)}")
  args.devices = [int(d) for d in args.devices.split(",")]
  if (args.steps < 1 or args.warmup < 0 or min(args.devices) < 1
      or args.first_step_repeats < 0):
    parser.error("need --steps >= 1, --warmup >= 0, --first_step_repeats >= 0 and device "
                 "counts >= 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  facts = machine_facts()
  results = []
  for workload in args.workloads:
    for devices in args.devices:
      print(f"running {workload} on {devices} device(s), load {os.getloadavg()} ...",
            file=sys.stderr, flush=True)
      results.append(run_one(workload, devices, args))
  report = markdown(facts, results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": facts, "args": vars(args), "results": results, "markdown": report},
                f, indent=1)
  print(report)
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
