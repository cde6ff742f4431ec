"""Config validation that runs before anything is compiled or written.

Each problem becomes one `ConfigError` whose message names the field, the bad value and what is
accepted, so a user's mistake ends the run with one clear line instead of a traceback.
"""

import json
import math
import uuid

from absl import logging
from etils import epath
import jax

from lopt_tpu import compile_cache
from lopt_tpu import eval_run
from lopt_tpu import evaluation
from lopt_tpu import experiment
from lopt_tpu import registry
from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base as est_base


class ConfigError(ValueError):
  """A config field has a value the run cannot use."""


MAX_INT32 = 2**31 - 1


def _fail(field: str, value, accepted: str):
  raise ConfigError(f"config.{field}={value!r} is invalid: {accepted}")


def _positive_int(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    _fail(field, value, "must be a positive integer")
  if value > MAX_INT32:
    _fail(field, value, f"must be <= {MAX_INT32} (steps and tasks are counted in int32)")


def _positive_finite(field: str, value):
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    _fail(field, value, "must be a finite number > 0")


def _zero_or_positive_finite(field: str, value):
  # A negative value here would silently flip the meta-gradient's sign. None means off, as 0.
  if value is None:
    return
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
    _fail(field, value, "must be a finite number >= 0 (0: off)")


def _known(field: str, value, kind: str, known):
  if value not in known:
    _fail(field, value, f"unknown {kind}; known: {', '.join(sorted(known))}")


def check_names(config):
  _known("learned_optimizer.name", config.learned_optimizer.name, "learned optimizer",
         registry.LEARNED_OPTIMIZERS)
  _known("estimator.name", config.estimator.name, "estimator", registry.ESTIMATORS)
  _known("estimator.schedule", config.estimator.schedule, "truncation schedule",
         registry.TRUNCATION_SCHEDULES)
  _known("outer_optimizer.name", config.outer_optimizer.name, "outer optimizer",
         experiment.OUTER_OPTIMIZERS)
  _known("estimator.meta_loss_split", config.estimator.meta_loss_split, "split",
         unroll_lib.META_LOSS_SPLITS)
  _known("estimator.meta_loss_transform", config.estimator.meta_loss_transform,
         "meta-loss transform", unroll_lib.META_LOSS_TRANSFORMS)
  _known("estimator.loss_type", config.estimator.loss_type, "meta-loss type",
         est_base.META_LOSS_TYPES)
  if not config.task_families:
    _fail("task_families", {}, "name at least one task family")
  for label, fam in config.task_families.items():
    if not hasattr(fam, "keys") or set(fam.keys()) != {"name", "kwargs"}:
      _fail(f"task_families.{label}", fam.to_dict() if hasattr(fam, "to_dict") else fam,
            'must be {"name": <registered task family>, '
            '"kwargs": {<its constructor arguments>}} ("kwargs": {} for none)')
    _known(f"task_families.{label}.name", fam.name, "task family", registry.TASK_FAMILIES)
  _known("eval.task", config.eval.task, "task family", registry.TASK_FAMILIES)


# Subtrees whose keys are free: constructor arguments and the task families' labels.
FREE_FORM_FIELDS = ("learned_optimizer.kwargs", "task_families", "eval.task_kwargs")


def check_known_fields(config, reference):
  """Refuses fields `reference` (configs/default.py: every key with its default) does not have.

  A config file builds on the default with attribute assignments, so a misspelled field
  (`config.estimator.trunc_lenght = 1`) was added, saved in config.json and silently ignored.
  (A command-line override of an unknown field is already refused by ml_collections.)
  """
  known = flatten(reference.to_dict())
  for key, value in sorted(flatten(config.to_dict()).items()):
    if key not in known and not _under(key, FREE_FORM_FIELDS):
      section = key.rpartition(".")[0]
      siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section)
      _fail(key, value, "unknown field (misspelled?); "
            + (f"{section or 'config'} has: {', '.join(siblings)}" if siblings else
               "configs/default.py lists every field"))


