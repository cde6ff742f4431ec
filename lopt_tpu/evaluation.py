"""Evaluating an optimizer on a task the way papers do: loss curves over seeds vs tuned Adam.

`train_curves` trains one task from scratch with one optimizer for a fixed horizon, for S seeds
at once (one jitted `lax.scan` over steps, `vmap`ped over seeds) and returns per-step training
losses and a few validation losses. `summarize` reduces curves to the two numbers papers report:
the mean training loss over the horizon and the final loss, each as mean and std over seeds.
`evaluate` runs a learned optimizer and Adam at every learning rate of a half-decade sweep on the
same seeds (same initial params, same batches) and picks the best Adam learning rate.
`write_report` and `write_scalars` turn the result into a plot + tables and into clu metrics.

Seed `s` derives its keys as `k_init, k_opt, k_data = split(key(s), 3)`; step t uses
`split(fold_in(k_data, t), 4)` for (train batch, train loss, optimizer, validation).
"""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from etils import epath
import jax
import jax.numpy as jnp
import matplotlib
from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np

from lopt_tpu.learned_optimizers import base as lopt_base
from lopt_tpu.optimizers import base as opt_base
from lopt_tpu.tasks import base as tasks_base

# Half-decade Adam learning-rate sweep, the usual hand-designed baseline.
ADAM_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# The final loss is the mean over the last 5% of steps: one step is too noisy on minibatches.
FINAL_FRACTION = 0.05
LEARNED = "learned"
Curves = Dict[str, np.ndarray]


def adam_name(learning_rate: float) -> str:
  return f"adam@{learning_rate:g}"


def check_adam_sweep(learning_rates: Sequence[float]) -> Tuple[float, ...]:
  """The sweep as floats, refused unless it is non-empty, finite, positive and every rate has
  its own `adam_name`: curves and summaries are keyed by name, so two rates that print alike
  (1e-3 and 1.0000001e-3) would silently keep only one of their results."""
  lrs = tuple(float(lr) for lr in learning_rates)
  if not lrs:
    raise ValueError("the Adam learning-rate sweep is empty: give at least one rate")
  bad = [lr for lr in lrs if not (np.isfinite(lr) and lr > 0)]
  if bad:
    raise ValueError(f"Adam learning rates must be finite and > 0, got {bad}")
  names = [adam_name(lr) for lr in lrs]
  twins = sorted({n for n in names if names.count(n) > 1})
  if twins:
    raise ValueError(f"Adam learning rates {[lr for lr in lrs if adam_name(lr) in twins]} share "
                     f"the name(s) {twins} (6 significant digits): give distinct rates")
  return lrs


