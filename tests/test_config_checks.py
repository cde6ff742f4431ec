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