def check_sizes(config, device_count: int):
  for field in ("num_outer_steps", "estimator.num_tasks", "estimator.trunc_length",
                "estimator.min_length", "estimator.max_length", "log_every", "checkpoint_every",
                "keep_checkpoints", "eval.num_steps", "eval.num_seeds"):
    _positive_int(config, field)
  est = config.estimator
  if est.min_length > est.max_length:
    _fail("estimator.min_length", est.min_length,
          f"must be <= estimator.max_length ({est.max_length})")
  if est.name not in registry.FULL_EPISODE_ESTIMATORS and est.trunc_length > est.max_length:
    _fail("estimator.trunc_length", est.trunc_length,
          f"must be <= estimator.max_length ({est.max_length}), the longest inner run")
  if not 0 <= config.seed <= eval_run.MAX_CONFIG_SEED:
    _fail("seed", config.seed,
          f"must be an integer in [0, {eval_run.MAX_CONFIG_SEED}] (its held-out evaluation "
          f"seeds {eval_run.HELD_OUT_SEED_BASE} + {eval_run.SEEDS_PER_RUN} * seed + i must fit "
          "in 32 bits)")
  if config.eval.num_seeds > eval_run.SEEDS_PER_RUN:
    _fail("eval.num_seeds", config.eval.num_seeds,
          f"must be <= {eval_run.SEEDS_PER_RUN} (the next run seed's evaluation seeds follow)")
  _positive_finite("estimator.std", est.std)
  _zero_or_positive_finite("estimator.sign_delta_loss_scalar", est.sign_delta_loss_scalar)
  if not 0 <= est.random_initial_iteration_offset <= MAX_INT32 - est.max_length:
    _fail("estimator.random_initial_iteration_offset", est.random_initial_iteration_offset,
          f"must be in [0, {MAX_INT32 - est.max_length}] (>= 0, and an inner run's iteration, "
          "offset + estimator.max_length, must fit in int32)")
  if config.cpu_devices == device_count and est.num_tasks % device_count:  # set by cpu_devices
    _fail("cpu_devices", config.cpu_devices,
          f"must divide estimator.num_tasks ({est.num_tasks}) (0: one per core, dividing it)")
  if est.num_tasks % device_count:
    _fail("estimator.num_tasks", est.num_tasks,
          f"must be divisible by the device count ({device_count})")
  _positive_finite("outer_optimizer.learning_rate", config.outer_optimizer.learning_rate)
  _zero_or_positive_finite("outer_optimizer.meta_grad_clip",
                           config.outer_optimizer.meta_grad_clip)
  if config.cpu_devices < 0:
    _fail("cpu_devices", config.cpu_devices, "must be >= 0 (0: one per core, dividing num_tasks)")
  if config.eval.every < 0:
    _fail("eval.every", config.eval.every, "must be >= 0 (0: only at the end)")
  try:
    evaluation.check_adam_sweep(config.eval.adam_learning_rates)
  except (TypeError, ValueError) as e:
    _fail("eval.adam_learning_rates", config.eval.adam_learning_rates, str(e))


def check_buildable(config):
  """Builds the learned optimizer and every task family (which loads its data) and runs the
  learned optimizer's init and one inner step abstractly (shapes only), so bad constructor
  arguments and unloadable data fail here, before any compilation."""
  kwargs = config.learned_optimizer.kwargs.to_dict()
  _finite_numbers("learned_optimizer.kwargs", kwargs)
  for label, fam in config.task_families.items():
    _finite_numbers(f"task_families.{label}.kwargs", fam.get("kwargs", {}))
  _finite_numbers("eval.task_kwargs", config.eval.task_kwargs)
  try:
    learned_opt = experiment.build_learned_optimizer(config)
  except (TypeError, ValueError) as e:
    _fail("learned_optimizer.kwargs", kwargs,
          f"cannot build {config.learned_optimizer.name}: {_one_line(e)}")
  families = []
  for label, fam in config.task_families.items():
    try:
      families.append(experiment.build_task_family(fam.name, fam.kwargs))
      _check_trainable(families[-1])
    except (OSError, RuntimeError, ValueError, TypeError) as e:
      _fail(f"task_families.{label}", fam.to_dict(), f"cannot build it: {_one_line(e)}")
  try:
    # Sizes the constructor does not check (e.g. a negative hidden width) fail here.
    _check_inner_step(learned_opt, families[0])
  except (TypeError, ValueError) as e:
    _fail("learned_optimizer.kwargs", kwargs,
          f"{config.learned_optimizer.name} cannot init or step: {_one_line(e)}")
  try:
    _check_trainable(experiment.build_task_family(config.eval.task, config.eval.task_kwargs))
  except (OSError, RuntimeError, ValueError, TypeError) as e:
    _fail("eval.task_kwargs", config.eval.task_kwargs.to_dict(),
          f"cannot build {config.eval.task}: {_one_line(e)}")


