"""Builds the components of a meta-training run from its config (config -> objects, nothing else)."""

from typing import List, NamedTuple

import jax
import ml_collections
import optax

from lopt_tpu import registry
from lopt_tpu.learned_optimizers import base as lopt_base
from lopt_tpu.outer import gradient_learner
from lopt_tpu.outer import sharding
from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base as est_base

OUTER_OPTIMIZERS = {"adam": optax.adam, "sgd": optax.sgd}


class Experiment(NamedTuple):
  learned_opt: lopt_base.LearnedOptimizer
  estimators: List[est_base.GradientEstimator]
  learner: gradient_learner.SingleMachineGradientLearner


def _kwargs(cfg) -> dict:
  return cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg or {})


def build_learned_optimizer(config) -> lopt_base.LearnedOptimizer:
  lopt = config.learned_optimizer
  return registry.get("learned optimizer", lopt.name)(**_kwargs(lopt.kwargs))


def build_task_family(name: str, kwargs=None):
  return registry.get("task family", name)(**_kwargs(kwargs))


def build_estimator(config, family, learned_opt) -> est_base.GradientEstimator:
  est = config.estimator
  schedule = registry.get("truncation schedule", est.schedule)(est.min_length, est.max_length)
  unroll = unroll_lib.TruncatedUnroll(
      family, learned_opt, schedule, est.num_tasks,
      random_initial_iteration_offset=est.random_initial_iteration_offset,
      meta_loss_split=est.meta_loss_split,
      meta_loss_transform=est.meta_loss_transform)
  return registry.get("estimator", est.name)(
      unroll, trunc_length=est.trunc_length, std=est.std, loss_type=est.loss_type,
      sign_delta_loss_scalar=est.sign_delta_loss_scalar or None)


def build_outer_optimizer(config) -> optax.GradientTransformation:
  return OUTER_OPTIMIZERS[config.outer_optimizer.name](config.outer_optimizer.learning_rate)


def build(config) -> Experiment:
  """Every object the run needs; data sets are loaded here (before any compilation)."""
  learned_opt = build_learned_optimizer(config)
  estimators = [build_estimator(config, build_task_family(fam.name, fam.kwargs), learned_opt)
                for _, fam in sorted(config.task_families.items())]
  # With several devices (of one or many hosts) the task axis is sharded over all of them.
  mesh = sharding.task_mesh() if jax.device_count() > 1 else None
  learner = gradient_learner.SingleMachineGradientLearner(
      learned_opt, estimators, build_outer_optimizer(config),
      meta_grad_clip=config.outer_optimizer.meta_grad_clip or None, mesh=mesh)
  return Experiment(learned_opt, estimators, learner)
