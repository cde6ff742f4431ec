"""Evaluation inside the application: a theta against tuned Adam on held-out seeds."""

import os

import jax

from lopt_tpu import evaluation
from lopt_tpu import experiment

# Evaluation seeds start here, far from the small seeds used for meta-training runs.
HELD_OUT_SEED_BASE = 1_000_000
EVAL_STREAM = 2  # fold_in(seed key, stream): the held-out task draw


def eval_task(config):
  """The evaluated task: one draw from `config.eval.task` with a key meta-training never uses."""
  family = experiment.build_task_family(config.eval.task, config.eval.task_kwargs)
  key = jax.random.fold_in(jax.random.key(config.seed), EVAL_STREAM)
  task = family.task_fn(family.sample(key))
  task.name = getattr(family, "name", config.eval.task)
  return task


def _report_prefix(step: int) -> str:
  return f"step_{step:06d}"


def report_path(workdir: str, step: int) -> str:
  """The JSON record `evaluate_theta` writes for outer step `step` (with a .png and a .md)."""
  return os.path.join(workdir, "eval", f"{_report_prefix(step)}.json")


def evaluate_theta(config, learned_opt, theta, workdir: str, writer, step: int):
  """Runs the comparison, writes the PNG/table report (process 0) and the eval scalars."""
  seeds = tuple(HELD_OUT_SEED_BASE + config.seed * 1000 + i for i in range(config.eval.num_seeds))
  result = evaluation.evaluate(learned_opt, theta, eval_task(config), config.eval.num_steps,
                               seeds=seeds,
                               adam_learning_rates=tuple(config.eval.adam_learning_rates))
  if jax.process_index() == 0:
    evaluation.write_report(result, os.path.dirname(report_path(workdir, step)),
                            prefix=_report_prefix(step))
  evaluation.write_scalars(result, writer, step, with_plot=True)
  return result