def _finite_numbers(field: str, value):
  """Refuses NaN and inf anywhere in free-form kwargs: a non-finite learning rate, step
  multiplier or noise level makes every inner run diverge, and the run would learn nothing."""
  if hasattr(value, "items"):
    for k, v in value.items():
      _finite_numbers(f"{field}.{k}", v)
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _finite_numbers(f"{field}[{i}]", v)
  elif isinstance(value, float) and not math.isfinite(value):
    _fail(field, value, "must be a finite number")


def _check_trainable(family):
  """Samples a task and initializes it abstractly (shapes only, nothing runs): bad sizes in the
  kwargs (e.g. a negative dimension) fail here, and a task without parameters is refused."""
  # The key is made inside eval_shape: made outside, it is one eager computation, which
  # compiles, and that creates the compilation cache's directory before a config error.
  params, _ = jax.eval_shape(
      lambda: family.task_fn(family.sample(jax.random.key(0))).init_with_state(
          jax.random.key(0)))
  if not sum(x.size for x in jax.tree_util.tree_leaves(params)):
    raise ValueError("its tasks have no parameters to train")


def _check_inner_step(learned_opt, family):
  """The learned optimizer's init and one inner step on a sampled task, abstractly."""
  def step(key):
    task = family.task_fn(family.sample(key))
    params, model_state = task.init_with_state(key)
    opt = learned_opt.opt_fn(learned_opt.init(key), is_training=True)
    state = opt.init(params, model_state=model_state, num_steps=10, key=key)
    grads = jax.tree_util.tree_map(jax.numpy.zeros_like, params)
    return opt.update(state, grads, loss=jax.numpy.zeros([]), model_state=model_state,
                      key=key)

  jax.eval_shape(lambda: step(jax.random.key(0)))  # the key inside: see _check_trainable


def _make_writable_dir(directory: str):
  """Creates `directory` if needed and writes a file in it; raises (OSError where local) if it
  cannot. Through epath, which also reaches gs:// buckets (where `os` would have made a local
  ./gs:/ directory)."""
  path = epath.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  probe = path / f".write_probe_{uuid.uuid4().hex}"  # unique across the hosts of a pod
  probe.write_text("")
  probe.unlink()


def check_workdir(workdir: str):
  if not workdir:
    _fail("workdir", workdir, "pass --workdir=DIR, a writable directory")
  try:
    _make_writable_dir(workdir)
  except Exception as e:  # pylint: disable=broad-except: remote filesystems raise their own
    raise ConfigError(f"--workdir={workdir!r} is not writable: {_one_line(e)}") from None


def latest_checkpoint_step(workdir: str):
  """The newest outer step with a checkpoint directory in `workdir` (None if none), read
  without building anything: orbax names finished checkpoints by their step, unfinished ones
  `<step>.orbax-checkpoint-tmp...`."""
  checkpoints = epath.Path(workdir) / "checkpoints"
  if not checkpoints.is_dir():
    return None
  steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
  return max(steps) if steps else None


def check_compilation_cache(setting: str, workdir: str):
  """A local cache directory must be writable: JAX would only warn, on every compile, and run
  without the cache (remote paths such as gs:// are left to JAX)."""
  directory = compile_cache.directory_for(setting, workdir)
  if not directory or _remote(directory):
    return
  try:
    _make_writable_dir(directory)
  except OSError as e:
    _fail("compilation_cache", setting,
          f'must be a writable directory, "workdir" or "" (none): {_one_line(e)}')


