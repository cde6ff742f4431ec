"""MLP classifiers on small images: fixed tasks and a sampled, vmappable family.

`ImageMLPTask` is one MLP with a fixed architecture. `ImageMLPFamily` samples width, depth,
activation and init scale per task, yet every member has the *same* parameter shapes (those
of the largest member), so that many members can be vmapped and sharded along a task axis;
the sampled architecture is imposed by masking (see `ImageMLPFamily`).
"""

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lopt_tpu.tasks import base
from lopt_tpu.tasks import datasets
from lopt_tpu.tasks import initializers

ACTIVATIONS = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "swish": nn.swish,
}


def _positive_batch_size(batch_size) -> int:
  """Refused at construction: 0 or less only failed inside the first traced loss, cryptically."""
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return int(batch_size)


def get_activation(name: str):
  """Returns the activation function called `name`."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; known activations: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _as_dataset(dataset: Union[str, datasets.ImageDataset]) -> datasets.ImageDataset:
  return datasets.load_dataset(dataset) if isinstance(dataset, str) else dataset


def _cross_entropy(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def _scale_kernels(params, scale):
  """Multiplies every `kernel` leaf by `scale` (biases start at zero, so they are left)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p * scale if path[-1].key == "kernel" else p, params)


class MLP(nn.Module):
  """Flattens images, applies `hidden_sizes` dense layers with `activation`, then logits."""
  hidden_sizes: Tuple[int, ...]
  num_classes: int
  activation: str = "relu"

  @nn.compact
  def __call__(self, images):
    act = get_activation(self.activation)
    h = images.reshape(images.shape[0], -1)
    for i, size in enumerate(self.hidden_sizes):
      h = act(nn.Dense(size, name=f"hidden_{i}")(h))
    return nn.Dense(self.num_classes, name="logits")(h)


class ImageMLPTask(base.Task):
  """Softmax cross-entropy (mean over the batch) of an MLP on a small image dataset.

  Args:
    dataset: an `ImageDataset` or a registered dataset name ("digits8", "fashion_mnist8").
    hidden_sizes: width of each hidden layer.
    activation: name of the hidden activation (relu, tanh, gelu, elu, swish).
    batch_size: examples per sampled batch.
    init_scale: multiplies the (LeCun-normal) initial weights.
  """

  def __init__(self, dataset: Union[str, datasets.ImageDataset],
               hidden_sizes: Sequence[int] = (32,), activation: str = "relu",
               batch_size: int = 128, init_scale: float = 1.0):
    get_activation(activation)  # Fail at construction, not at the first trace.
    self.dataset = _as_dataset(dataset)
    self.hidden_sizes = tuple(int(s) for s in hidden_sizes)
    self.activation = activation
    self.batch_size = _positive_batch_size(batch_size)
    self.init_scale = init_scale
    self.module = MLP(self.hidden_sizes, self.dataset.num_classes, activation)
    self._shapes = initializers.param_shapes(
        self.module, jnp.zeros((1,) + self.dataset.image_shape, jnp.float32))
    widths = "x".join(str(s) for s in self.hidden_sizes) or "linear"
    self.name = f"{self.dataset.name}_mlp_{widths}_{activation}"

  def init(self, key):
    return _scale_kernels(initializers.lecun_normal(self._shapes, key), self.init_scale)

  def logits(self, params, images):
    return self.module.apply({"params": params}, images)

  def loss(self, params, key, batch):
    del key
    return _cross_entropy(self.logits(params, batch["image"]), batch["label"])

  def accuracy(self, params, batch):
    """Fraction of `batch` classified correctly."""
    return _accuracy(self.logits(params, batch["image"]), batch["label"])

  def sample_batch(self, key, split="train"):
    return datasets.sample_batch(self.dataset, key, self.batch_size, split)


_TUTORIAL_MLP = {"hidden_sizes": (32,), "activation": "relu", "batch_size": 128}


