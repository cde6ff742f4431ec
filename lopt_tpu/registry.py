"""String names for every component, so configs can say what to build.

Registries are plain dicts of factories; `get(kind, name)` fails with the list of known names.
"""

from typing import Callable, Dict

from lopt_tpu.learned_optimizers import adafac_mlp_lopt
from lopt_tpu.learned_optimizers import hparam_controller
from lopt_tpu.learned_optimizers import hypergrad_adam
from lopt_tpu.learned_optimizers import meta_sgd
from lopt_tpu.learned_optimizers import mlp_lopt
from lopt_tpu.learned_optimizers import nn_adam
from lopt_tpu.learned_optimizers import per_param_mlp
from lopt_tpu.learned_optimizers import rnn_mlp_lopt
from lopt_tpu.outer import truncation
from lopt_tpu.outer.estimators import full
from lopt_tpu.outer.estimators import pes
from lopt_tpu.outer.estimators import truncated
from lopt_tpu.tasks import base as tasks_base
from lopt_tpu.tasks import datasets
from lopt_tpu.tasks import image_mlp
from lopt_tpu.tasks import quadratics


class UnknownNameError(ValueError):
  """A config named a component that does not exist."""


def _fixed(name: str, make_task: Callable) -> Callable:
  def make(**kwargs):
    return tasks_base.single_task_to_family(make_task(**kwargs), name)
  return make


def _image_mlp_family(dataset: str = "digits8", data_dir=None, download=None, **kwargs):
  """`data_dir` / `download` go to a TFDS dataset's loader, as for `fmnist8_mlp`."""
  loader_kwargs = {k: v for k, v in (("data_dir", data_dir), ("download", download))
                   if v is not None}
  return image_mlp.ImageMLPFamily(datasets.load_dataset(dataset, **loader_kwargs), **kwargs)


TASK_FAMILIES: Dict[str, Callable] = {
    "quadratic_family": quadratics.FixedDimQuadraticFamily,
    "fmnist8_mlp": _fixed("fmnist8_mlp", image_mlp.fmnist8_mlp),
    "digits_mlp": _fixed("digits_mlp", image_mlp.digits_mlp),
    "image_mlp_family": _image_mlp_family,
}

LEARNED_OPTIMIZERS: Dict[str, Callable] = {
    "meta_sgd_wd": meta_sgd.MetaSGDWD,
    "per_param_mlp": per_param_mlp.PerParamMLP,
    "mlp_lopt": mlp_lopt.MLPLOpt,
    "hparam_controller": hparam_controller.HParamController,
    "hypergrad_adam": hypergrad_adam.HypergradAdam,
    "nn_adam": nn_adam.NNAdam,
    "adafac_mlp_lopt": adafac_mlp_lopt.AdafacMLPLOpt,
    "rnn_mlp_lopt": rnn_mlp_lopt.RNNMLPLOpt,
}


def _full_grad(unroll, loss_type="average", **unused):
  del unused
  return full.FullGrad(unroll, loss_type=loss_type)


def _full_es(unroll, loss_type="average", std=0.01, **unused):
  del unused
  return full.FullES(unroll, loss_type=loss_type, std=std)


def _truncated_grad(unroll, trunc_length=50, **unused):
  del unused
  return truncated.TruncatedGrad(unroll, trunc_length)


def _truncated_es(unroll, trunc_length=50, std=0.01, **unused):
  del unused
  return truncated.TruncatedES(unroll, trunc_length, std=std)


def _truncated_pes(unroll, trunc_length=50, std=0.01, sign_delta_loss_scalar=None, **unused):
  del unused
  return pes.TruncatedPES(unroll, trunc_length, std=std,
                          sign_delta_loss_scalar=sign_delta_loss_scalar)


# Estimator factories take the unroll plus any of: trunc_length, std, loss_type,
# sign_delta_loss_scalar; each uses the ones that apply to it.
ESTIMATORS: Dict[str, Callable] = {
    "full_grad": _full_grad,
    "full_es": _full_es,
    "truncated_grad": _truncated_grad,
    "truncated_es": _truncated_es,
    "truncated_pes": _truncated_pes,
}

# Full-episode estimators run the whole schedule length per call; truncated ones do not.
FULL_EPISODE_ESTIMATORS = ("full_grad", "full_es")

TRUNCATION_SCHEDULES: Dict[str, Callable] = {
    "constant": lambda min_length, max_length: truncation.ConstantTruncationSchedule(max_length),
    "log_uniform": truncation.LogUniformLengthSchedule,
}

_REGISTRIES = {
    "task family": TASK_FAMILIES,
    "learned optimizer": LEARNED_OPTIMIZERS,
    "estimator": ESTIMATORS,
    "truncation schedule": TRUNCATION_SCHEDULES,
}


def get(kind: str, name: str) -> Callable:
  """The factory registered as `name` in the `kind` registry, e.g. get("estimator", "full_es")."""
  registry = _REGISTRIES[kind]
  if name not in registry:
    raise UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
  return registry[name]
