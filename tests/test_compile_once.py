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


def test_pes_outer_step_compiles_once():
  lopt = mlp_lopt.MLPLOpt()
  unroll = unroll_lib.TruncatedUnroll(quadratics.FixedDimQuadraticFamily(10), lopt,
                                      truncation.LogUniformLengthSchedule(20, 40), 4, 40)
  trainer = gradient_learner.SingleMachineGradientLearner(
      lopt, [pes.TruncatedPES(unroll, trunc_length=5)], optax.adam(1e-3))
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
