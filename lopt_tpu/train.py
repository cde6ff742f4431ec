"""`train_and_evaluate(config, workdir)`: the meta-training loop of the application.

Config -> components -> restore-or-init -> jitted outer steps -> metrics and checkpoints out.
Keys derive from (seed, outer step), data are sampled on device from those keys, and the whole
outer state is checkpointed, so a run killed at any moment and restarted ends bitwise equal to
an uninterrupted one.
"""

import signal
import time
from typing import Any, Dict, Optional

from absl import logging
from etils import epath
import jax
import numpy as np

from lopt_tpu import checkpointing
from lopt_tpu import compile_cache
from lopt_tpu import config_checks
from lopt_tpu import distributed
from lopt_tpu import eval_run
from lopt_tpu import experiment
from lopt_tpu import pretrained
from lopt_tpu.outer import unroll as unroll_lib

INIT_STREAM, TRAIN_STREAM = 0, 1  # fold_in(seed key, stream) separates uses of the seed


class NonFiniteError(FloatingPointError):
  """The meta-loss or theta became non-finite; the last good checkpoint is kept."""


class _StopFlag:
  """Set by SIGTERM (preemption): the loop checkpoints and returns at the next step."""

  def __init__(self):
    self.stop = False

  def __call__(self, signum, frame):
    del signum, frame
    self.stop = True


# A checkpoint's extra entry: the sums of the metrics since the last log step, so that the
# first point logged after a resume averages the same steps as an uninterrupted run's.
LOG_WINDOW = "log_window"


def _restored_window(ckpt, start: int):
  """(sums, count, seconds) of the metrics window saved with checkpoint `start` (the sums
  restored exactly, in their dtypes); an empty window for a fresh start or a checkpoint saved
  without one."""
  window = ckpt.extra(start).get(LOG_WINDOW) if start else None
  if not window or not window.get("count"):
    return None, 0, 0.0
  sums = {k: np.asarray(v, window["dtypes"][k]) for k, v in window["sums"].items()}
  return sums, int(window["count"]), float(window["seconds"])


def _accumulate(total, metrics):
  if total is None:
    return dict(metrics)
  return {k: total[k] + v for k, v in metrics.items()}


# One program for theta's finiteness check before each save, not two tiny eager ones per leaf.
_all_finite = jax.jit(unroll_lib.all_finite)


def _check_finite(step: int, scalars: Dict[str, float], last_saved: int):
  bad = sorted(k for k, v in scalars.items() if not np.isfinite(v))
  if bad:
    kept = (f"the last good checkpoint (outer step {last_saved}) is kept" if last_saved
            else "no checkpoint was written before it")
    raise NonFiniteError(f"non-finite {', '.join(bad)} at outer step {step}; {kept} (lower "
                         "outer_optimizer.learning_rate or set outer_optimizer.meta_grad_clip)")


class AllRunsDivergedError(NonFiniteError):
  """Every inner run of every task family diverged for `MAX_ALL_DIVERGED_STEPS` outer steps."""


# Outer steps in a row in which every inner run diverged before the run is stopped: diverged
# runs give no meta-gradient, so theta stays where every run diverges (only the outer
# optimizer's momentum still moves it) and the run would go on learning nothing.
MAX_ALL_DIVERGED_STEPS = 100
_DIVERGED = "/diverged_frac"


def _all_diverged_steps(scalars: Dict[str, float], count: int, before: int, step: int) -> int:
  """Outer steps in a row, to this log step, in which every inner run diverged. Warns for a
  family all of whose runs diverged in this window (its metrics then read 0)."""
  fracs = {k[:-len(_DIVERGED)]: v for k, v in scalars.items() if k.endswith(_DIVERGED)}
  for name, frac in sorted(fracs.items()):
    if frac == 1.0:
      logging.warning("Every inner run of %s diverged in outer steps %d-%d: it adds nothing to "
                      "the meta-gradient, and its losses read 0.", name, step - count + 1, step)
  return before + count if fracs and all(f == 1.0 for f in fracs.values()) else 0


def init_state(exp: experiment.Experiment, seed: int):
  key = jax.random.fold_in(jax.random.key(seed), INIT_STREAM)
  return exp.learner.init(key)


