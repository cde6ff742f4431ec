"""Every config key with its default: the Part 5 meta-training workload on the offline digits data.

Variants import this file and override fields. Run:
  python main.py --config=configs/default.py --workdir=/tmp/lopt_default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # every random number of the run derives from (seed, outer step)
  config.num_outer_steps = 500  # meta-training (outer) steps
  config.cpu_devices = 0  # CPU devices to shard tasks over (0: most <= cores dividing num_tasks)

  # The learned optimizer being meta-trained.
  config.learned_optimizer = ml_collections.ConfigDict()
  config.learned_optimizer.name = "mlp_lopt"  # see lopt_tpu.registry.LEARNED_OPTIMIZERS
  config.learned_optimizer.kwargs = ml_collections.ConfigDict()  # constructor arguments

  # The outer optimizer that updates theta.
  config.outer_optimizer = ml_collections.ConfigDict()
  config.outer_optimizer.name = "adam"  # adam | sgd
  config.outer_optimizer.learning_rate = 1e-3  # outer learning rate
  # Clip the meta-gradient's global norm (0: off, as in the Part 5 workload). PES estimates are
  # heavy-tailed: after one huge estimate Adam barely moves those entries for thousands of steps.
  config.outer_optimizer.meta_grad_clip = 0.0

  # One gradient estimator is built per task family, all with these settings.
  config.estimator = ml_collections.ConfigDict()
  config.estimator.name = "truncated_pes"  # see lopt_tpu.registry.ESTIMATORS
  config.estimator.num_tasks = 4  # task instances per family, global (divisible by devices)
  config.estimator.trunc_length = 50  # inner steps per outer step (truncated estimators)
  config.estimator.std = 0.01  # ES/PES perturbation standard deviation
  config.estimator.loss_type = "average"  # full-episode meta-loss: average | last
  config.estimator.sign_delta_loss_scalar = 0.0  # PES: use sign(delta loss) * this (0: off)
  config.estimator.meta_loss_split = "train"  # meta-loss on train batches or valid batches
  config.estimator.meta_loss_transform = "none"  # none | log (mean log loss: late steps count)
  config.estimator.schedule = "log_uniform"  # inner-run length schedule: log_uniform | constant
  config.estimator.min_length = 100  # shortest inner run (log_uniform)
  config.estimator.max_length = 300  # longest inner run; full_* estimators unroll this many
  config.estimator.random_initial_iteration_offset = 300  # desynchronize restarts (0: off)

  # Task families to meta-train on, by short label: each has a registry name and kwargs.
  config.task_families = ml_collections.ConfigDict()
  config.task_families.quadratic = ml_collections.ConfigDict(
      {"name": "quadratic_family", "kwargs": {"dim": 10}})  # FixedDimQuadraticFamily(10)
  config.task_families.mlp = ml_collections.ConfigDict(
      {"name": "digits_mlp", "kwargs": {}})  # 8x8 digits, 32-unit ReLU MLP

  # Logging and checkpoints.
  config.log_every = 10  # outer steps between metric writes
  config.checkpoint_every = 50  # outer steps between checkpoints (also saved at the end)
  config.keep_checkpoints = 3  # most recent checkpoints kept
  # Persistent XLA compilation cache: "workdir" (<workdir>/compilation_cache), a directory, or
  # "" (off). A resumed run then loads its compiled outer step instead of compiling it.
  config.compilation_cache = "workdir"

  # Evaluation: learned optimizer vs Adam over a learning-rate sweep on held-out seeds.
  config.eval = ml_collections.ConfigDict()
  config.eval.every = 0  # outer steps between evaluations during training (0: only at the end)
  config.eval.at_end = True  # evaluate once after the last outer step
  config.eval.task = "digits_mlp"  # task family name whose (first) task is evaluated
  config.eval.task_kwargs = ml_collections.ConfigDict()  # its constructor arguments
  config.eval.num_steps = 300  # inner steps per evaluation run
  config.eval.num_seeds = 3  # held-out seeds (never used in meta-training)
  config.eval.adam_learning_rates = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # Adam sweep
  return config
