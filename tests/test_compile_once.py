"""One PES outer step is one compiled XLA program, compiled once and reused."""

import contextlib
import logging

import jax
import optax
import pytest

from lopt_tpu.learned_optimizers import mlp_lopt
from lopt_tpu.outer import gradient_learner
from lopt_tpu.outer import sharding
from lopt_tpu.outer import truncation
from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import pes
from lopt_tpu.tasks import quadratics


class _CompileCounter(logging.Handler):

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages = []

  def emit(self, record):
    msg = record.getMessage()
    if "Compiling" in msg:
      self.messages.append(msg)


@contextlib.contextmanager
def _compiles():
  """Collects JAX's "Compiling ..." log messages of the block."""
  counter = _CompileCounter()
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  try:
    with jax.log_compiles():
      yield counter.messages
  finally:
    logger.removeHandler(counter)


def _trainer(dim, num_tasks, trunc_length, mesh=None):
  lopt = mlp_lopt.MLPLOpt()
  unroll = unroll_lib.TruncatedUnroll(quadratics.FixedDimQuadraticFamily(dim), lopt,
                                      truncation.LogUniformLengthSchedule(20, 40), num_tasks, 40)
  return gradient_learner.SingleMachineGradientLearner(
      lopt, [pes.TruncatedPES(unroll, trunc_length=trunc_length)], optax.adam(1e-3), mesh=mesh)


def test_pes_outer_step_compiles_once():
  trainer = _trainer(10, 4, 5)
  key = jax.random.key(0)
  state = jax.jit(trainer.init)(key)
  with _compiles() as messages:
    state, loss, _ = trainer.update(state, key)
    jax.block_until_ready(loss)
    first = list(messages)
    for _ in range(4):
      state, loss, _ = trainer.update(state, key)
    jax.block_until_ready(loss)
  assert len(first) == 1, first  # the whole outer step is one program
  assert messages == first, messages[1:]  # and later steps reuse it


def test_outer_step_compiles_with_cpu_options_and_also_nests_in_user_jits():
  """At top level the step is compiled with `compile_options()` (LLVM -O2 on CPU); traced
  inside a user's jit, where XLA options are not allowed, it is the plain jit."""
  trainer = _trainer(4, 2, 3)
  key = jax.random.key(0)
  state = jax.jit(trainer.init)(key)  # nested: init's own jit is traced inside this one
  if jax.default_backend() == "cpu":
    assert gradient_learner.compile_options() == {"xla_backend_optimization_level": 2}
  state, loss, _ = trainer.update(state, key)  # top level: compiled with the options
  assert loss.shape == ()
  shapes = jax.eval_shape(lambda s, k: trainer.update(s, k)[1], state, key)
  assert shapes.shape == ()


@pytest.mark.parametrize("sharded", [False, True])
def test_update_reuses_the_program_compiled_in_the_background(sharded):
  """`start_compiling_update` (main.py starts it before loading TensorFlow and building the
  state) compiles exactly the program `update` runs: the first update compiles nothing more,
  and it computes what an update compiled on the spot computes."""
  mesh = sharding.task_mesh() if sharded else None
  key = jax.random.key(0)
  trainer = _trainer(4, 8, 3, mesh)
  compiled = trainer.start_compiling_update(key)
  state = trainer.init(key)
  compiled.result()
  with _compiles() as messages:
    state, loss, _ = trainer.update(state, key)
    jax.block_until_ready(loss)
  assert not [m for m in messages if "_update_impl" in m], messages
  reference = _trainer(4, 8, 3, mesh)
  _, expected, _ = reference.update(reference.init(key), key)
  assert float(loss) == float(expected)


def test_a_failed_background_compile_is_raised_by_update():
  trainer = _trainer(4, 2, 3)
  key = jax.random.key(0)
  trainer._update = None  # pylint: disable=protected-access  (lower() fails in the thread)
  trainer.start_compiling_update(key)
  with pytest.raises(AttributeError):
    trainer.update(None, key)
