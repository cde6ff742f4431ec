"""Config validation in-process (the subprocess tests in test_app.py cover main.py's exit)."""

import importlib
import pathlib
import re

import pytest

from configs import default
from lopt_tpu import config_checks
from lopt_tpu import distributed
from lopt_tpu import eval_run
from lopt_tpu import evaluation
from lopt_tpu import train


def test_default_config_passes_the_name_checks():
  config_checks.check_names(default.get_config())


@pytest.mark.parametrize("field,value", [
    ("meta_loss_transform", "sqrt"),
    ("meta_loss_split", "test"),
    ("loss_type", "median"),
])
def test_unknown_estimator_option_names_the_field_and_the_choices(field, value):
  config = default.get_config()
  config.estimator[field] = value
  with pytest.raises(config_checks.ConfigError, match=rf"config\.estimator\.{field}='{value}'"
                     r" is invalid: unknown .*; known: "):
    config_checks.check_names(config)


@pytest.mark.parametrize("field,value,accepted", [
    ("outer_optimizer.learning_rate", float("inf"), "finite number > 0"),
    ("estimator.std", float("nan"), "finite number > 0"),
    # Negative values would flip the meta-gradient's sign and silently ascend.
    ("outer_optimizer.meta_grad_clip", -1.0, "finite number >= 0"),
    ("estimator.sign_delta_loss_scalar", -0.5, "finite number >= 0"),
    ("eval.adam_learning_rates", (1e-3, float("nan")), "finite and > 0"),
    # Two rates that print alike would keep only one of their results.
    ("eval.adam_learning_rates", (1e-3, 1.0000001e-3), "share the name"),
])
def test_non_finite_or_sign_flipping_numbers_are_rejected(field, value, accepted):
  config = default.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=rf"config\.{field}=.* {accepted}"):
    config_checks.check_sizes(config, 1)


def test_resuming_under_a_config_that_changes_the_run_is_refused(tmp_path):
  started = default.get_config()
  config_checks.record_run_config(started, str(tmp_path))
  changed = default.get_config()
  changed.seed = 7
  changed.estimator.num_tasks = 8
  config_checks.check_resume(changed, str(tmp_path))  # no checkpoint yet: a fresh start
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.estimator\.num_tasks=8 is invalid: .*started with a different "
                           r"config \(estimator\.num_tasks: 4 -> 8, seed: 0 -> 7\)"):
    config_checks.check_resume(changed, str(tmp_path))
  # Another device count is the same run (it only warns).
  config_checks.check_resume(started, str(tmp_path), device_count=3)
  # Length, logging, evaluation and the outer step size may change on resume.
  longer = default.get_config()
  longer.num_outer_steps *= 2
  longer.eval.num_seeds += 1
  longer.outer_optimizer.learning_rate /= 10
  config_checks.check_resume(longer, str(tmp_path))
  # So may where the data lies (the README's offline advice was refused on resume).
  moved = default.get_config()
  moved.task_families.quadratic.kwargs = {"dim": 10, "download": False, "data_dir": "/mnt/tfds"}
  config_checks.check_resume(moved, str(tmp_path))
  moved.task_families.quadratic.kwargs.dim = 3
  with pytest.raises(config_checks.ConfigError, match=r"kwargs\.dim"):
    config_checks.check_resume(moved, str(tmp_path))
  # Shorter than the checkpoint: refused here, before compiling, not after restoring it.
  shorter = default.get_config()
  shorter.num_outer_steps = 1
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.num_outer_steps=1 is invalid: .* already holds outer step 2"):
    config_checks.check_resume(shorter, str(tmp_path))
  # Evaluating needs no length: a run extended past its config's num_outer_steps is fine.
  config_checks.check_resume(shorter, str(tmp_path), training=False)


def test_evaluating_a_workdir_without_checkpoints_fails_before_building_or_creating(tmp_path):
  typo = tmp_path / "typo"
  with pytest.raises(config_checks.ConfigError, match="holds no checkpoint to evaluate"):
    train.evaluate_checkpoint(default.get_config(), str(typo))
  assert not typo.exists()  # it was created (and init compiled) before the error


