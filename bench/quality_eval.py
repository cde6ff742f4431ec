"""Quality of a meta-trained learned optimizer: it vs tuned Adam, on held-out seeds and tasks.

For every task below, the learned optimizer and Adam at each learning rate of the half-decade
sweep 1e-4 .. 1e-1 train the task from scratch for the meta-training horizon (1000 steps) on
the same held-out seeds (same initial params, same batches); the best Adam rate is the one
with the lowest mean training loss. Reported per optimizer: mean training loss over the
horizon and final loss (last 5% of steps), mean ± std over seeds (`lopt_tpu.evaluation`). The
learned optimizer at theta-init is evaluated too (ablation: what meta-training added).

Tasks: the meta-training task (digits MLP, 32 ReLU units, batch 128) and tasks never seen in
meta-training: other widths, depths and activations on digits, and a draw of the masked
`image_mlp_family`.

Writes into --out: `<task>.{png,md,json}` per task, `summary.md` (one table),
`summary.json` (every figure) and `summary.png` (learned vs best Adam, all tasks). With
--record, the tuned-Adam figures (and a short-horizon check figure for
tests/test_pretrained.py) are written into the pretrained optimizer's sidecar.

  python bench/quality_eval.py --export_workdir=/tmp/lopt_quality --record  # export + evaluate
  python bench/quality_eval.py --name=digits_mlp_v1 --out=docs/quality --record
  python bench/quality_eval.py --theta=/path/theta.msgpack --sidecar=/path/theta.json --out=/tmp/q

About 3 minutes on the 2-core CPU machine.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib.backends import backend_agg  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from lopt_tpu import evaluation  # pylint: disable=wrong-import-position
from lopt_tpu import pretrained  # pylint: disable=wrong-import-position
from lopt_tpu.tasks import datasets  # pylint: disable=wrong-import-position
from lopt_tpu.tasks import image_mlp  # pylint: disable=wrong-import-position

# Held-out evaluation seeds: the app's convention (lopt_tpu/eval_run.py), far from any seed
# meta-training derives its keys from.
SEEDS = tuple(1_000_000 + i for i in range(5))
NUM_STEPS = 1000  # the meta-training horizon
# The short-horizon figure tests/test_pretrained.py checks against (fast enough for a test).
SHORT_STEPS = 300
SHORT_SEEDS = (1_000_000, 1_000_001)
FAMILY_MEMBER_KEY = 2024  # which draw of the held-out family is evaluated
# Activations meta-training never uses (configs/quality_digits.py trains on relu and tanh).
HELD_OUT_ACTIVATIONS = ("gelu", "swish", "elu")
TRAINING_TASK = "digits_mlp_32_relu"


def family_member():
  """One fixed draw of the masked image-MLP family on digits with held-out activations (width
  16-64, depth 1-3, init scale 0.5-2 as by default); its architecture is in its name."""
  family = image_mlp.ImageMLPFamily(datasets.load_digits8(), activations=HELD_OUT_ACTIVATIONS)
  task_params = family.sample(jax.random.key(FAMILY_MEMBER_KEY))
  task = family.task_fn(task_params)
  tp = {k: np.asarray(v).item() for k, v in task_params.items()}
  act = family.activations[tp["activation"]]
  task.name = (f"image_mlp_family[{tp['width']}x{tp['depth']} {act}, "
               f"init x{tp['init_scale']:.2f}]")
  return task


def tasks():
  """(key, task, held_out) for every evaluated task; the first is the meta-training task."""
  return [
      (TRAINING_TASK, image_mlp.digits_mlp(), False),
      ("digits_mlp_128x128_tanh", image_mlp.digits_mlp(hidden_sizes=(128, 128),
                                                       activation="tanh"), True),
      ("digits_mlp_64_gelu", image_mlp.digits_mlp(hidden_sizes=(64,), activation="gelu"), True),
      ("digits_mlp_32x32x32_swish_b32", image_mlp.digits_mlp(
          hidden_sizes=(32, 32, 32), activation="swish", batch_size=32), True),
      ("image_mlp_family_member", family_member(), True),
  ]


def _stats(summary):
  return {k: summary[k] for k in ("mean_loss_mean", "mean_loss_std", "final_loss_mean",
                                  "final_loss_std", "num_diverged")}


def evaluate_task(learned_opt, theta, theta_init, key, task, held_out, out_dir):
  """Learned (trained and at init) vs the Adam sweep on one task; writes its report."""
  t0 = time.perf_counter()
  result = evaluation.evaluate(learned_opt, theta, task, NUM_STEPS, seeds=SEEDS)
  paths = evaluation.write_report(result, out_dir, prefix=key)
  init = evaluation.summarize(evaluation.train_curves(
      task, learned_opt.opt_fn(theta_init), NUM_STEPS, evaluation.seed_keys(SEEDS)))
  learned, adam = result.summaries[evaluation.LEARNED], result.summaries[result.best_adam]
  row = {"task": key, "task_name": result.task_name, "held_out": held_out,
         "learned": _stats(learned), "learned_at_init": _stats(init),
         "best_adam_lr": result.best_adam_lr, "best_adam": _stats(adam),
         "adam_mean_loss_by_lr": {f"{lr:g}": result.summaries[evaluation.adam_name(lr)][
             "mean_loss_mean"] for lr in result.adam_learning_rates},
         "mean_loss_ratio": learned["mean_loss_mean"] / adam["mean_loss_mean"],
         "final_loss_ratio": learned["final_loss_mean"] / adam["final_loss_mean"],
         "plot": os.path.relpath(paths["png"], out_dir), "seconds": time.perf_counter() - t0}
  row["mean_curves"] = {
      "learned": evaluation.fill_diverged(result.curves[evaluation.LEARNED]["train_loss"]
                                          ).mean(axis=0).tolist(),
      "best_adam": evaluation.fill_diverged(result.curves[result.best_adam]["train_loss"]
                                            ).mean(axis=0).tolist()}
  return row


def short_horizon_figures(learned_opt, theta):
  """The figure tests/test_pretrained.py re-checks: the same comparison at SHORT_STEPS."""
  result = evaluation.evaluate(learned_opt, theta, image_mlp.digits_mlp(), SHORT_STEPS,
                               seeds=SHORT_SEEDS)
  learned, adam = result.summaries[evaluation.LEARNED], result.summaries[result.best_adam]
  return {"task": TRAINING_TASK, "num_steps": SHORT_STEPS, "seeds": list(SHORT_SEEDS),
          "best_adam_lr": result.best_adam_lr,
          "best_adam_mean_loss": adam["mean_loss_mean"],
          "best_adam_final_loss": adam["final_loss_mean"],
          "learned_mean_loss": learned["mean_loss_mean"],
          "learned_final_loss": learned["final_loss_mean"]}


def _pm(stats, stat, digits=4):
  return f"{stats[stat + '_mean']:.{digits}g} ± {stats[stat + '_std']:.2g}"


def summary_markdown(rows, title):
  lines = [f"# {title}", "",
           f"{NUM_STEPS} inner steps (the meta-training horizon), held-out seeds {list(SEEDS)}; "
           "mean ± std over seeds. Mean loss: training loss averaged over all steps; final "
           f"loss: over the last {evaluation.final_window(NUM_STEPS)} steps. Tuned Adam: the "
           "best of the half-decade sweep 1e-4 .. 1e-1 by mean loss. Ratio: learned / tuned "
           "Adam (< 1: the learned optimizer is better).", "",
           "| task | held out | learned: mean loss | learned: final loss | tuned Adam (lr) | "
           "Adam: mean loss | Adam: final loss | ratio mean | ratio final | "
           "learned at theta-init: mean / final |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    init = r["learned_at_init"]
    lines.append(
        f"| {r['task_name']} | {'yes' if r['held_out'] else 'no (meta-training task)'} | "
        f"{_pm(r['learned'], 'mean_loss')} | {_pm(r['learned'], 'final_loss')} | "
        f"{r['best_adam_lr']:g} | {_pm(r['best_adam'], 'mean_loss')} | "
        f"{_pm(r['best_adam'], 'final_loss')} | {r['mean_loss_ratio']:.3f} | "
        f"{r['final_loss_ratio']:.3f} | {init['mean_loss_mean']:.4g} / "
        f"{init['final_loss_mean']:.4g} |")
  lines += ["", "Plots: " + ", ".join(f"[{r['task']}]({r['plot']})" for r in rows) +
            "; all tasks: [summary.png](summary.png)."]
  return "\n".join(lines) + "\n"


def summary_plot(rows, path):
  """Mean training-loss curves, learned vs best Adam, one panel per task."""
  fig = figure.Figure(figsize=(4 * len(rows), 3.6), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  for i, r in enumerate(rows):
    ax = fig.add_subplot(1, len(rows), i + 1)
    ax.plot(r["mean_curves"]["best_adam"], color="tab:blue",
            label=f"Adam {r['best_adam_lr']:g} (tuned)")
    ax.plot(r["mean_curves"]["learned"], color="crimson", label="learned")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(("held out: " if r["held_out"] else "meta-training: ") + r["task"], fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.axes[0].set_ylabel(f"training loss (mean over {len(SEEDS)} seeds)")
  fig.tight_layout()
  fig.savefig(path, bbox_inches="tight")


def git_commit():
  out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                       check=False).stdout.strip()
  return out or None


def restore_thetas(exp, config, workdir, num):
  """The thetas of the newest `num` checkpoints of a run (oldest first) and their steps."""
  from lopt_tpu import checkpointing  # pylint: disable=g-import-not-at-top
  from lopt_tpu import train  # pylint: disable=g-import-not-at-top
  target = train.init_state(exp, config.seed)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    steps = ckpt.steps()[-num:]
    if len(steps) < num:
      raise SystemExit(f"{workdir} keeps {len(steps)} checkpoints, --average_last asks for {num}")
    thetas = [ckpt.restore(step, target).gradient_learner_state.theta for step in steps]
  finally:
    ckpt.close()
  return thetas, steps


def export(args):
  """Writes the theta of a finished meta-training run in --export_workdir as pretrained --name:
  the mean of the thetas of its newest --average_last checkpoints (1: the final theta)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from lopt_tpu import experiment  # pylint: disable=g-import-not-at-top
  from lopt_tpu import train  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  exp = experiment.build(config)
  thetas, steps = restore_thetas(exp, config, args.export_workdir, args.average_last)
  if steps[-1] != config.num_outer_steps:
    raise SystemExit(f"{args.export_workdir} holds outer step {steps[-1]}, the config asks for "
                     f"{config.num_outer_steps}: finish the run first")
  # PES iterates are noisy; their mean (Polyak averaging over the last checkpoints) is a
  # steadier optimizer than the last iterate (docs/quality/search.md).
  theta = jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *thetas)
  meta = {
      "name": args.name,
      "learned_optimizer": {"name": config.learned_optimizer.name,
                            "kwargs": config.learned_optimizer.kwargs.to_dict()},
      "theta_sha256": pretrained.theta_fingerprint(theta),
      "theta": {"averaged_outer_steps": steps,
                "final_theta_sha256": pretrained.theta_fingerprint(thetas[-1])},
      "meta_training": {
          "command": f"python main.py --config={os.path.relpath(args.config, REPO)} "
                     "--workdir=WORKDIR",
          "config": json.loads(config.to_json()), "seed": config.seed,
          "outer_steps": steps[-1], "git_commit": git_commit(), "wall_s": args.train_wall_s,
          "load_average": args.train_load, "machine": f"{os.cpu_count()} CPU cores"},
  }
  pretrained.save(args.name, theta, meta)
  print(f"exported the mean theta of outer steps {steps} of {args.export_workdir} as "
        f"{args.name}")


