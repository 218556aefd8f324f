"""Image classification input pipelines on ``tfds.data_source`` and grain (no TensorFlow).

Batches are dicts ``{'image': float32 [devices, per_device, h, w, c], 'label': int32
[devices, per_device], 'mask': float32 [devices, per_device]}``.

Training: one seeded shuffle of the whole split (a new permutation each epoch), augmented with
random numbers drawn from the seed and the example's position; the global batch of step s is
positions ``[s*B, (s+1)*B)`` and process p reads and decodes only its rows
``[p*B/P, (p+1)*B/P)``, so the global batch does not depend on how many processes share it.
``train_dataset(...)[step]`` is the batch of that step (resuming needs only the step). Evaluation: process p reads a contiguous shard; every process yields the same number of
batches (so collectives stay in step) and pads with ``mask == 0``: each example counts once.
"""

from topkast_jax import extras

extras.require(__name__, 'experiments', extras.EXPERIMENTS)

import dataclasses
import math

import grain
import numpy as np
import PIL.Image


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """Per-data-set preprocessing."""

  mean: tuple[float, ...]  # per channel, on [0, 1] pixels
  std: tuple[float, ...]
  train_augment: str  # 'pad_crop_flip' (CIFAR recipe) or 'inception_crop_flip' (ImageNet)
  image_size: int  # side of the output
  eval_resize: int | None = None  # resize the shorter side to this, then center-crop (ImageNet)
  pad: int = 4  # for 'pad_crop_flip'


SPECS = {
  'fashion_mnist': ImageSpec((0.2860,), (0.3530,), 'pad_crop_flip', 28, pad=2),
  'cifar10': ImageSpec((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 'pad_crop_flip', 32),
  'imagenet2012': ImageSpec(
    (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 'inception_crop_flip', 224, eval_resize=256
  ),
}


def _normalise(image: np.ndarray, spec: ImageSpec) -> np.ndarray:
  image = image.astype(np.float32) / 255.0
  return (image - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  squeeze = image.shape[-1] == 1
  pil = PIL.Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((width, height), PIL.Image.BILINEAR))
  return out[..., None] if squeeze else out


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
  """Zero-pad by ``pad``, take a random crop of the original size, flip half the time."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  out = padded[top : top + h, left : left + w]
  return out[:, ::-1] if rng.random() < 0.5 else out


def inception_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """Random-resized crop (area 8-100%, aspect 3/4-4/3; Szegedy et al. 2015), flip."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < crop_w <= w and 0 < crop_h <= h:
      top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
      break
  else:  # fall back to a central crop of the whole image
    crop_h = crop_w = min(h, w)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
  out = _resize(image[top : top + crop_h, left : left + crop_w], size, size)
  return out[:, ::-1] if rng.random() < 0.5 else out


def center_crop(image: np.ndarray, resize: int | None, size: int) -> np.ndarray:
  """Resize the shorter side to ``resize`` (if given), then take the central ``size`` square."""
  if resize is not None:
    h, w = image.shape[:2]
    scale = resize / min(h, w)
    image = _resize(image, max(size, round(h * scale)), max(size, round(w * scale)))
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top : top + size, left : left + size]


def preprocess_train(example, rng: np.random.Generator, spec: ImageSpec):
  image = np.asarray(example['image'])
  if spec.train_augment == 'pad_crop_flip':
    image = pad_crop_flip(image, rng, spec.pad)
  elif spec.train_augment == 'inception_crop_flip':
    image = inception_crop_flip(image, rng, spec.image_size)
  else:
    raise ValueError(f'unknown train_augment {spec.train_augment!r}.')
  return {
    'image': _normalise(image, spec),
    'label': np.int32(example['label']),
    'mask': np.float32(1.0),
  }


def preprocess_eval(example, spec: ImageSpec):
  image = center_crop(np.asarray(example['image']), spec.eval_resize, spec.image_size)
  return {
    'image': _normalise(image, spec),
    'label': np.int32(example['label']),
    'mask': np.float32(1.0),
  }


def _per_device(batch, num_devices):
  return {
    k: v.reshape(num_devices, v.shape[0] // num_devices, *v.shape[1:]) for k, v in batch.items()
  }


def _check_batch(global_batch_size, num_devices, process_count):
  if global_batch_size % (num_devices * process_count):
    raise ValueError(
      f'global_batch_size ({global_batch_size}) must divide evenly over '
      f'{process_count} processes x {num_devices} devices.'
    )
  return global_batch_size // process_count


def train_dataset(
  source,
  spec: ImageSpec,
  *,
  global_batch_size: int,
  seed: int,
  num_devices: int = 1,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """Infinite, shuffled, augmented training batches; ``dataset[step]`` is step's batch."""
  local_batch = _check_batch(global_batch_size, num_devices, process_count)
  if len(source) < global_batch_size:
    raise ValueError(
      f'the split holds {len(source)} examples, fewer than one batch of {global_batch_size}.'
    )
  # Batches of local_batch consecutive positions; step s of process p is batch s * P + p.
  return (
    grain.MapDataset.source(source)
    .seed(seed)
    .shuffle()
    .repeat()
    .random_map(lambda example, rng: preprocess_train(example, rng, spec))
    .batch(local_batch, drop_remainder=True)[process_index::process_count]
    .map(lambda batch: _per_device(batch, num_devices))
  )


def eval_batches(
  source,
  spec: ImageSpec,
  *,
  global_batch_size: int,
  num_devices: int = 1,
  process_index: int = 0,
  process_count: int = 1,
):
  """One exact pass: yields padded, masked batches; same count on every process."""
  local_batch = _check_batch(global_batch_size, num_devices, process_count)
  n = len(source)
  bounds = [n * p // process_count for p in range(process_count + 1)]
  start, end = bounds[process_index], bounds[process_index + 1]
  largest = max(b - a for a, b in zip(bounds, bounds[1:]))
  shard = grain.MapDataset.source(source)[start:end].map(
    lambda example: preprocess_eval(example, spec)
  )
  for b in range(math.ceil(largest / local_batch)):
    examples = [shard[i] for i in range(b * local_batch, min((b + 1) * local_batch, len(shard)))]
    if examples:
      batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    else:
      sample = preprocess_eval(source[0], spec)
      batch = {k: np.zeros((0, *np.shape(v)), np.asarray(v).dtype) for k, v in sample.items()}
    missing = local_batch - len(examples)
    if missing:
      batch = {
        k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
      }
    yield _per_device(batch, num_devices)