def _enable_cache(cache_dir: Optional[str]):
  # After the config checks, whose eager shape checks compile tiny programs: JAX creates the
  # cache's directory at the first compilation once it is enabled, even for a run that the
  # checks then refuse. Their compiles leave JAX's cache uninitialized, so enabling it now works.
  if cache_dir:
    compile_cache.enable(cache_dir)


def train_and_evaluate(config, workdir: str, cache_dir: Optional[str] = None) -> Any:
  """Meta-trains as `config` says, resuming from `workdir` if it holds a checkpoint.

  `cache_dir`: a persistent compilation cache to enable once the config is validated.
  Returns the final outer state (theta is `state.gradient_learner_state.theta`).
  """
  config_checks.validate(config, workdir)
  _enable_cache(cache_dir)
  exp = experiment.build(config)
  train_key = jax.random.fold_in(jax.random.key(config.seed), TRAIN_STREAM)
  # The outer step compiles (seconds) while the state is built or restored and TensorFlow loads.
  exp.learner.start_compiling_update(train_key)
  ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints", keep=config.keep_checkpoints)
  # (validate refused a num_outer_steps below the newest checkpoint: start cannot exceed it)
  state, start = ckpt.restore_latest(init_state(exp, config.seed))
  # clu's writers load TensorFlow (~3 s here): imported only once the config, the data, the
  # workdir and the checkpoint have passed, so that those errors are reported without the wait.
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  if start:
    logging.info("Resumed from the checkpoint of outer step %d.", start)
  else:
    writer.write_hparams(config_checks.flatten(config.to_dict()))
    if is_chief:
      config_checks.record_run_config(config, workdir)
  inner_per_step = sum(e.inner_steps_per_call for e in exp.estimators)
  report = periodic_actions.ReportProgress(num_train_steps=config.num_outer_steps,
                                           writer=writer, every_steps=config.log_every)
  stop = _StopFlag()
  previous_handler = signal.signal(signal.SIGTERM, stop)
  try:
    state = _loop(config, exp, state, start, train_key, inner_per_step, writer, report, ckpt,
                  stop, workdir)
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    ckpt.close()
    writer.flush()
  logging.info("Final theta of process %d: sha256 %s", jax.process_index(),
               pretrained.theta_fingerprint(_theta(state)))
  distributed.barrier("train_and_evaluate_done")
  return state