def load(args):
  if args.theta:
    with open(args.sidecar) as f:
      meta = json.load(f)
    directory, name = os.path.split(os.path.splitext(args.theta)[0])
    learned_opt, theta = pretrained.load(name, directory)
    return args.theta, meta, learned_opt, theta
  learned_opt, theta = pretrained.load(args.name)
  return args.name, pretrained.metadata(args.name), learned_opt, theta


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", default="digits_mlp_v1", help="a pretrained.list() name")
  parser.add_argument("--theta", help="a theta .msgpack instead of --name (needs --sidecar "
                      "next to it with the same stem)")
  parser.add_argument("--sidecar", help="the JSON sidecar of --theta")
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "quality"))
  parser.add_argument("--record", action="store_true",
                      help="write the tuned-Adam and short-horizon figures into the sidecar")
  parser.add_argument("--export_workdir", help="first export the newest checkpoint of this "
                      "finished meta-training run as pretrained --name (needs --config)")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "quality_digits.py"))
  parser.add_argument("--average_last", type=int, default=3, help="export the mean theta of "
                      "the run's newest N checkpoints (the quality config keeps 3: outer steps "
                      "2500, 2750, 3000); 1: the final theta")
  parser.add_argument("--train_wall_s", type=float, help="measured wall time of the run")
  parser.add_argument("--train_load", help="`uptime` load averages during the run")
  args = parser.parse_args()
  if args.export_workdir:
    export(args)

  label, meta, learned_opt, theta = load(args)
  theta_init = learned_opt.init(jax.random.key(0))
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  rows = []
  for key, task, held_out in tasks():
    rows.append(evaluate_task(learned_opt, theta, theta_init, key, task, held_out, args.out))
    r = rows[-1]
    print(f"{key}: learned {r['learned']['mean_loss_mean']:.4g} / "
          f"{r['learned']['final_loss_mean']:.4g}, Adam {r['best_adam_lr']:g} "
          f"{r['best_adam']['mean_loss_mean']:.4g} / {r['best_adam']['final_loss_mean']:.4g} "
          f"(ratios {r['mean_loss_ratio']:.3f} / {r['final_loss_ratio']:.3f}, "
          f"{r['seconds']:.0f} s)", flush=True)
  short = short_horizon_figures(learned_opt, theta)
  print(f"short horizon ({SHORT_STEPS} steps): {short}")
  title = f"Quality of {label} ({meta['learned_optimizer']['name']}) vs tuned Adam"
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary_markdown(rows, title))
  summary_plot(rows, os.path.join(args.out, "summary.png"))
  record = {"pretrained": label, "learned_optimizer": meta["learned_optimizer"],
            "num_steps": NUM_STEPS, "seeds": list(SEEDS), "tasks": [
                {k: v for k, v in r.items() if k != "mean_curves"} for r in rows],
            "short_horizon": short, "git_commit": git_commit(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                        "load_average": os.getloadavg()},
            "seconds": time.perf_counter() - t0}
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(record, f, indent=2)
  if args.record and not args.theta:
    meta["evaluation"] = {"num_steps": NUM_STEPS, "seeds": list(SEEDS), "tasks": {
        r["task"]: {"held_out": r["held_out"], "best_adam_lr": r["best_adam_lr"],
                    "best_adam": r["best_adam"], "learned": r["learned"]} for r in rows},
                          "evaluated_at_commit": record["git_commit"]}
    meta["short_horizon_check"] = short
    pretrained.save(args.name, theta, meta)
    print(f"recorded the figures in {args.name}.json")
  print(f"wrote {args.out}/summary.{{md,json,png}} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
