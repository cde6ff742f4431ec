"""One PES outer step is one compiled XLA program, compiled once and reused."""

import logging

import jax
import optax

from lopt_tpu.learned_optimizers import mlp_lopt
from lopt_tpu.outer import gradient_learner
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


def _trainer(dim, num_tasks, trunc_length):
  lopt = mlp_lopt.MLPLOpt()
  unroll = unroll_lib.TruncatedUnroll(quadratics.FixedDimQuadraticFamily(dim), lopt,
                                      truncation.LogUniformLengthSchedule(20, 40), num_tasks, 40)
  return gradient_learner.SingleMachineGradientLearner(
      lopt, [pes.TruncatedPES(unroll, trunc_length=trunc_length)], optax.adam(1e-3))


def test_pes_outer_step_compiles_once():
  trainer = _trainer(10, 4, 5)
  key = jax.random.key(0)
  state = jax.jit(trainer.init)(key)
  counter = _CompileCounter()
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  try:
    with jax.log_compiles():
      state, loss, _ = trainer.update(state, key)
      jax.block_until_ready(loss)
      first = list(counter.messages)
      for _ in range(4):
        state, loss, _ = trainer.update(state, key)
      jax.block_until_ready(loss)
  finally:
    logger.removeHandler(counter)
  assert len(first) == 1, first  # the whole outer step is one program
  assert counter.messages == first, counter.messages[1:]  # and later steps reuse it


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
