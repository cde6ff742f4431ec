"""Meta-trained learned optimizers that ship with the package: use them without meta-training.

Each one is two files in `lopt_tpu/pretrained/`: `<name>.msgpack` (theta, written by
`flax.serialization.to_bytes`) and `<name>.json` (the sidecar: the architecture's registry
name and constructor arguments, the config, seed and git commit of the run that trained it,
and the figures measured with it against tuned Adam).

  from lopt_tpu import pretrained
  import lopt_tpu
  learned_opt, theta = pretrained.load("digits_mlp_v1")
  tx = lopt_tpu.as_optax(learned_opt, theta)   # an optax.GradientTransformation
"""

import hashlib
import json
import os
from typing import Any, Dict, List, Tuple

from etils import epath
import flax
import jax
import numpy as np

from lopt_tpu import registry
from lopt_tpu.learned_optimizers import base as lopt_base

DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


class UnknownPretrainedError(KeyError):
  """No pretrained optimizer of that name ships with the package."""


class CorruptPretrainedError(ValueError):
  """A .msgpack that does not match its sidecar (architecture or recorded fingerprint)."""


def theta_fingerprint(theta) -> str:
  """A hash of theta's exact bytes: equal fingerprints mean bitwise-equal meta-parameters."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(jax.device_get(theta)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def list(directory: str = DIRECTORY) -> List[str]:  # pylint: disable=redefined-builtin
  """Names of the learned optimizers in `directory` (default: the shipped ones; any path epath
  reaches, gs:// too), i.e. those with both a .msgpack and a .json."""
  if not epath.Path(directory).is_dir():
    return []
  files = set(p.name for p in epath.Path(directory).iterdir())
  return sorted(f[:-len(".json")] for f in files
                if f.endswith(".json") and f[:-len(".json")] + ".msgpack" in files)


def _path(name: str, ext: str, directory: str) -> str:
  return os.path.join(directory, f"{name}.{ext}")


def metadata(name: str, directory: str = DIRECTORY) -> Dict[str, Any]:
  """The sidecar of `name`: architecture, training config and provenance, measured figures."""
  path = _path(name, "json", directory)
  if not (epath.Path(path).exists() and epath.Path(_path(name, "msgpack", directory)).exists()):
    where = "shipped" if directory == DIRECTORY else f"in {directory!r}"
    raise UnknownPretrainedError(f"no pretrained learned optimizer {name!r}; {where}: "
                                 f"{', '.join(list(directory)) or 'none'}")
  return json.loads(epath.Path(path).read_text())


def build(meta: Dict[str, Any]) -> lopt_base.LearnedOptimizer:
  """The learned optimizer a sidecar describes (registry name + constructor arguments)."""
  spec = meta["learned_optimizer"]
  return registry.get("learned optimizer", spec["name"])(**spec["kwargs"])


def load(name: str, directory: str = DIRECTORY) -> Tuple[lopt_base.LearnedOptimizer, Any]:
  """(learned_opt, theta) of a shipped learned optimizer, ready for `opt_fn` or `as_optax`.

  Args:
    name: one of `list()`, e.g. "digits_mlp_v1".
    directory: where to look (default: the package's own `pretrained/`).

  Returns:
    The learned optimizer, rebuilt from the sidecar, and its trained theta.
  """
  meta = metadata(name, directory)
  learned_opt = build(meta)
  # The architecture's own init gives the tree structure, shapes and dtypes to restore into.
  template = learned_opt.init(jax.random.key(0))
  path = _path(name, "msgpack", directory)
  theta = flax.serialization.from_bytes(template, epath.Path(path).read_bytes())
  # from_bytes checks the keys only: a theta of another architecture would fail later, inside
  # jit, and a modified file would load silently.
  for (where, want), got in zip(jax.tree_util.tree_leaves_with_path(template),
                                jax.tree_util.tree_leaves(theta)):
    got, want = jax.ShapeDtypeStruct(np.shape(got), got.dtype), jax.typeof(want)
    if got.shape != want.shape or got.dtype != want.dtype:
      raise CorruptPretrainedError(
          f"{path}: theta{jax.tree_util.keystr(where)} is {got.dtype}{got.shape}, but the "
          f"sidecar's {meta['learned_optimizer']['name']} needs {want.dtype}{want.shape}")
  expected, found = meta.get("theta_sha256"), theta_fingerprint(theta)
  if expected and found != expected:
    raise CorruptPretrainedError(
        f"{path}: theta's fingerprint is {found}, its sidecar records {expected}: the file was "
        "changed or belongs to another run")
  return learned_opt, theta


def save(name: str, theta: Any, meta: Dict[str, Any], directory: str = DIRECTORY) -> Dict[str, str]:
  """Writes `<name>.msgpack` and `<name>.json`; `meta` must hold `learned_optimizer`
  ({"name": registry name, "kwargs": {...}}). Returns the two paths."""
  if "learned_optimizer" not in meta:
    raise ValueError("meta needs 'learned_optimizer': {'name': ..., 'kwargs': {...}}")
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  paths = {"msgpack": _path(name, "msgpack", directory), "json": _path(name, "json", directory)}
  epath.Path(paths["msgpack"]).write_bytes(flax.serialization.to_bytes(jax.device_get(theta)))
  epath.Path(paths["json"]).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
  return paths
