"""Quality run: ScheduledAdam meta-trained with truncated PES on the 8x8 digits MLP, 1000 steps.

  python main.py --config=configs/quality_digits.py --workdir=/tmp/lopt_quality

ScheduledAdam starts as Adam at the digits MLP's tuned learning rate (3e-2, the best of the
half-decade sweep) with per-tensor rates scaled by 1/fan-in, and meta-learns per-tensor
lr / beta1 / beta2 schedules on top. Meta-loss: the mean training loss over the 1000-step
horizon (the number the evaluation reports), estimated by PES over truncations of 50 steps.
Measured figures, timing and the held-out evaluation: docs/quality/README_section.md.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_outer_steps = 3000  # sized to finish in < 15 min on 2 CPU cores (see docstring)

  config.learned_optimizer.name = "hypergrad_adam"
  config.learned_optimizer.kwargs = {
      "learning_rate": 2e-2,  # lr0: the rate at which every tensor starts
      "hyper_lr": 0.5,  # hand-designed part: log-lr += 0.5 * cos(gradient, last direction)
      "log_lr_min": -0.5,  # the rule's rates stay within lr0 * [e^-0.5, e^1.5]
      "log_lr_max": 1.5,
      "drift_scale": 0.0,  # no learned drift of the rule's state (it made PES unstable)
      "control_bound": 1.0,  # learned corrections: lr x e^(+-1), betas' logits +-1
      "hidden_sizes": (32,),  # control MLP
  }

  config.outer_optimizer.learning_rate = 3e-3  # Adam on theta
  config.outer_optimizer.meta_grad_clip = 5.0  # PES estimates are heavy-tailed

  config.estimator.name = "truncated_pes"
  config.estimator.num_tasks = 8  # task instances (antithetic pairs) per outer step
  config.estimator.trunc_length = 50  # 20 truncations per 1000-step inner run
  config.estimator.std = 0.01  # PES perturbation
  config.estimator.meta_loss_split = "train"  # the evaluation's metric: mean training loss
  config.estimator.schedule = "constant"  # every inner run lasts the full horizon
  config.estimator.min_length = 1000
  config.estimator.max_length = 1000  # the meta-training horizon
  config.estimator.random_initial_iteration_offset = 1000  # tasks spread over the horizon

  config.task_families = {
      "mlp": {"name": "digits_mlp", "kwargs": {}},  # the task: 32 ReLU units, batch 128
      # Masked MLPs of width 16-48, depth 1-3, relu or tanh: keeps the learned corrections
      # from overfitting the one task (gelu/swish/elu, width 128, batch 32 stay held out).
      "family": {"name": "image_mlp_family",
                 "kwargs": {"dataset": "digits8", "max_width": 48,
                            "activations": ("relu", "tanh")}},
  }

  config.log_every = 25
  config.checkpoint_every = 250
  config.eval.task = "digits_mlp"
  config.eval.num_steps = 1000  # the meta-training horizon
  config.eval.num_seeds = 5
  return config