def default_eval_every(num_steps: int) -> int:
  """About ten validation evaluations per run (plus the final one): cheap next to training."""
  return max(1, num_steps // 10)


def seed_keys(seeds: Sequence[int]) -> jax.Array:
  """One key per seed; a seed must fit in 32 bits (jax.random.key would silently keep only its
  low 32 bits, so 2**32 + 5 would train exactly like 5)."""
  for s in seeds:
    if not 0 <= int(s) < 2**32:
      raise ValueError(f"evaluation seed {s} is outside [0, 2**32): jax.random.key keeps only "
                       "its low 32 bits, so it would repeat another seed")
  return jnp.stack([jax.random.key(int(s)) for s in seeds])


# ---- curves --------------------------------------------------------------------------------


def _run_one(task: tasks_base.Task, opt: opt_base.Optimizer, num_steps: int, eval_every: int,
             key: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Trains one seed: ([num_steps] training losses, [num_eval_points] validation losses)."""
  k_init, k_opt, k_data = jax.random.split(key, 3)
  params, model_state = task.init_with_state(k_init)
  opt_state = opt.init(params, model_state=model_state, num_steps=num_steps, key=k_opt)

  def valid_loss(opt_state, key):
    k_batch, k_loss = jax.random.split(key)
    batch = task.sample_batch(k_batch, "valid")
    loss, _ = task.loss_with_state(opt.get_params(opt_state), opt.get_state(opt_state), k_loss,
                                   batch)
    return jnp.asarray(loss, jnp.float32)

  def step(opt_state, t):
    k_batch, k_loss, k_opt, k_valid = jax.random.split(jax.random.fold_in(k_data, t), 4)
    # `t` is not batched over seeds, so under vmap this stays a real branch (no wasted work).
    valid = jax.lax.cond(t % eval_every == 0, valid_loss,
                         lambda *_: jnp.full([], jnp.nan, jnp.float32), opt_state, k_valid)
    batch = task.sample_batch(k_batch, "train")
    (loss, model_state), grads = jax.value_and_grad(task.loss_with_state, has_aux=True)(
        opt.get_params(opt_state), opt.get_state(opt_state), k_loss, batch)
    opt_state = opt.update(opt_state, grads, loss=loss, model_state=model_state, key=k_opt)
    return opt_state, (jnp.asarray(loss, jnp.float32), valid)

  opt_state, (train, valid) = jax.lax.scan(step, opt_state, jnp.arange(num_steps))
  k_valid = jax.random.split(jax.random.fold_in(k_data, num_steps), 4)[3]
  valid = jnp.append(valid[::eval_every], valid_loss(opt_state, k_valid))
  return train, valid


def _curves_fn(task: tasks_base.Task, make_opt: Callable[[Any], opt_base.Optimizer],
               num_steps: int, eval_every: int) -> Callable:
  """`run(hparams, keys) -> (train [S, num_steps], valid [S, E])`, for `jit`."""
  def run(hparams, keys):
    one = lambda key: _run_one(task, make_opt(hparams), num_steps, eval_every, key)
    return jax.vmap(one)(keys)
  return run


def _as_curves(train, valid, num_steps: int, eval_every: int) -> Curves:
  steps = np.append(np.arange(0, num_steps, eval_every), num_steps)
  return {"train_loss": np.asarray(train), "valid_loss": np.asarray(valid),
          "valid_steps": steps}


def train_curves(task: tasks_base.Task, optimizer: opt_base.Optimizer, num_steps: int,
                 keys: jax.Array, eval_every: Optional[int] = None) -> Curves:
  """Trains `task` from scratch with `optimizer` once per key, all seeds in one jitted scan.

  Non-finite losses do not stop anything: they appear as nan/inf in the curves (see
  `summarize` for how they are scored).

  Args:
    task: the problem; `init_with_state`, `loss_with_state` and `sample_batch` are used.
    optimizer: an inner optimizer (e.g. `learned_opt.opt_fn(theta)` or `Adam(1e-3)`).
    num_steps: training steps per seed.
    keys: [S] PRNG keys, one per seed (e.g. `seed_keys((0, 1, 2))`).
    eval_every: validation period in steps (default: `default_eval_every(num_steps)`).

  Returns:
    `train_loss` [S, num_steps]: loss on step t's training batch at the params before update t.
    `valid_loss` [S, E]: loss on one validation batch at the params before the updates at
    `valid_steps` [E] = 0, eval_every, 2 * eval_every, ... and after the last update
    (`valid_steps[-1] == num_steps`).
  """
  eval_every = eval_every or default_eval_every(num_steps)
  run = jax.jit(_curves_fn(task, lambda _: optimizer, num_steps, eval_every))
  return _as_curves(*run(None, keys), num_steps, eval_every)


# ---- summaries -----------------------------------------------------------------------------


def fill_diverged(losses: np.ndarray) -> np.ndarray:
  """Scores divergence: from a run's first non-finite loss on, its losses become its initial loss.

  A run that blows up is thus counted as having made no progress from then on (a finite
  penalty, so one bad seed does not turn every statistic into nan). If the initial loss itself
  is non-finite the run scores inf.

  Args:
    losses: [S, N] curves.

  Returns:
    [S, N] float64 curves with every entry finite or +inf.
  """
  losses = np.asarray(losses, np.float64)
  diverged = np.cumsum(~np.isfinite(losses), axis=1) > 0
  initial = losses[:, :1]
  initial = np.where(np.isfinite(initial), initial, np.inf)
  return np.where(diverged, initial, losses)


def final_window(num_steps: int, fraction: float = FINAL_FRACTION) -> int:
  """Number of last steps averaged for the final loss: ceil(fraction * num_steps), at least 1."""
  return max(1, int(np.ceil(fraction * num_steps)))


def summarize(curves: Curves, final_fraction: float = FINAL_FRACTION) -> Dict[str, float]:
  """Mean and final training loss per seed, then mean and std (ddof=0) across seeds.

  Per seed, after `fill_diverged`: mean_loss = mean training loss over all steps;
  final_loss = mean training loss over the last `final_window(num_steps)` steps (5%).

  Returns:
    mean_loss_mean, mean_loss_std, final_loss_mean, final_loss_std, final_valid_loss_mean,
    final_valid_loss_std (validation loss after the last step), num_diverged (seeds with a
    non-finite training or validation loss anywhere) and num_seeds.
  """
  train = np.asarray(curves["train_loss"])
  filled = fill_diverged(train)
  mean_loss = filled.mean(axis=1)
  final_loss = filled[:, -final_window(train.shape[1], final_fraction):].mean(axis=1)
  final_valid = fill_diverged(curves["valid_loss"])[:, -1]
  stats = {}
  for name, per_seed in (("mean_loss", mean_loss), ("final_loss", final_loss),
                         ("final_valid_loss", final_valid)):
    stats[f"{name}_mean"] = float(np.mean(per_seed))
    stats[f"{name}_std"] = float(np.std(per_seed))
  finite = np.all(np.isfinite(train), axis=1) & np.all(np.isfinite(curves["valid_loss"]), axis=1)
  stats["num_diverged"] = int(np.sum(~finite))
  stats["num_seeds"] = int(train.shape[0])
  return stats


# ---- learned optimizer vs Adam sweep -------------------------------------------------------


@dataclasses.dataclass
class EvalResult:
  """Curves and summaries per optimizer name (`LEARNED`, then `adam_name(lr)` per lr)."""
  task_name: str
  learned_name: str
  num_steps: int
  seeds: Tuple[int, ...]
  adam_learning_rates: Tuple[float, ...]
  best_adam_lr: float
  curves: Dict[str, Curves]
  summaries: Dict[str, Dict[str, float]]

  @property
  def best_adam(self) -> str:
    return adam_name(self.best_adam_lr)


def evaluate(learned_opt: lopt_base.LearnedOptimizer, theta: Any, task: tasks_base.Task,
             num_steps: int, seeds: Sequence[int] = (0, 1, 2),
             adam_learning_rates: Sequence[float] = ADAM_SWEEP,
             eval_every: Optional[int] = None) -> EvalResult:
  """Learned optimizer at `theta` vs Adam at every learning rate, on the same seeds and data.

  The Adam sweep compiles once: learning rates go through `lax.map` as data (one lr's runs in
  memory at a time). The best Adam learning rate is the one with the lowest mean (over seeds)
  of the mean training loss over the horizon; ties go to the smaller rate.
  """
  eval_every = eval_every or default_eval_every(num_steps)
  keys = seed_keys(seeds)
  lrs = check_adam_sweep(adam_learning_rates)
  run_learned = jax.jit(_curves_fn(task, learned_opt.opt_fn, num_steps, eval_every))
  curves = {LEARNED: _as_curves(*run_learned(theta, keys), num_steps, eval_every)}
  run_adam = _curves_fn(task, opt_base.Adam, num_steps, eval_every)
  sweep = jax.jit(lambda lrs, keys: jax.lax.map(lambda lr: run_adam(lr, keys), lrs))
  train, valid = sweep(jnp.asarray(lrs, jnp.float32), keys)
  for i, lr in enumerate(lrs):
    curves[adam_name(lr)] = _as_curves(train[i], valid[i], num_steps, eval_every)
  summaries = {name: summarize(c) for name, c in curves.items()}
  best = min(range(len(lrs)), key=lambda i: (summaries[adam_name(lrs[i])]["mean_loss_mean"],
                                             lrs[i]))
  return EvalResult(task_name=getattr(task, "name", type(task).__name__),
                    learned_name=getattr(learned_opt, "name", type(learned_opt).__name__),
                    num_steps=num_steps, seeds=tuple(int(s) for s in seeds),
                    adam_learning_rates=lrs, best_adam_lr=lrs[best], curves=curves,
                    summaries=summaries)


# ---- writers -------------------------------------------------------------------------------


def _band(ax, curves: Curves, floor: float, **style):
  filled = fill_diverged(curves["train_loss"])
  mean, std = filled.mean(axis=0), filled.std(axis=0)
  steps = np.arange(mean.shape[0])
  line, = ax.plot(steps, mean, **style)
  ax.fill_between(steps, np.maximum(mean - std, floor), mean + std, color=line.get_color(),
                  alpha=0.15, linewidth=0)


def plot_curves(result: EvalResult) -> figure.Figure:
  """Training loss (mean over seeds, std band) of the learned optimizer vs every Adam lr."""
  fig = figure.Figure(figsize=(8, 5), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  means = [fill_diverged(c["train_loss"]).mean(axis=0) for c in result.curves.values()]
  finite = np.concatenate([m[np.isfinite(m)] for m in means])
  positive = finite.size > 0 and np.all(finite > 0)
  floor = 0.5 * finite.min() if positive else -np.inf
  cmap = matplotlib.colormaps["viridis"]
  num_lrs = len(result.adam_learning_rates)
  for i, lr in enumerate(result.adam_learning_rates):
    best = lr == result.best_adam_lr
    _band(ax, result.curves[adam_name(lr)], floor, color=cmap(0.85 * i / max(1, num_lrs - 1)),
          linewidth=2.5 if best else 1.0, alpha=1.0 if best else 0.6,
          label=adam_name(lr) + (" (best)" if best else ""), zorder=3 if best else 2)
  _band(ax, result.curves[LEARNED], floor, color="crimson", linewidth=2.5,
        label=f"{LEARNED} ({result.learned_name})", zorder=4)
  ax.set_yscale("log" if positive else "symlog")
  ax.set_xlabel("step")
  ax.set_ylabel(f"training loss (mean ± std over {len(result.seeds)} seeds)")
  ax.set_title(f"{result.task_name}: {result.learned_name} vs Adam sweep")
  ax.legend(fontsize=8)
  ax.grid(True, which="major", alpha=0.3)
  return fig


def _pm(summary: Dict[str, float], stat: str) -> str:
  return f"{summary[stat + '_mean']:.4g} ± {summary[stat + '_std']:.2g}"


def markdown_table(result: EvalResult) -> str:
  """One row per optimizer (learned, then Adam per lr); the best Adam lr is marked."""
  lines = [f"# {result.task_name}: {result.learned_name} vs Adam", "",
           f"{result.num_steps} steps, seeds {list(result.seeds)}. Mean loss: training loss "
           f"averaged over all steps; final loss: over the last "
           f"{final_window(result.num_steps)} steps ({FINAL_FRACTION:.0%}); mean ± std over "
           f"seeds. A diverged run counts its initial loss from the divergence on. Best Adam "
           f"learning rate: {result.best_adam_lr:g}.", "",
           "| optimizer | mean loss | final loss | final valid loss | diverged |",
           "|---|---|---|---|---|"]
  for name, s in result.summaries.items():
    label = f"{name} ({result.learned_name})" if name == LEARNED else name
    label += " (best)" if name == result.best_adam else ""
    lines.append(f"| {label} | {_pm(s, 'mean_loss')} | {_pm(s, 'final_loss')} | "
                 f"{_pm(s, 'final_valid_loss')} | {s['num_diverged']}/{s['num_seeds']} |")
  return "\n".join(lines) + "\n"


def _json_safe(x):
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, float) and not np.isfinite(x):
    return None  # strict JSON has no inf/nan: null means non-finite
  return x


def write_report(result: EvalResult, out_dir: str, prefix: str = "eval") -> Dict[str, str]:
  """Writes `{prefix}.png` (curves), `{prefix}.md` (table) and `{prefix}.json` into `out_dir`.

  Returns:
    The written paths by kind: {"png": ..., "md": ..., "json": ...}.
  """
  out = epath.Path(out_dir)  # epath: also a gs:// workdir's
  out.mkdir(parents=True, exist_ok=True)
  paths = {kind: os.path.join(out_dir, f"{prefix}.{kind}") for kind in ("png", "md", "json")}
  with epath.Path(paths["png"]).open("wb") as f:
    plot_curves(result).savefig(f, format="png", bbox_inches="tight")
  epath.Path(paths["md"]).write_text(markdown_table(result))
  record = {"task_name": result.task_name, "learned_name": result.learned_name,
            "num_steps": result.num_steps, "seeds": list(result.seeds),
            "adam_learning_rates": list(result.adam_learning_rates),
            "best_adam_lr": result.best_adam_lr, "final_fraction": FINAL_FRACTION,
            "summaries": result.summaries}
  epath.Path(paths["json"]).write_text(json.dumps(_json_safe(record), indent=2,
                                                  allow_nan=False))
  return paths


def scalars(result: EvalResult, prefix: str = "eval") -> Dict[str, float]:
  """Flat metrics: learned and best-Adam summaries, the best lr, and each Adam lr's mean loss."""
  out = {f"{prefix}/best_adam_lr": result.best_adam_lr}
  for tag, name in (("learned", LEARNED), ("adam_best", result.best_adam)):
    for stat in ("mean_loss", "final_loss", "final_valid_loss"):
      out[f"{prefix}/{tag}/{stat}"] = result.summaries[name][f"{stat}_mean"]
      out[f"{prefix}/{tag}/{stat}_std"] = result.summaries[name][f"{stat}_std"]
  for lr in result.adam_learning_rates:
    out[f"{prefix}/{adam_name(lr)}/mean_loss"] = result.summaries[adam_name(lr)]["mean_loss_mean"]
  return out


def write_scalars(result: EvalResult, writer: Any, step: int, prefix: str = "eval",
                  with_plot: bool = False) -> Dict[str, float]:
  """Writes `scalars(result)` (and optionally the curve plot as an image) to a clu writer.

  Args:
    result: from `evaluate`.
    writer: a `clu.metric_writers.MetricWriter`.
    step: the x-axis value (e.g. the outer step at which theta was evaluated).
    prefix: metric-name prefix.
    with_plot: also write `plot_curves(result)` as image `{prefix}/curves`.

  Returns:
    The scalars written.
  """
  values = scalars(result, prefix)
  writer.write_scalars(step, values)
  if with_plot:
    fig = plot_curves(result)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    writer.write_images(step, {f"{prefix}/curves": image[None]})
  return values
