"""Tests of the image datasets and the image-MLP tasks and family."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_tpu import registry
from lopt_tpu.tasks import datasets
from lopt_tpu.tasks import image_mlp


def _key(seed):
  """A PRNG key of the "rbg" implementation.

  The code under test works with any key implementation; rbg keeps this file fast, since
  XLA:CPU spends ~0.3 s compiling each threefry draw and rbg draws compile ~5x faster.
  """
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(name="digits")
def fixture_digits():
  return datasets.load_digits8()


@pytest.fixture(name="fresh_fmnist_cache")
def fixture_fresh_fmnist_cache():
  # The loader is lru-cached: a mocked dataset must not leak into other tests.
  datasets.load_fashion_mnist8.cache_clear()
  yield
  datasets.load_fashion_mnist8.cache_clear()


def _rows(images):
  """Images as a sorted list of byte strings (a multiset that ignores order)."""
  images = np.asarray(images)
  return sorted(row.tobytes() for row in images.reshape(images.shape[0], -1))


def _full_split(dataset, split):
  images, labels = dataset.split(split)
  return {"image": images.astype(jnp.float32) / dataset.max_value, "label": labels}


# ---- datasets ----------------------------------------------------------------------------------


def test_digits_loader_shapes_and_split(digits):
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  assert digits.train_images.shape == (1438, 8, 8, 1)
  assert digits.valid_images.shape == (359, 8, 8, 1)
  assert digits.train_images.dtype == jnp.uint8 and digits.valid_images.dtype == jnp.uint8
  assert digits.train_labels.dtype == jnp.int32 and digits.train_labels.shape == (1438,)
  assert digits.num_classes == 10 and digits.name == "digits8" and digits.max_value == 16
  for labels in (digits.train_labels, digits.valid_labels):
    assert int(labels.min()) == 0 and int(labels.max()) == 9
  assert int(digits.train_images.max()) == 16
  # Train and valid partition the 1,797 images: every image in exactly one split.
  all_images = np.asarray(sk_datasets.load_digits().images, np.uint8)
  both = np.concatenate([digits.train_images, digits.valid_images])
  assert _rows(both) == _rows(all_images)
  # Deterministic: a fresh load (cache cleared) gives the same split.
  datasets.load_digits8.cache_clear()
  again = datasets.load_digits8()
  assert again is not digits
  np.testing.assert_array_equal(again.valid_images, digits.valid_images)
  np.testing.assert_array_equal(again.train_labels, digits.train_labels)
  assert datasets.load_digits8() is again  # cached


def test_load_dataset_registry(digits):
  assert datasets.load_dataset("digits8") is datasets.load_digits8()
  with pytest.raises(ValueError, match="fashion_mnist8"):
    datasets.load_dataset("mnist")
  del digits


def test_sample_batch_in_jit(digits):
  draw = jax.jit(lambda k: datasets.sample_batch(digits, k, 64, "train"))
  a, b, c = draw(_key(0)), draw(_key(0)), draw(_key(1))
  assert a["image"].shape == (64, 8, 8, 1) and a["image"].dtype == jnp.float32
  assert a["label"].shape == (64,) and a["label"].dtype == jnp.int32
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["image"], c["image"])
  assert float(a["image"].min()) == 0.0 and float(a["image"].max()) == 1.0
  assert 0 <= int(a["label"].min()) and int(a["label"].max()) <= 9


def test_sample_batch_draws_from_its_split(digits):
  batch = jax.jit(lambda k: datasets.sample_batch(digits, k, 256, "valid"))(_key(3))
  as_uint8 = np.round(np.asarray(batch["image"]) * 16).astype(np.uint8)
  valid_rows = set(_rows(digits.valid_images))
  assert all(row in valid_rows for row in _rows(as_uint8))
  with pytest.raises(ValueError, match="split"):
    datasets.sample_batch(digits, _key(0), 8, "test")


@pytest.mark.usefixtures("fresh_fmnist_cache")
def test_fashion_mnist8_under_tfds_mock(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=24):
    ds = datasets.load_dataset("fashion_mnist8", data_dir=str(tmp_path))
  assert ds.train_images.shape == (24, 8, 8, 1) and ds.valid_images.shape == (24, 8, 8, 1)
  assert ds.train_images.dtype == jnp.uint8 and ds.train_labels.dtype == jnp.int32
  assert ds.num_classes == 10 and ds.name == "fashion_mnist8" and ds.max_value == 255
  assert 0 <= int(ds.train_labels.min()) and int(ds.train_labels.max()) <= 9
  batch = datasets.sample_batch(ds, _key(0), 16, "valid")
  assert batch["image"].shape == (16, 8, 8, 1)
  assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0


def test_resize_averages_areas():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # Left half 0, right half 200: an 8x8 area average keeps the halves (4 columns each).
  image = np.zeros([1, 28, 28, 1], np.uint8)
  image[:, :, 14:] = 200
  resize = datasets._resize_to_uint8  # pylint: disable=protected-access
  small, _ = resize(tf.constant(image), tf.constant([0]))
  small = np.asarray(small)[0, :, :, 0]
  assert small.dtype == np.uint8 and small.shape == (8, 8)
  np.testing.assert_array_equal(small[:, :4], 0)
  np.testing.assert_array_equal(small[:, 4:], 200)


@pytest.mark.usefixtures("fresh_fmnist_cache")
def test_image_mlp_family_passes_data_dir_and_download_to_its_dataset(tmp_path):
  # It used to accept neither, so a family on Fashion-MNIST could only use TFDS's default
  # directory, and offline it retried the download for minutes instead of failing at once.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  make = registry.get("task family", "image_mlp_family")
  start = time.perf_counter()
  with pytest.raises(datasets.DatasetUnavailableError, match="fashion_mnist8"):
    make(dataset="fashion_mnist8", data_dir=str(tmp_path), download=False)
  assert time.perf_counter() - start < 10.0
  with tfds.testing.mock_data(num_examples=24):
    family = make(dataset="fashion_mnist8", data_dir=str(tmp_path))
  assert family.dataset.name == "fashion_mnist8"


@pytest.mark.usefixtures("fresh_fmnist_cache")
def test_fashion_mnist8_without_data_fails_fast_and_clearly(tmp_path):
  start = time.perf_counter()
  with pytest.raises(datasets.DatasetUnavailableError) as info:
    datasets.load_fashion_mnist8(data_dir=str(tmp_path), download=False)
  assert time.perf_counter() - start < 10.0
  message = str(info.value)
  assert "\n" not in message
  assert "fashion_mnist8" in message and "internet" in message and "digits8" in message


# ---- ImageMLPTask ------------------------------------------------------------------------------


def test_image_mlp_task_init_scale_multiplies_kernels(digits):
  key = _key(4)
  p1 = image_mlp.ImageMLPTask(digits).init(key)
  p2 = image_mlp.ImageMLPTask(digits, init_scale=2.0).init(key)
  np.testing.assert_allclose(p2["hidden_0"]["kernel"], 2.0 * p1["hidden_0"]["kernel"])
  np.testing.assert_allclose(p2["logits"]["kernel"], 2.0 * p1["logits"]["kernel"])


def test_unknown_activation_fails_at_construction(digits):
  with pytest.raises(ValueError, match="swish"):
    image_mlp.ImageMLPTask(digits, activation="sigmoid")
  with pytest.raises(ValueError, match="relu"):
    image_mlp.ImageMLPFamily(digits, activations=("relu", "softsign"))


def test_digits_mlp_starts_at_log10_and_trains_with_adam():
  task = image_mlp.digits_mlp()
  opt = optax.adam(1e-2)

  @jax.jit
  def train(key):
    params = task.init(key)

    def step(carry, k):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, k, task.sample_batch(k, "train"))
      updates, opt_state = opt.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                       jax.random.split(key, 300))
    return params, losses

  params, losses = train(_key(0))
  assert params["hidden_0"]["kernel"].shape == (64, 32)
  assert params["logits"]["kernel"].shape == (32, 10)
  # At init the logits are small, so the loss is close to that of a uniform guess.
  assert abs(float(losses[0]) - math.log(10)) < 0.25
  train_loss = task.loss(params, None, _full_split(task.dataset, "train"))
  valid_acc = task.accuracy(params, _full_split(task.dataset, "valid"))
  assert float(train_loss) < 0.5
  assert float(valid_acc) > 0.8


# ---- ImageMLPFamily ----------------------------------------------------------------------------
# One small family and jitted functions taking the task params as (traced) arguments, so the
# tests share compilations.

_FAMILY_KW = dict(max_width=32, max_depth=2, min_width=8)


@pytest.fixture(name="family", scope="module")
def fixture_family():
  return image_mlp.ImageMLPFamily(datasets.load_digits8(), **_FAMILY_KW)


@pytest.fixture(name="sampled_task_params", scope="module")
def fixture_sampled_task_params(family):
  return jax.jit(jax.vmap(family.sample))(jax.random.split(_key(0), 512))


@pytest.fixture(name="member_fns", scope="module")
def fixture_member_fns(family):
  init = jax.jit(lambda tp, key: family.task_fn(tp).init(key))
  loss = jax.jit(lambda tp, params, batch: family.task_fn(tp).loss(params, None, batch))
  mask = jax.jit(lambda tp: family.task_fn(tp).param_mask())
  return init, loss, mask


def _fixed_params(family, width, depth, activation, init_scale=1.0):
  return {"width": jnp.int32(width), "depth": jnp.int32(depth),
          "activation": jnp.int32(family.activations.index(activation)),
          "init_scale": jnp.float32(init_scale)}


def test_family_sample_ranges(family, sampled_task_params):
  tp = sampled_task_params
  assert family.name == "image_mlp_family"
  assert tp["width"].dtype == jnp.int32 and tp["init_scale"].dtype == jnp.float32
  assert int(tp["width"].min()) == 8 and int(tp["width"].max()) == 32
  assert set(np.asarray(tp["depth"]).tolist()) == {1, 2}
  assert set(np.asarray(tp["activation"]).tolist()) == {0, 1, 2, 3}
  assert float(tp["init_scale"].min()) >= 0.5 and float(tp["init_scale"].max()) <= 2.0


def test_family_rejects_bad_ranges(digits):
  with pytest.raises(ValueError, match="min_width"):
    image_mlp.ImageMLPFamily(digits, max_width=8, min_width=16)
  with pytest.raises(ValueError, match="min_depth"):
    image_mlp.ImageMLPFamily(digits, min_depth=0)
  for batch_size in (0, -3, 2.5):  # once a ZeroDivisionError or shape error in the first loss
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
      image_mlp.ImageMLPFamily(digits, batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
      image_mlp.ImageMLPTask(digits, batch_size=batch_size)


def test_family_vmaps_init_loss_grad_with_zero_masked_grads(family, sampled_task_params):
  tp = jax.tree_util.tree_map(lambda x: x[:4], sampled_task_params)
  # The draw must exercise masking: some width < max and some skipped layer.
  assert int(tp["width"].min()) < 32 and int(tp["depth"].min()) < 2

  def one(task_params, key):
    task = family.task_fn(task_params)
    k_init, k_batch = jax.random.split(key)
    params = task.init(k_init)
    loss, grads = jax.value_and_grad(task.loss)(params, None, task.sample_batch(k_batch))
    return params, loss, grads, task.param_mask()

  params, loss, grads, mask = jax.jit(jax.vmap(one))(tp, jax.random.split(_key(1), 4))
  assert params["hidden_0"]["kernel"].shape == (4, 64, 32)
  assert params["hidden_1"]["kernel"].shape == (4, 32, 32)
  assert params["logits"]["kernel"].shape == (4, 32, 10)
  assert np.all(np.abs(np.asarray(loss) - math.log(10)) < 1.0)
  for g, p, m in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params),
                     jax.tree_util.tree_leaves(mask)):
    assert g.shape == p.shape == m.shape
    np.testing.assert_array_equal(np.where(m, 0.0, g), 0.0)  # no gradient where masked
    np.testing.assert_array_equal(np.where(m, 0.0, p), 0.0)  # padded entries start at zero
  assert np.all(np.abs(grads["hidden_0"]["kernel"]).sum(axis=(1, 2)) > 0.0)


def _slice_params(params, width, depth):
  """The params of the unmasked MLP with `hidden_sizes=(width,) * depth` inside `params`."""
  small = {"hidden_0": {"kernel": params["hidden_0"]["kernel"][:, :width],
                        "bias": params["hidden_0"]["bias"][:width]}}
  for i in range(1, depth):
    small[f"hidden_{i}"] = {"kernel": params[f"hidden_{i}"]["kernel"][:width, :width],
                            "bias": params[f"hidden_{i}"]["bias"][:width]}
  small["logits"] = {"kernel": params["logits"]["kernel"][:width],
                     "bias": params["logits"]["bias"]}
  return small


@pytest.mark.parametrize("width,depth,act", [(20, 1, "gelu"), (24, 2, "tanh"), (32, 2, "swish")])
def test_family_member_equals_unmasked_mlp(family, member_fns, width, depth, act):
  init, loss, mask = member_fns
  tp = _fixed_params(family, width, depth, act)
  params = init(tp, _key(5))
  # Garbage in every masked entry must not change the loss.
  noisy = jax.tree_util.tree_map(lambda m, p: jnp.where(m, p, 7.0), mask(tp), params)
  batch = family.task_fn(tp).sample_batch(_key(6))
  small = image_mlp.ImageMLPTask(family.dataset, hidden_sizes=(width,) * depth, activation=act)
  expected = jax.jit(small.loss)(_slice_params(params, width, depth), None, batch)
  np.testing.assert_allclose(loss(tp, params, batch), expected, rtol=1e-5)
  np.testing.assert_allclose(loss(tp, noisy, batch), expected, rtol=1e-5)


def test_family_init_uses_true_fan_in_and_init_scale(family, member_fns):
  init, _, _ = member_fns
  key = _key(7)
  full = init(_fixed_params(family, 32, 2, "relu", init_scale=1.5), key)
  narrow = init(_fixed_params(family, 8, 2, "relu", init_scale=1.0), key)
  # Same key, same shapes: the same raw draws, rescaled. Hidden-to-hidden and output kernels
  # see fan-in 8 instead of the padded 32 (factor 2); the first layer's fan-in is the image.
  np.testing.assert_allclose(narrow["hidden_1"]["kernel"][:8, :8],
                             2.0 / 1.5 * full["hidden_1"]["kernel"][:8, :8], rtol=1e-5)
  np.testing.assert_allclose(narrow["logits"]["kernel"][:8],
                             2.0 / 1.5 * full["logits"]["kernel"][:8], rtol=1e-5)
  np.testing.assert_allclose(narrow["hidden_0"]["kernel"][:, :8],
                             full["hidden_0"]["kernel"][:, :8] / 1.5, rtol=1e-5)
  # LeCun normal at the full width, times init_scale.
  np.testing.assert_allclose(np.std(full["hidden_1"]["kernel"]), 1.5 / math.sqrt(32), rtol=0.06)
  np.testing.assert_allclose(np.std(full["hidden_0"]["kernel"]), 1.5 / math.sqrt(64), rtol=0.06)