@pytest.mark.parametrize("section,override", [
    ("task_families.quadratic", {"dim": -3}),  # once a traceback deep in the first step
    ("eval.task_kwargs", {"dim": 0}),  # once a silently meaningless evaluation
])
def test_task_sizes_are_checked_by_building_one_task(section, override):
  config = default.get_config()
  if section == "eval.task_kwargs":
    config.eval.task = "quadratic_family"
    config.eval.task_kwargs = override
  else:
    config.task_families.quadratic.kwargs = override
  with pytest.raises(config_checks.ConfigError,
                     match=re.escape(f"config.{section}=") + ".* is invalid: cannot "):
    config_checks.check_buildable(config)


@pytest.mark.parametrize("kwargs,message", [
    ({"hidden_size": -4}, "cannot build mlp_lopt: mlp_lopt: hidden_size=-4 must be an integer "
                          ">= 1"),  # was a traceback inside jit
    ({"step_mult": float("nan")}, "must be a finite number"),  # was a run that learns nothing
    ({"step_mult": float("inf")}, "must be a finite number"),  # every inner run diverged
    ({"hidden_size": 0}, "cannot build mlp_lopt: mlp_lopt: hidden_size=0 must be an integer "
                         ">= 1"),  # was a ZeroDivisionError traceback
])
def test_learned_optimizer_kwargs_are_checked_by_one_abstract_step(kwargs, message):
  config = default.get_config()
  config.learned_optimizer.kwargs = kwargs
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.learned_optimizer\.kwargs.* is invalid: "
                     + re.escape(message)):
    config_checks.check_buildable(config)


def test_a_cpu_device_count_that_does_not_divide_the_tasks_names_cpu_devices():
  config = default.get_config()
  config.cpu_devices = 3
  with pytest.raises(config_checks.ConfigError, match=r"config\.cpu_devices=3 is invalid: must "
                                                      r"divide estimator\.num_tasks \(4\)"):
    config_checks.check_sizes(config, 3)


@pytest.mark.parametrize("seed", [-1, 4_293_967, 2**32, 2**63])
def test_a_seed_out_of_range_names_the_field(seed):
  # 2**63 used to crash in jax.random.key with an OverflowError traceback; from 4,293,967 on
  # the held-out evaluation seeds passed 2**32 and wrapped onto small seeds (68787264's first
  # one was the run's own seed key).
  config = default.get_config()
  config.seed = seed
  expected = (rf"config\.seed={seed} is invalid: must be an integer in \[0, 4293966\] "
              r"\(its held-out evaluation seeds")
  with pytest.raises(config_checks.ConfigError, match=expected):
    config_checks.check_sizes(config, 1)
  config.seed = 4_293_966
  config_checks.check_sizes(config, 1)
  assert max(eval_run.held_out_seeds(config)) < 2**32
  config.eval.num_seeds = 1001
  with pytest.raises(config_checks.ConfigError, match=r"config\.eval\.num_seeds=1001"):
    config_checks.check_sizes(config, 1)


def test_evaluation_refuses_seeds_that_jax_would_wrap():
  with pytest.raises(ValueError, match="outside"):
    evaluation.seed_keys([5, 2**32 + 5])


@pytest.mark.parametrize("env,message", [
    ({"LOPT_NUM_PROCESSES": "two", "LOPT_PROCESS_ID": "0"}, "LOPT_NUM_PROCESSES='two' is not"),
    ({"LOPT_NUM_PROCESSES": "2", "LOPT_PROCESS_ID": "2"}, "0 <= PROCESS_ID < NUM_PROCESSES"),
])
def test_a_malformed_multihost_environment_is_one_clear_error(monkeypatch, env, message):
  monkeypatch.setenv("LOPT_COORDINATOR", "127.0.0.1:1")
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(distributed.LaunchEnvironmentError, match=re.escape(message)):
    distributed.maybe_initialize()


