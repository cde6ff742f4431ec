"""Small image datasets held whole in device memory, with batches drawn by PRNG key.

Inner training steps run inside `jit`/`vmap`/`scan`, so a batch cannot come from a host
iterator: each dataset here is small enough (at most 70,000 8x8 grey images, ~4.5 MB as uint8)
to live on the device, and `sample_batch` gathers random rows by index. The same key always
gives the same batch, so a resumed run replays its data exactly.

Images are stored compactly (uint8, [N, 8, 8, 1]) and scaled to [0, 1] per batch.

Datasets by name (`load_dataset`):
  digits8: scikit-learn's 1,797 handwritten digits (8x8, values 0-16); ships with the package,
    so it works offline.
  fashion_mnist8: TFDS Fashion-MNIST (70,000 28x28 images) resized to 8x8, as in the learned
    optimizer tutorials. TFDS downloads it once, which needs internet.
"""

import dataclasses
import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

SPLITS = ("train", "valid")
IMAGE_SIZE = 8
DIGITS_VALID_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_TFDS_READ_BATCH = 10_000


class DatasetUnavailableError(RuntimeError):
  """A dataset cannot be loaded here (typically: TFDS data absent and no internet)."""


# eq=False keeps identity hashing: fields are arrays, which have no usable `==` or hash.
@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
  """A whole image-classification dataset in device memory.

  This is a constant that tasks close over, not a pytree to vmap over.

  Attributes:
    train_images: [N_train, H, W, C] uint8.
    train_labels: [N_train] int32 in [0, num_classes).
    valid_images: [N_valid, H, W, C] uint8.
    valid_labels: [N_valid] int32.
    num_classes: number of label values.
    name: registry name, e.g. "digits8".
    max_value: the largest possible stored pixel value; batches are divided by it.
  """
  train_images: jax.Array
  train_labels: jax.Array
  valid_images: jax.Array
  valid_labels: jax.Array
  num_classes: int
  name: str
  max_value: float = 255.0

  @property
  def image_shape(self):
    return tuple(self.train_images.shape[1:])

  def split(self, split: str):
    """Returns (images, labels) of `split` ("train" or "valid")."""
    if split == "train":
      return self.train_images, self.train_labels
    if split == "valid":
      return self.valid_images, self.valid_labels
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_batch(dataset: ImageDataset, key: jax.Array, batch_size: int,
                 split: str = "train") -> Dict[str, jax.Array]:
  """Draws `batch_size` examples of `split` uniformly with replacement; jit-compatible.

  Args:
    dataset: the dataset to draw from.
    key: PRNG key; the same key gives the same batch.
    batch_size: number of examples (static).
    split: "train" or "valid" (static).

  Returns:
    dict(image=float32 [B, H, W, C] in [0, 1], label=int32 [B]).
  """
  images, labels = dataset.split(split)
  idx = jax.random.randint(key, [batch_size], 0, images.shape[0])
  image = jnp.take(images, idx, axis=0).astype(jnp.float32) / dataset.max_value
  return {"image": image, "label": jnp.take(labels, idx, axis=0).astype(jnp.int32)}


def _from_numpy(name, train_images, train_labels, valid_images, valid_labels, num_classes,
                max_value) -> ImageDataset:
  return ImageDataset(
      train_images=jnp.asarray(train_images, jnp.uint8),
      train_labels=jnp.asarray(train_labels, jnp.int32),
      valid_images=jnp.asarray(valid_images, jnp.uint8),
      valid_labels=jnp.asarray(valid_labels, jnp.int32),
      num_classes=int(num_classes), name=name, max_value=float(max_value))


@functools.lru_cache(maxsize=None)
def load_digits8() -> ImageDataset:
  """scikit-learn's handwritten digits: 1,797 8x8 images, values 0-16, 10 classes.

  The split is deterministic: the first `DIGITS_VALID_FRACTION` (20%: 359 images) of a
  permutation seeded with `DIGITS_SPLIT_SEED` form "valid", the other 1,438 "train".

  Returns:
    ImageDataset with uint8 [N, 8, 8, 1] images and max_value 16.
  """
  # Imported here so that importing this module does not pull in scikit-learn.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  images = np.asarray(digits.images, np.uint8)[..., None]
  labels = np.asarray(digits.target, np.int32)
  perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
  num_valid = int(round(DIGITS_VALID_FRACTION * len(labels)))
  train, valid = perm[num_valid:], perm[:num_valid]
  return _from_numpy("digits8", images[train], labels[train], images[valid], labels[valid],
                     num_classes=10, max_value=16)


def _resize_to_uint8(images, labels):
  """tf.data map: [B, 28, 28, 1] uint8 -> [B, 8, 8, 1] uint8 by area averaging."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = tf.image.resize(images, [IMAGE_SIZE, IMAGE_SIZE], method="area")
  return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8), labels


def _to_numpy(tfds, ds):
  """Reads a resized split in bounded batches.

  Never `batch_size=-1`: under `tfds.testing.mock_data` the mocked builder has no split sizes
  and a whole-split read asks TF to reserve `sys.maxsize` elements, which aborts the process.
  """
  images, labels = [], []
  for x, y in tfds.as_numpy(ds.batch(_TFDS_READ_BATCH).map(_resize_to_uint8)):
    images.append(x)
    labels.append(y)
  return np.concatenate(images), np.concatenate(labels)


@functools.lru_cache(maxsize=None)
def load_fashion_mnist8(data_dir: Optional[str] = None, download: bool = True) -> ImageDataset:
  """TFDS Fashion-MNIST resized to 8x8 by area averaging, stored as uint8.

  "train" is TFDS's 60,000-image train split, "valid" its 10,000-image test split.

  Args:
    data_dir: TFDS data directory (None: TFDS's default, ~/tensorflow_datasets).
    download: let TFDS download and prepare the data if `data_dir` lacks it. Offline, TFDS
      retries for minutes before giving up; pass False to fail at once.

  Returns:
    ImageDataset with uint8 [N, 8, 8, 1] images and max_value 255.

  Raises:
    DatasetUnavailableError: the data is not in `data_dir` and could not be downloaded.
  """
  # TF is imported only here: meta-training on digits or quadratics should not pay for it.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # TF must not reserve accelerator memory that JAX needs; it only reads files here.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF's devices were already initialized by someone else.
    pass
  try:
    train_ds, test_ds = tfds.load("fashion_mnist", split=["train", "test"], data_dir=data_dir,
                                  download=download, as_supervised=True)
  except Exception as e:  # pylint: disable=broad-except
    cause = (str(e).splitlines() or [""])[0]
    raise DatasetUnavailableError(
        f"Cannot load dataset 'fashion_mnist8' (TFDS fashion_mnist, data_dir={data_dir}): "
        f"{type(e).__name__}: {cause} -- TFDS needs internet for its first download: run once "
        "with internet (or copy a prepared data_dir), or use dataset 'digits8' (offline).") from e
  train_images, train_labels = _to_numpy(tfds, train_ds)
  valid_images, valid_labels = _to_numpy(tfds, test_ds)
  return _from_numpy("fashion_mnist8", train_images, train_labels, valid_images, valid_labels,
                     num_classes=10, max_value=255)


DATASETS = {
    "digits8": load_digits8,
    "fashion_mnist8": load_fashion_mnist8,
}


def load_dataset(name: str, **kwargs) -> ImageDataset:
  """Loads a registered dataset by name (cached in-process); kwargs go to its loader."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
  return DATASETS[name](**kwargs)