def fmnist8_mlp(data_dir: Optional[str] = None, download: bool = True,
                **task_kwargs) -> ImageMLPTask:
  """The tutorials' task: Fashion-MNIST at 8x8, one hidden layer of 32 ReLU, batch 128.

  `data_dir`/`download` go to TFDS (pass download=False offline to fail at once); other
  keyword arguments override ImageMLPTask's (hidden_sizes, activation, batch_size, ...).
  """
  dataset = datasets.load_fashion_mnist8(data_dir=data_dir, download=download)
  return ImageMLPTask(dataset, **dict(_TUTORIAL_MLP, **task_kwargs))


def digits_mlp(**task_kwargs) -> ImageMLPTask:
  """The same MLP on scikit-learn's digits: the offline stand-in for `fmnist8_mlp`."""
  return ImageMLPTask(datasets.load_digits8(), **dict(_TUTORIAL_MLP, **task_kwargs))


class MaskedMLP(nn.Module):
  """An MLP of fixed shape [max_width] * max_depth that behaves as a smaller one.

  `width`, `depth` and `activation` are call arguments (arrays, possibly traced): hidden
  units >= width are zeroed after the activation, hidden layers >= depth are skipped (the
  hidden state passes through unchanged) and `activation` indexes `activations`.
  """
  max_width: int
  max_depth: int
  num_classes: int
  activations: Tuple[str, ...]

  @nn.compact
  def __call__(self, images, width, depth, activation):
    fns = [get_activation(name) for name in self.activations]
    # Under vmap a batched index turns `switch` into a select over all branches; the
    # unselected branches get exactly zero gradient.
    act = lambda z: jax.lax.switch(activation, fns, z)
    unit_on = jnp.arange(self.max_width) < width
    h = images.reshape(images.shape[0], -1)
    for i in range(self.max_depth):
      z = jnp.where(unit_on, act(nn.Dense(self.max_width, name=f"hidden_{i}")(h)), 0.0)
      # The first layer changes the dimension, so it is always applied (min_depth >= 1).
      h = z if i == 0 else jnp.where(i < depth, z, h)
    return nn.Dense(self.num_classes, name="logits")(h)


class ImageMLPFamily(base.TaskFamily):
  """MLPs on one image dataset with sampled width, depth, activation and init scale.

  `sample(key)` returns a dict of scalar arrays: width (int32, uniform in
  [min_width, max_width]), depth (int32, number of hidden layers, uniform in
  [min_depth, max_depth]), activation (int32 index into `activations`) and init_scale
  (float32, log-uniform in `log_init_scale_range`).

  Every member has the parameter shapes of the largest one (max_depth hidden layers of
  max_width units), so members can be vmapped and sharded; the sampled architecture is
  imposed by masking (`MaskedMLP`). The initial params are exactly those of the unmasked
  `ImageMLPTask` with `hidden_sizes=(width,) * depth`, zero-padded: LeCun-normal with the
  true fan-in `width` (not max_width), times init_scale. Masked entries get exactly zero
  gradient and never affect the loss. The trade-offs of masking:
    * compute and memory are those of the largest member, whatever is sampled;
    * the learned optimizer sees padded tensors: tensor sizes and shapes do not reveal the
      architecture, and any per-tensor statistic (norms, means) it computes includes the
      padded zeros; its updates of masked entries (zero gradient, but e.g. a bias term in
      its output) make them drift from zero, harmlessly for the loss. `param_mask` lets an
      optimizer or a metric exclude them.
  """

  name = "image_mlp_family"

  def __init__(self, dataset: Union[str, datasets.ImageDataset], max_width: int = 64,
               max_depth: int = 3, min_width: int = 16, min_depth: int = 1,
               activations: Sequence[str] = ("relu", "tanh", "gelu", "swish"),
               log_init_scale_range: Tuple[float, float] = (math.log(0.5), math.log(2.0)),
               batch_size: int = 128):
    if not 1 <= min_width <= max_width:
      raise ValueError(f"Need 1 <= min_width <= max_width, got {min_width}, {max_width}")
    if not 1 <= min_depth <= max_depth:
      raise ValueError(f"Need 1 <= min_depth <= max_depth, got {min_depth}, {max_depth}")
    if not activations:
      raise ValueError("activations must not be empty")
    for name in activations:
      get_activation(name)
    if log_init_scale_range[0] > log_init_scale_range[1]:
      raise ValueError(f"log_init_scale_range must be (low, high), got {log_init_scale_range}")
    self.dataset = _as_dataset(dataset)
    self.max_width, self.max_depth = int(max_width), int(max_depth)
    self.min_width, self.min_depth = int(min_width), int(min_depth)
    self.activations = tuple(activations)
    self.log_init_scale_range = tuple(float(x) for x in log_init_scale_range)
    self.batch_size = _positive_batch_size(batch_size)
    self.module = MaskedMLP(self.max_width, self.max_depth, self.dataset.num_classes,
                            self.activations)
    self.param_shapes = initializers.param_shapes(
        self.module, jnp.zeros((1,) + self.dataset.image_shape, jnp.float32), self.max_width,
        self.max_depth, 0)

  def sample(self, key) -> Dict[str, jax.Array]:
    k_width, k_depth, k_act, k_scale = jax.random.split(key, 4)
    low, high = self.log_init_scale_range
    return {
        "width": jax.random.randint(k_width, [], self.min_width, self.max_width + 1, jnp.int32),
        "depth": jax.random.randint(k_depth, [], self.min_depth, self.max_depth + 1, jnp.int32),
        "activation": jax.random.randint(k_act, [], 0, len(self.activations), jnp.int32),
        "init_scale": jnp.exp(jax.random.uniform(k_scale, [], jnp.float32, low, high)),
    }

  def task_fn(self, task_params) -> "MaskedImageMLPTask":
    return MaskedImageMLPTask(self, task_params)