@pytest.mark.parametrize("env", [{"LOPT_NUM_PROCESSES": "2", "LOPT_PROCESS_ID": "1"},
                                 {"LOPT_PROCESS_ID": "1"}])
def test_a_multihost_launch_without_coordinator_is_refused(monkeypatch, env):
  # It used to run every process as a job of its own, all writing into the same workdir.
  monkeypatch.delenv("LOPT_COORDINATOR", raising=False)
  monkeypatch.delenv("LOPT_NUM_PROCESSES", raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(distributed.LaunchEnvironmentError, match="LOPT_COORDINATOR is not"):
    distributed.maybe_initialize()
  monkeypatch.setenv("LOPT_NUM_PROCESSES", "1")
  monkeypatch.setenv("LOPT_PROCESS_ID", "0")
  assert distributed.maybe_initialize() is False  # a job of one process needs no coordinator


@pytest.mark.parametrize("coordinator,bind", [
    ("127.0.0.1:4000", "127.0.0.1:4000"), ("localhost:4000", "localhost:4000"),
    ("[::1]:4000", "[::1]:4000"),
    # Another machine's processes must reach it: every interface, not what the name resolves
    # to (loopback on machines whose /etc/hosts maps their own name to 127.0.1.1).
    ("trainer-0:4000", None), ("10.1.2.3:4000", None)])
def test_the_coordinator_listens_where_the_other_processes_can_reach_it(monkeypatch,
                                                                         coordinator, bind):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(distributed.jax.config, "update", lambda *args: None)
  monkeypatch.setenv("LOPT_COORDINATOR", coordinator)
  monkeypatch.setenv("LOPT_NUM_PROCESSES", "2")
  monkeypatch.setenv("LOPT_PROCESS_ID", "0")
  assert distributed.maybe_initialize() is True
  assert calls[0]["coordinator_address"] == coordinator
  assert calls[0]["coordinator_bind_address"] == bind


def test_an_unwritable_compilation_cache_names_the_field(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.compilation_cache=.* must be a writable directory"):
    config_checks.check_compilation_cache(str(blocker / "cache"), str(tmp_path))
  config_checks.check_compilation_cache("workdir", str(tmp_path))  # <workdir>/compilation_cache
  config_checks.check_compilation_cache("gs://bucket/cache", str(tmp_path))  # left to JAX


@pytest.mark.parametrize("section,kwargs,where", [
    ("task_families.quadratic.kwargs", {"dim": 10, "noise": float("nan")}, "noise"),
    ("learned_optimizer.kwargs", {"hidden_sizes": (32, float("inf"))}, "hidden_sizes[1]"),
    ("eval.task_kwargs", {"dim": 4, "noise": float("-inf")}, "noise"),
])
def test_non_finite_kwargs_anywhere_name_the_entry(section, kwargs, where):
  # A NaN noise level once made the quadratic family diverge at every step while its metrics
  # read a perfect 0 loss (diverged runs are left out); the run exited 0 having learned nothing.
  config = default.get_config()
  if section.startswith("eval"):
    config.eval.task = "quadratic_family"
    config.eval.task_kwargs = kwargs
  elif section.startswith("task"):
    config.task_families.quadratic.kwargs = kwargs
  else:
    config.learned_optimizer.kwargs = kwargs
  with pytest.raises(config_checks.ConfigError,
                     match=re.escape(f"config.{section}.{where}=") + ".* must be a finite number"):
    config_checks.check_buildable(config)


@pytest.mark.parametrize("field,value", [
    ("estimator.max_length", 3_000_000_000),  # was an OverflowError traceback in the first step
    ("eval.num_steps", 2**31),  # was an OverflowError after all of training, at the evaluation
    ("estimator.random_initial_iteration_offset", 2**31 - 100),  # offset + max_length overflows
])
def test_counts_beyond_int32_are_refused_before_building(field, value):
  config = default.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=re.escape(f"config.{field}={value}") +
                     r" is invalid: must be .*int32"):
    config_checks.check_sizes(config, 1)
  est = config.estimator
  config[section][name] = {"max_length": 2**31 - 1 - est.random_initial_iteration_offset,
                           "num_steps": 2**31 - 1,
                           "random_initial_iteration_offset": 2**31 - 1 - est.max_length}[name]
  config_checks.check_sizes(config, 1)


@pytest.mark.parametrize("name,kwargs,message", [
    # Once a run that exited 0 with an optimizer climbing the loss (inner loss 32 -> 1515).
    ("hypergrad_adam", {"learning_rate": -0.02},
     "learning_rate=-0.02 must be a finite number > 0"),
    ("hypergrad_adam", {"log_lr_min": 5.0}, "log_lr_min=5.0 must be <= log_lr_max (1.5)"),
    ("hypergrad_adam", {"hidden_sizes": (32, 0)}, "hidden_sizes[1]=0 must be an integer >= 1"),
    ("nn_adam", {"b2": 1.0}, "b2=1.0 must be in [0, 1)"),
    ("rnn_mlp_lopt", {"rms_decays": (0.5, 1.5)}, "rms_decays=(0.5, 1.5) must be in [0, 1)"),
    ("meta_sgd_wd", {"initial_wd": 0.0}, "initial_wd=0.0 must be a finite number > 0"),
    ("hparam_controller", {"base_lr": 0.0}, "base_lr=0.0 must be a finite number > 0"),
    ("per_param_mlp", {"step_mult": -1e-2}, "step_mult=-0.01 must be a finite number > 0"),
    ("adafac_mlp_lopt", {"hidden_layers": -1}, "hidden_layers=-1 must be an integer >= 0"),
])
def test_learned_optimizer_arguments_out_of_range_name_the_argument(name, kwargs, message):
  config = default.get_config()
  config.learned_optimizer.name = name
  config.learned_optimizer.kwargs = kwargs
  with pytest.raises(config_checks.ConfigError,
                     match=re.escape(f"cannot build {name}: {name}: {message}")):
    config_checks.check_buildable(config)


@pytest.mark.parametrize("name", sorted(p.stem for p in (pathlib.Path(__file__).parent.parent /
                                                         "configs").glob("*.py")
                                        if p.stem != "__init__"))
def test_every_shipped_config_has_only_known_fields(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_checks.check_known_fields(config, default.get_config())
  config_checks.check_names(config)


@pytest.mark.parametrize("field,value,says", [
    # Both were silently ignored (and saved in config.json) when set in a config file.
    ("estimator.trunc_lenght", 1, "estimator has: .*trunc_length"),
    ("eval.num_seed", 1, "eval has: .*num_seeds"),
    ("sead", 1, "config has: .*seed"),
])
def test_a_misspelled_field_in_a_config_file_is_refused(field, value, says):
  config = default.get_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_checks.ConfigError,
                     match=re.escape(f"config.{field}={value} is invalid: unknown field") + ".*"
                     + says):
    config_checks.check_known_fields(config, default.get_config())
  # Constructor arguments and family labels are free.
  ok = default.get_config()
  ok.learned_optimizer.kwargs = {"hidden_size": 8}
  ok.task_families.extra = {"name": "quadratic_family", "kwargs": {"dim": 3}}
  config_checks.check_known_fields(ok, default.get_config())


@pytest.mark.parametrize("family", [{"name": "quadratic_family"}, "quadratic_family",
                                    {"name": "quadratic_family", "kwargs": {}, "kwarg": {}}])
def test_a_task_family_entry_without_name_and_kwargs_is_refused(family):
  # A family without "kwargs" was an AttributeError traceback.
  config = default.get_config()
  config.task_families = {"q": family}
  with pytest.raises(config_checks.ConfigError,
                     match=r"config\.task_families\.q=.* is invalid: must be \{\"name\""):
    config_checks.check_names(config)
