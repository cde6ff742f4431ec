"""Evaluation inside the application: a theta against tuned Adam on held-out seeds."""

import os

import jax

from lopt_tpu import evaluation
from lopt_tpu import experiment

# Evaluation seeds start here, far from the small seeds used for meta-training runs; each
# config seed owns the block of SEEDS_PER_RUN after it.
HELD_OUT_SEED_BASE = 1_000_000
SEEDS_PER_RUN = 1000
# The largest config.seed whose held-out seeds all fit in 32 bits (jax.random.key keeps only a
# seed's low 32 bits: a larger one would wrap onto small seeds and the run's own keys).
MAX_CONFIG_SEED = (2**32 - 1 - HELD_OUT_SEED_BASE) // SEEDS_PER_RUN - 1
EVAL_STREAM = 2  # fold_in(seed key, stream): the held-out task draw


def held_out_seeds(config) -> tuple:
  """The evaluation seeds of a run: `eval.num_seeds` (<= SEEDS_PER_RUN) of its own block."""
  return tuple(HELD_OUT_SEED_BASE + config.seed * SEEDS_PER_RUN + i
               for i in range(config.eval.num_seeds))


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
  result = evaluation.evaluate(learned_opt, theta, eval_task(config), config.eval.num_steps,
                               seeds=held_out_seeds(config),
                               adam_learning_rates=tuple(config.eval.adam_learning_rates))
  if jax.process_index() == 0:
    evaluation.write_report(result, os.path.dirname(report_path(workdir, step)),
                            prefix=_report_prefix(step))
  evaluation.write_scalars(result, writer, step, with_plot=True)
  return result