def one_step_in_flight() -> bool:
  """Whether the loop must wait for each outer step before dispatching the next.

  On several XLA:CPU devices each device's part of a step runs on a thread of one shared pool.
  With about one thread per core (what main.py sets, because more threads than cores cost ~30%
  of the step time), two steps in flight can deadlock: a thread of step n+1 waits in an
  all-reduce for a device whose step-n work finds no free thread (XLA aborts after 40 s).
  Waiting costs nothing measurable: dispatching a step takes well under 1% of running it.
  """
  return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def _loop(config, exp, state, start, train_key, inner_per_step, writer, report, ckpt, stop,
          workdir):
  total, count, seconds = _restored_window(ckpt, start)
  t0 = time.perf_counter() - seconds
  step = saved = start
  all_diverged = 0  # outer steps in a row in which every inner run diverged
  evaluated = None  # the step the loop last evaluated, in this process
  wait = one_step_in_flight()

  def save(step, state):
    # Never keep a non-finite state as "the last good checkpoint": checked at every save, not
    # only at log steps (a resume from it would fail again at once).
    _check_finite(step, {"theta": 0.0 if bool(_all_finite(_theta(state))) else float("nan")},
                  saved)
    sums = jax.device_get(total or {})
    window = {"count": count, "seconds": time.perf_counter() - t0,
              "sums": {k: v.item() for k, v in sums.items()},
              "dtypes": {k: str(v.dtype) for k, v in sums.items()}}
    ckpt.save(step, state, extra={LOG_WINDOW: window})
    return step

  if start and config.eval.every and start % config.eval.every == 0 and _not_evaluated(workdir,
                                                                                     start):
    # A stop (SIGTERM) during step `start` saved it but left its evaluation to this run.
    eval_run.evaluate_theta(config, exp.learned_opt, _theta(state), workdir, writer, start)
    evaluated = start
  for step in range(start + 1, config.num_outer_steps + 1):
    state, loss, metrics = exp.learner.update(state, train_key)
    if wait:
      jax.block_until_ready(loss)
    metrics = dict(metrics, meta_loss=loss)
    if step == start + 1 and total is not None and set(total) != set(metrics):
      total, count, t0 = None, 0, time.perf_counter()  # a restored window of other metrics
    total = _accumulate(total, metrics)
    count += 1
    report(step)
    if step % config.log_every == 0 or step == config.num_outer_steps:
      scalars = {k: float(v) / count for k, v in jax.device_get(total).items()}
      _check_finite(step, scalars, saved)
      all_diverged = _all_diverged_steps(scalars, count, all_diverged, step)
      if all_diverged >= MAX_ALL_DIVERGED_STEPS:
        raise AllRunsDivergedError(
            f"every inner run of every task family diverged in each of the last {all_diverged} "
            f"outer steps (to step {step}): theta gets no meta-gradient and cannot improve; "
            + (f"the last checkpoint (outer step {saved}) is kept" if saved else
               "no checkpoint was written") + ". Check the learned optimizer's step sizes "
            "(learned_optimizer.kwargs), the task families' kwargs and estimator.std.")
      elapsed = time.perf_counter() - t0
      scalars = {f"meta/{k}": v for k, v in scalars.items()}
      scalars["perf/outer_steps_per_s"] = count / elapsed
      scalars["perf/inner_steps_per_s"] = count * inner_per_step / elapsed
      writer.write_scalars(step, scalars)
      logging.info("outer step %d: meta-loss %.5g", step, scalars["meta/meta_loss"])
      total, count, t0 = None, 0, time.perf_counter()
    if step % config.checkpoint_every == 0 or step == config.num_outer_steps or stop.stop:
      saved = save(step, state)
    if config.eval.every and step % config.eval.every == 0 and not stop.stop:
      eval_run.evaluate_theta(config, exp.learned_opt, _theta(state), workdir, writer, step)
      evaluated = step
    if stop.stop:  # SIGTERM may have come during the evaluation, after this step's save test
      if saved != step:
        saved = save(step, state)
      logging.warning("SIGTERM: saved outer step %d and stopping.", step)
      return state
  if (config.eval.at_end and step == config.num_outer_steps and evaluated != step
      and _not_evaluated(workdir, step)):  # e.g. a finished run launched again
    eval_run.evaluate_theta(config, exp.learned_opt, _theta(state), workdir, writer, step)
  return state


def _not_evaluated(workdir: str, step: int) -> bool:
  """Whether outer step `step` has no evaluation report yet (as process 0, which writes the
  reports, sees it: every process must make the same choice)."""
  report = epath.Path(eval_run.report_path(workdir, step))
  return distributed.as_process_0_sees(not report.exists())


def _theta(state):
  return state.gradient_learner_state.theta


def load_checkpoint(config, workdir: str):
  """(outer state, step) of the newest checkpoint in `workdir`; step 0 if there is none.

  The trained theta is `state.gradient_learner_state.theta`, usable with `lopt_tpu.as_optax`.
  """
  exp = experiment.build(config)
  ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints", keep=config.keep_checkpoints)
  try:
    return ckpt.restore_latest(init_state(exp, config.seed))
  finally:
    ckpt.close()


def evaluate_checkpoint(config, workdir: str, cache_dir: Optional[str] = None
                        ) -> Dict[str, Any]:
  """The evaluation mode: evaluates the theta of the newest checkpoint in `workdir`
  (`cache_dir` as in `train_and_evaluate`)."""
  # Before anything is built, compiled or created (a mistyped workdir is the usual cause).
  if config_checks.latest_checkpoint_step(workdir) is None:
    raise config_checks.ConfigError(f"--workdir={workdir!r} holds no checkpoint to evaluate; "
                                    "train first (--mode=train)")
  # Incl. that the checkpoint belongs to this config (its length may differ: not training).
  config_checks.validate(config, workdir, training=False)
  _enable_cache(cache_dir)
  state, step = load_checkpoint(config, workdir)
  if not step:  # only unfinished checkpoint directories
    raise config_checks.ConfigError(f"--workdir={workdir!r} holds no finished checkpoint to "
                                    "evaluate; train first (--mode=train)")
  from clu import metric_writers  # pylint: disable=g-import-not-at-top (see train_and_evaluate)
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() != 0)
  learned_opt = experiment.build_learned_optimizer(config)
  result = eval_run.evaluate_theta(config, learned_opt, _theta(state), workdir, writer, step)
  writer.flush()
  return result