class MaskedImageMLPTask(base.Task):
  """One member of an `ImageMLPFamily`; `task_params` may be traced arrays."""

  def __init__(self, family: ImageMLPFamily, task_params: Dict[str, jax.Array]):
    self.family = family
    self.task_params = task_params

  def param_mask(self):
    """Bool pytree like the params: True where an entry is part of the sampled network."""
    fam, tp = self.family, self.task_params
    unit = jnp.arange(fam.max_width) < tp["width"]
    in_dim = math.prod(fam.dataset.image_shape)
    mask = {"hidden_0": {"kernel": jnp.broadcast_to(unit, (in_dim, fam.max_width)),
                         "bias": unit}}
    for i in range(1, fam.max_depth):
      on = unit & (i < tp["depth"])
      mask[f"hidden_{i}"] = {"kernel": unit[:, None] & on[None, :], "bias": on}
    mask["logits"] = {
        "kernel": jnp.broadcast_to(unit[:, None], (fam.max_width, fam.dataset.num_classes)),
        "bias": jnp.ones([fam.dataset.num_classes], bool)}
    return mask

  def init(self, key):
    fam, tp = self.family, self.task_params
    params = initializers.lecun_normal(fam.param_shapes, key)
    # LeCun init divided by sqrt(max_width); the sampled net's fan-in is `width`.
    fan_in_fix = jnp.sqrt(fam.max_width / jnp.asarray(tp["width"], jnp.float32))
    params = {k: _scale_kernels(v, fan_in_fix) if k != "hidden_0" else v
              for k, v in params.items()}
    params = jax.tree_util.tree_map(lambda p, m: jnp.where(m, p, 0.0), params,
                                    self.param_mask())
    return _scale_kernels(params, tp["init_scale"])

  def logits(self, params, images):
    tp = self.task_params
    return self.family.module.apply({"params": params}, images, tp["width"], tp["depth"],
                                    tp["activation"])

  def loss(self, params, key, batch):
    del key
    return _cross_entropy(self.logits(params, batch["image"]), batch["label"])

  def accuracy(self, params, batch):
    """Fraction of `batch` classified correctly."""
    return _accuracy(self.logits(params, batch["image"]), batch["label"])

  def sample_batch(self, key, split="train"):
    return datasets.sample_batch(self.family.dataset, key, self.family.batch_size, split)
