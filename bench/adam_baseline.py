"""The reference point for a PES outer step: plain vmapped Adam training of the same tasks.

For each task family of a workload, 2 * num_tasks instances (as many inner runs as PES's
antithetic pairs) are trained with `optax.adam(1e-3)` for `trunc_length` steps in one
`lax.scan`, all families in one jitted step, so the step does exactly the inner steps a PES
step does, minus the learned optimizer, the perturbations, restarts and the meta-gradient.
Batches come from keys derived as `TruncatedUnroll.unroll` derives them:
fold_in(fold_in(key, instance), t) -> split -> split(4)[0] is the batch key.

With a mesh, the instance axis is split over its devices under `jax.shard_map` (no
communication is needed: instances are independent).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt_tpu.outer import sharding
import timing  # bench/timing.py

TX = optax.adam(1e-3)


def init_instance(family, key, index):
  """Task parameters, task params and Adam state of one instance."""
  k_task, k_params = jax.random.split(jax.random.fold_in(key, index))
  task_params = family.sample(k_task)
  params, _ = family.task_fn(task_params).init_with_state(k_params)
  return task_params, params, TX.init(params)


def train_instance(family, num_steps, instance, key, index):
  """`num_steps` Adam steps of one instance; returns (instance, mean training loss)."""
  task_params, params, opt_state = instance
  task = family.task_fn(task_params)
  task_key = jax.random.fold_in(key, index)

  def body(carry, t):
    params, opt_state = carry
    k_step, _ = jax.random.split(jax.random.fold_in(task_key, t))
    k_batch, k_loss, _, _ = jax.random.split(k_step, 4)
    batch = task.sample_batch(k_batch, "train")
    loss, grads = jax.value_and_grad(task.loss)(params, k_loss, batch)
    updates, opt_state = TX.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, opt_state), losses = jax.lax.scan(body, (params, opt_state),
                                             jnp.arange(num_steps, dtype=jnp.int32))
  return (task_params, params, opt_state), jnp.mean(losses)


def make_step(families, num_steps, mesh):
  """step(instances, indices, key, step) -> (instances, losses): all families, one program."""
  def local(instances, indices, key):
    outs = [jax.vmap(functools.partial(train_instance, fam, num_steps), in_axes=(0, None, 0))(
        inst, key, idx) for fam, inst, idx in zip(families, instances, indices)]
    return [o[0] for o in outs], [o[1] for o in outs]

  if mesh is not None:
    spec_t, spec_r = jax.sharding.PartitionSpec(sharding.TASKS), jax.sharding.PartitionSpec()
    local = jax.shard_map(local, mesh=mesh, in_specs=(spec_t, spec_t, spec_r),
                          out_specs=(spec_t, spec_t))

  def step(instances, indices, key, step):
    return local(instances, indices, jax.random.fold_in(key, step))

  return jax.jit(step, donate_argnums=0)


def init_all(families, num_tasks, mesh, key):
  """Instances of every family ([2T] leading axis) and their indices, sharded with a mesh."""
  indices = [jnp.arange(2 * t, dtype=jnp.int32) for t in num_tasks]
  init = jax.jit(lambda key, indices: [
      jax.vmap(functools.partial(init_instance, fam, key))(idx)
      for fam, idx in zip(families, indices)])
  instances = init(key, indices)
  if mesh is not None:
    instances, indices = jax.device_put((instances, indices), sharding.split_tasks(mesh))
  return instances, indices


def measure(families, num_tasks, num_steps, mesh, steps, warmup):
  """Seconds per Adam step (spread over `steps` timed steps) and the first step's time."""
  key = jax.random.key(0)
  instances, indices = init_all(families, num_tasks, mesh, key)
  step_fn = make_step(families, num_steps, mesh)
  count = iter(range(1 + warmup + steps))
  run = lambda carry: step_fn(carry[0], indices, key, next(count))
  carry, (first_s,) = timing.timed_steps(run, (instances, None), 1)
  carry, times = timing.timed_steps(run, carry, warmup + steps)
  if not all(np.all(np.isfinite(l)) for l in carry[1]):
    raise FloatingPointError("Adam baseline produced non-finite losses")
  return {"first_step_s": first_s, "inner_steps_per_call": 2 * num_steps * sum(num_tasks),
          "step_s": timing.spread(times[warmup:])}