def _one_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


# Fields a resumed run may change: how long, how often it logs, saves and evaluates, where it
# caches, and the outer optimizer's step size and clip (the remedy a non-finite run suggests).
RESUMABLE_CHANGES = ("num_outer_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                     "compilation_cache", "eval", "outer_optimizer.learning_rate",
                     "outer_optimizer.meta_grad_clip", "cpu_devices")
# Task family kwargs that say where the data lies, not what it is: the README's offline advice
# (download=False) and a new VM's data_dir must not block a resume.
DATA_LOCATION_KWARGS = ("download", "data_dir")
RUN_CONFIG_FILE = "config.json"


def _under(key: str, fields) -> bool:
  """Whether the flat `key` is one of `fields` or inside one of them."""
  return any(key == f or key.startswith(f + ".") for f in fields)


def _resumable(key: str) -> bool:
  if _under(key, RESUMABLE_CHANGES):
    return True
  parts = key.split(".")
  return (len(parts) == 4 and parts[0] == "task_families" and parts[2] == "kwargs"
          and parts[3] in DATA_LOCATION_KWARGS)


def flatten(d: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}; values other than numbers, strings and bools as str."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def check_resume(config, workdir: str, device_count: int = None, training: bool = True):
  """Refuses to resume a workdir's checkpoints under a config that changes the run itself (seed,
  tasks, estimator, learned optimizer, ...): restoring would fail on shapes or, worse, silently
  continue a different experiment. Compares with the config the workdir was started with.

  A different device count only warns: the run is the same, but its task means are summed in
  another order, so it is no longer bitwise equal to an uninterrupted run. With `training`,
  a `num_outer_steps` below the newest checkpoint is refused too.
  """
  latest = latest_checkpoint_step(workdir)
  # Training only: evaluating a run that was extended past the config's length is fine.
  if training and latest is not None and latest > config.num_outer_steps:
    _fail("num_outer_steps", config.num_outer_steps,
          f"--workdir={workdir!r} already holds outer step {latest}; raise it, or use a new "
          "workdir")
  path = epath.Path(workdir) / RUN_CONFIG_FILE
  if latest is None or not path.exists():
    return  # nothing to resume: the run starts afresh under the new config
  recorded = json.loads(path.read_text())
  before = flatten(recorded["config"])
  now = flatten(json.loads(config.to_json()))
  device_count = jax.device_count() if device_count is None else device_count
  if recorded["device_count"] != device_count:
    logging.warning("Resuming a run started on %d devices on %d: same run, but float sums in "
                    "another order, so not bitwise equal to an uninterrupted one.",
                    recorded["device_count"], device_count)
  changed = sorted(k for k in set(before) | set(now)
                   if not _resumable(k) and before.get(k) != now.get(k))
  if changed:
    shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
    more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
    raise ConfigError(f"config.{changed[0]}={now.get(changed[0])!r} is invalid: --workdir="
                      f"{workdir!r} holds a run started with a different config ({shown}{more}); "
                      "use a new --workdir, or the original values")


def _remote(path: str) -> bool:
  return "://" in path


def record_run_config(config, workdir: str, device_count: int = None):
  """Writes the config (and device count) a workdir's run started with, for `check_resume`."""
  device_count = jax.device_count() if device_count is None else device_count
  record = {"config": json.loads(config.to_json()), "device_count": device_count}
  (epath.Path(workdir) / RUN_CONFIG_FILE).write_text(json.dumps(record, indent=1))


def validate(config, workdir: str, device_count: int = None, training: bool = True):
  """Raises ConfigError for the first problem found; returns quietly if the run can start
  (or resume: the workdir's checkpoints must belong to this config, see `check_resume`)."""
  device_count = jax.device_count() if device_count is None else device_count
  check_names(config)
  check_sizes(config, device_count)
  check_buildable(config)
  check_workdir(workdir)
  check_compilation_cache(config.compilation_cache, workdir)
  check_resume(config, workdir, device_count, training)
