"""How long `python main.py` takes from launch to its first outer step, as a user sees it.

`bench.py` times the outer step's trace + compile alone, in a process that does nothing else.
A real run also imports TensorFlow (for clu's TensorBoard writer), loads the data, builds or
restores the state, and since session 6 compiles the outer step *while* it does those
(`SingleMachineGradientLearner.start_compiling_update`). This script measures the sum: each
run is a fresh `main.py` process with a fresh workdir and no persistent compilation cache
(what a new experiment pays), timed to the log line of outer step 1 and to the process exit.
Give several source trees to compare them, run interleaved:

  python bench/startup.py                                 # this checkout, 5 runs
  python bench/startup.py --trees /tmp/old_checkout,. --runs 4 --out startup.json
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import timing  # next to this script

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST_STEP_LINE = "outer step 1:"


def one_run(tree: str, config: str, timeout: float) -> dict:
  """Launches main.py from `tree`; seconds to outer step 1's log line and to exit."""
  workdir = tempfile.mkdtemp(prefix="lopt_startup_")
  try:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}",
         "--config.num_outer_steps=1", "--config.log_every=1", "--config.eval.at_end=False",
         "--config.compilation_cache="],
        cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    first, tail = None, []
    for line in proc.stderr:  # absl logs to stderr
      if first is None and FIRST_STEP_LINE in line:
        first = time.perf_counter() - t0
      tail = (tail + [line])[-20:]
    code = proc.wait()
    killer.cancel()
    total = time.perf_counter() - t0
    if code != 0 or first is None:
      raise RuntimeError(f"main.py in {tree} failed (exit {code}):\n{''.join(tail)}")
    return {"first_update_s": first, "exit_s": total}
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--trees", default=str(REPO),
                      help="comma-separated source trees, each with main.py (default: this one)")
  parser.add_argument("--config", default="configs/pes_digits.py",
                      help="config file, relative to each tree (default: the Part 5 workload)")
  parser.add_argument("--runs", type=int, default=5, help="fresh processes per tree")
  parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  trees = [os.path.abspath(t) for t in args.trees.split(",")]
  runs = {t: [] for t in trees}
  for i in range(args.runs):
    for tree in trees if i % 2 == 0 else trees[::-1]:  # interleaved: the host drifts
      r = one_run(tree, args.config, args.timeout)
      runs[tree].append(r)
      print(f"{tree}: first update {r['first_update_s']:.2f} s, exit {r['exit_s']:.2f} s",
            flush=True)
  results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": args.config,
             "cores": os.cpu_count(), "loadavg_after": os.getloadavg(), "trees": {}}
  print(f"\n| tree | launch to outer step 1, s (median [min–max] of {args.runs}) | to exit, s |")
  print("|---|---|---|")
  for tree in trees:
    first = timing.spread([r["first_update_s"] for r in runs[tree]])
    done = timing.spread([r["exit_s"] for r in runs[tree]])
    results["trees"][tree] = {"first_update_s": first, "exit_s": done, "runs": runs[tree]}
    print(f"| {tree} | {first['median']:.2f} [{first['min']:.2f}–{first['max']:.2f}] | "
          f"{done['median']:.2f} |")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
