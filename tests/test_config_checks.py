"""Config validation in-process (the subprocess tests in test_app.py cover main.py's exit)."""

import pytest

from configs import default
from lopt_tpu import config_checks


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
  # Length, logging, evaluation and the outer step size may change on resume.
  longer = default.get_config()
  longer.num_outer_steps *= 2
  longer.eval.num_seeds += 1
  longer.outer_optimizer.learning_rate /= 10
  config_checks.check_resume(longer, str(tmp_path))
