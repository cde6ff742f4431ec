"""lopt_tpu: meta-training learned optimizers with JAX/Flax, from one CPU to a TPU pod.

The public API, re-exported explicitly:
  tasks           Task, TaskFamily, single_task_to_family, QuadraticTask,
                  FixedDimQuadraticFamily, ImageMLPTask, ImageMLPFamily, digits_mlp, fmnist8_mlp
  optimizers      Optimizer, OptaxOptimizer, SGD, Momentum, Adam
  learned opts    LearnedOptimizer, MetaSGDWD, PerParamMLP, MLPLOpt, HParamController, NNAdam,
                  AdafacMLPLOpt, RNNMLPLOpt, HypergradAdam
  meta-training   ConstantTruncationSchedule, LogUniformLengthSchedule, TruncatedUnroll,
                  FullGrad, FullES, TruncatedGrad, TruncatedES, TruncatedPES,
                  GradientLearner, gradient_worker_compute, SingleMachineGradientLearner
  use the result  as_optax
"""

from lopt_tpu.learned_optimizers.adafac_mlp_lopt import AdafacMLPLOpt
from lopt_tpu.learned_optimizers.base import LearnedOptimizer
from lopt_tpu.learned_optimizers.hparam_controller import HParamController
from lopt_tpu.learned_optimizers.hypergrad_adam import HypergradAdam
from lopt_tpu.learned_optimizers.meta_sgd import MetaSGDWD
from lopt_tpu.learned_optimizers.mlp_lopt import MLPLOpt
from lopt_tpu.learned_optimizers.nn_adam import NNAdam
from lopt_tpu.learned_optimizers.per_param_mlp import PerParamMLP
from lopt_tpu.learned_optimizers.rnn_mlp_lopt import RNNMLPLOpt
from lopt_tpu.optax_export import as_optax
from lopt_tpu.optimizers.base import SGD, Adam, Momentum, OptaxOptimizer, Optimizer
from lopt_tpu.outer.estimators.full import FullES, FullGrad
from lopt_tpu.outer.estimators.pes import TruncatedPES
from lopt_tpu.outer.estimators.truncated import TruncatedES, TruncatedGrad
from lopt_tpu.outer.gradient_learner import (GradientLearner, SingleMachineGradientLearner,
                                             gradient_worker_compute)
from lopt_tpu.outer.truncation import ConstantTruncationSchedule, LogUniformLengthSchedule
from lopt_tpu.outer.unroll import TruncatedUnroll
from lopt_tpu.tasks.base import Task, TaskFamily, single_task_to_family
from lopt_tpu.tasks.image_mlp import ImageMLPFamily, ImageMLPTask, digits_mlp, fmnist8_mlp
from lopt_tpu.tasks.quadratics import FixedDimQuadraticFamily, QuadraticTask

__all__ = [
    "AdafacMLPLOpt", "Adam", "ConstantTruncationSchedule", "FixedDimQuadraticFamily", "FullES",
    "FullGrad", "GradientLearner", "HParamController", "HypergradAdam", "ImageMLPFamily",
    "ImageMLPTask", "LearnedOptimizer", "LogUniformLengthSchedule", "MLPLOpt", "MetaSGDWD",
    "Momentum", "NNAdam", "OptaxOptimizer", "Optimizer", "PerParamMLP", "QuadraticTask",
    "RNNMLPLOpt", "SGD", "SingleMachineGradientLearner", "Task", "TaskFamily", "TruncatedES",
    "TruncatedGrad", "TruncatedPES", "TruncatedUnroll", "as_optax", "digits_mlp", "fmnist8_mlp",
    "gradient_worker_compute", "single_task_to_family",
]
