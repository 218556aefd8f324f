"""Transformer-XL (Dai et al. 2019) in Flax linen: relative attention and segment recurrence.

Each layer attends over ``[memory; segment]``, where the memory holds (without gradient) the
layer's inputs for the last ``mem_len`` positions. Attention scores are
``(q + u) k^T + (q + v) r^T`` with sinusoidal relative encodings ``r`` projected per layer
and learned biases ``u`` and ``v``. Memories are explicit inputs and outputs: the module is a
pure function ``(tokens, mems) -> (log_probs, new_mems)``.

Parameter names (``layer_{i}/attn/{q,k,v,o,r}``, ``layer_{i}/ff/{in,out}``, ``embed``,
``softmax``) let `transformer_xl_sparsity` choose the sparse matrices.
"""

import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from topkast_jax.models.adaptive import AdaptiveEmbedding, AdaptiveSoftmax

_INIT = nn.initializers.normal(0.02)


def sinusoidal_positions(klen: int, d_model: int) -> jax.Array:
  """Encodings of relative distances klen-1, ..., 0 (descending), shape ``[klen, d_model]``."""
  distances = jnp.arange(klen - 1, -1, -1, dtype=jnp.float32)
  inv_freq = 1.0 / (10000 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
  angles = distances[:, None] * inv_freq[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rel_shift(x: jax.Array) -> jax.Array:
  """Aligns scores against descending distances to query/key positions.

  ``x[..., i, p]`` scores query i against distance ``klen - 1 - p``; the result's
  ``[..., i, j]`` is the score for distance ``i + (klen - qlen) - j`` (query i at absolute
  position mlen + i, key j), for every unmasked (causal) pair. Done by padding and reshaping,
  without a gather.
  """
  *lead, qlen, klen = x.shape
  padded = jnp.concatenate([jnp.zeros((*lead, qlen, 1), x.dtype), x], axis=-1)
  padded = padded.reshape(*lead, klen + 1, qlen)
  return padded[..., 1:, :].reshape(*lead, qlen, klen)


class RelativeMultiHeadAttention(nn.Module):
  """Multi-head attention over [memory; segment] with relative positions (Dai et al., sec. 3.3)."""

  n_head: int
  d_head: int
  d_model: int
  dropout: float
  dropatt: float
  pre_norm: bool

  @nn.compact
  def __call__(self, h, pos_emb, mem, u, v, deterministic):
    batch, qlen, _ = h.shape
    mlen = mem.shape[1]
    dense = lambda name: nn.Dense(  # noqa: E731
      self.n_head * self.d_head, use_bias=False, kernel_init=_INIT, name=name
    )
    heads = lambda x: x.reshape(*x.shape[:-1], self.n_head, self.d_head)  # noqa: E731

    context = jnp.concatenate([mem, h], axis=1)
    if self.pre_norm:
      norm = nn.LayerNorm(name='norm')
      q_in, kv_in = norm(h), norm(context)
    else:
      q_in, kv_in = h, context
    q = heads(dense('q')(q_in))  # [batch, qlen, heads, d_head]
    k = heads(dense('k')(kv_in))  # [batch, klen, heads, d_head]
    value = heads(dense('v')(kv_in))
    r = heads(dense('r')(pos_emb))  # [klen, heads, d_head]

    content = jnp.einsum('bihd,bjhd->bhij', q + u, k)
    position = rel_shift(jnp.einsum('bihd,jhd->bhij', q + v, r))
    scores = (content + position) / self.d_head**0.5
    causal = jnp.arange(mlen + qlen)[None, :] <= jnp.arange(qlen)[:, None] + mlen
    scores = jnp.where(causal, scores.astype(jnp.float32), -1e30)
    probs = nn.Dropout(self.dropatt)(jax.nn.softmax(scores, axis=-1), deterministic)
    attended = jnp.einsum('bhij,bjhd->bihd', probs, value).reshape(batch, qlen, -1)
    out = nn.Dropout(self.dropout)(
      nn.Dense(self.d_model, use_bias=False, kernel_init=_INIT, name='o')(attended), deterministic
    )
    return h + out if self.pre_norm else nn.LayerNorm(name='norm')(h + out)


class PositionwiseFeedForward(nn.Module):
  d_model: int
  d_inner: int
  dropout: float
  pre_norm: bool

  @nn.compact
  def __call__(self, h, deterministic):
    x = nn.LayerNorm(name='norm')(h) if self.pre_norm else h
    x = nn.relu(nn.Dense(self.d_inner, kernel_init=_INIT, name='in')(x))
    x = nn.Dropout(self.dropout)(x, deterministic)
    x = nn.Dropout(self.dropout)(
      nn.Dense(self.d_model, kernel_init=_INIT, name='out')(x), deterministic
    )
    return h + x if self.pre_norm else nn.LayerNorm(name='norm')(h + x)


class DecoderLayer(nn.Module):
  """Relative attention then feed-forward; owns its (u, v) biases unless they are shared."""

  n_head: int
  d_head: int
  d_model: int
  d_inner: int
  dropout: float
  dropatt: float
  pre_norm: bool

  @nn.compact
  def __call__(self, h, pos_emb, mem, shared_biases, deterministic):
    if shared_biases is None:
      shape = (self.n_head, self.d_head)
      u, v = self.param('u', _INIT, shape), self.param('v', _INIT, shape)
    else:
      u, v = shared_biases
    h = RelativeMultiHeadAttention(
      self.n_head, self.d_head, self.d_model, self.dropout, self.dropatt, self.pre_norm, name='attn'
    )(h, pos_emb, mem, u, v, deterministic)
    return PositionwiseFeedForward(
      self.d_model, self.d_inner, self.dropout, self.pre_norm, name='ff'
    )(h, deterministic)


class TransformerXL(nn.Module):
  """Transformer-XL language model.

  Attributes:
    vocab_size, n_layer, d_model, n_head, d_head, d_inner: the usual sizes.
    mem_len: positions of memory kept per layer (the training and evaluation values differ in
      the paper; the memory length is whatever the input ``mems`` hold, up to this).
    dropout, dropatt: dropout on activations and on attention probabilities.
    pre_norm: layer norm before each sub-layer (plus a final one) instead of after (original).
    d_embed: embedding size before projection (default d_model).
    cutoffs, div_val: adaptive input and softmax clusters (() and 1: one tied softmax).
    tie_weight, tie_projs: share the softmax's tables and projections with the embedding.
    untie_r: one (u, v) bias pair per layer (True) or one for the whole model.
  """

  vocab_size: int
  n_layer: int
  d_model: int
  n_head: int
  d_head: int
  d_inner: int
  mem_len: int
  dropout: float = 0.1
  dropatt: float = 0.0
  pre_norm: bool = False
  d_embed: int | None = None
  cutoffs: Sequence[int] = ()
  div_val: int = 1
  tie_weight: bool = True
  tie_projs: Sequence[bool] | None = None
  untie_r: bool = True

  def init_mems(self, batch_size: int, dtype=jnp.float32) -> tuple[jax.Array, ...]:
    """Empty memories (length 0) for the first segment."""
    return tuple(jnp.zeros((batch_size, 0, self.d_model), dtype) for _ in range(self.n_layer))

  @nn.compact
  def __call__(self, tokens, mems=None, *, deterministic: bool = True):
    """Log-probabilities ``[batch, qlen, vocab]`` and the next memories.

    Args:
      tokens: int array ``[batch, qlen]``.
      mems: per layer ``[batch, mlen, d_model]`` (same mlen for all), or None for empty.
      deterministic: disable dropout (evaluation); training needs a 'dropout' rng.
    """
    if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim != 2:
      raise ValueError(
        f'tokens must be an int array [batch, qlen], got {tokens.dtype} {tokens.shape}.'
      )
    batch, qlen = tokens.shape
    mems = self.init_mems(batch) if mems is None else tuple(mems)
    if len(mems) != self.n_layer or any(
      m.shape[0] != batch or m.shape[2] != self.d_model or m.shape[1] != mems[0].shape[1]
      for m in mems
    ):
      raise ValueError(
        f'mems must be {self.n_layer} arrays [batch={batch}, mlen, '
        f'{self.d_model}] with one mlen, got {[m.shape for m in mems]}.'
      )
    mlen = mems[0].shape[1]
    d_embed = self.d_embed or self.d_model

    embed = AdaptiveEmbedding(
      self.vocab_size, d_embed, self.d_model, self.cutoffs, self.div_val, name='embed'
    )
    h = nn.Dropout(self.dropout)(embed(tokens), deterministic)
    pos_emb = nn.Dropout(self.dropout)(
      sinusoidal_positions(mlen + qlen, self.d_model), deterministic
    )
    shared_biases = None
    if not self.untie_r:
      shape = (self.n_head, self.d_head)
      shared_biases = (self.param('u', _INIT, shape), self.param('v', _INIT, shape))

    layer_inputs = []
    for i in range(self.n_layer):
      layer_inputs.append(h)
      h = DecoderLayer(
        self.n_head,
        self.d_head,
        self.d_model,
        self.d_inner,
        self.dropout,
        self.dropatt,
        self.pre_norm,
        name=f'layer_{i}',
      )(h, pos_emb, mems[i], shared_biases, deterministic)
    if self.pre_norm:
      h = nn.LayerNorm(name='final_norm')(h)
    h = nn.Dropout(self.dropout)(h, deterministic)

    new_mems = tuple(
      jax.lax.stop_gradient(
        jnp.concatenate([m, x.astype(m.dtype)], axis=1)[:, max(0, mlen + qlen - self.mem_len) :]
      )
      for m, x in zip(mems, layer_inputs)
    )
    softmax = AdaptiveSoftmax(
      self.vocab_size,
      d_embed,
      self.d_model,
      self.cutoffs,
      self.div_val,
      self.tie_weight,
      self.tie_projs,
      name='softmax',
    )
    return softmax(h, embed.cluster_weights()), new_mems


_SPARSE_KERNEL = re.compile(r'(^|/)layer_\d+/(attn/(q|k|v|o|r)|ff/(in|out))/kernel$')


def transformer_xl_sparsity():
  """Top-KAST sparsity for Transformer-XL (this project's choice; the paper does not say).

  Sparse: the attention (q, k, v, output, relative-position) and feed-forward kernels. Dense:
  embeddings and their projections, the softmax head, the u/v biases, biases and layer norms.
  """
  return lambda path, leaf: bool(_SPARSE_KERNEL.search(path))
