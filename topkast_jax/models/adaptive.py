"""Adaptive input embeddings and adaptive softmax (Baevski & Auli 2019; Grave et al. 2017).

The vocabulary is cut at ``cutoffs`` into clusters; cluster i embeds in ``d_embed //
div_val**i`` dimensions and projects to ``d_proj``. The softmax scores the first cluster (the
shortlist) together with one token per tail cluster in a head softmax; a token of tail
cluster i gets log p(cluster i) + log p(token | cluster i). With tying, the softmax reuses the
embedding tables (and the projections where ``tie_projs`` says so), as Transformer-XL does.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT = nn.initializers.normal(0.02)
_PROJ_INIT = nn.initializers.normal(0.01)


def cluster_bounds(vocab_size: int, cutoffs: Sequence[int]) -> list[tuple[int, int]]:
  """``[(start, end)]`` per cluster; raises ValueError unless 0 < cutoffs < vocab_size rise."""
  ends = [0, *cutoffs, vocab_size]
  if any(a >= b for a, b in zip(ends, ends[1:])):
    raise ValueError(
      f'cutoffs must rise strictly inside (0, vocab_size={vocab_size}), got {list(cutoffs)}.'
    )
  return list(zip(ends, ends[1:]))


def cluster_dims(d_embed: int, n_clusters: int, div_val: int) -> list[int]:
  return [d_embed // div_val**i for i in range(n_clusters)]


class AdaptiveEmbedding(nn.Module):
  """Token ids -> vectors of size ``d_proj``, scaled by sqrt(d_proj) as in Transformer-XL."""

  vocab_size: int
  d_embed: int
  d_proj: int
  cutoffs: Sequence[int] = ()
  div_val: int = 1

  def setup(self):
    bounds = cluster_bounds(self.vocab_size, self.cutoffs)
    if self.div_val == 1:
      # One table; clusters are slices of it. A projection only if the sizes differ.
      self.tables = [self.param('table', _INIT, (self.vocab_size, self.d_embed))]
      self.projs = (
        [self.param('proj', _PROJ_INIT, (self.d_embed, self.d_proj))]
        if self.d_embed != self.d_proj
        else [None]
      )
    else:
      dims = cluster_dims(self.d_embed, len(bounds), self.div_val)
      self.tables = [
        self.param(f'table_{i}', _INIT, (end - start, d))
        for i, ((start, end), d) in enumerate(zip(bounds, dims))
      ]
      self.projs = [
        self.param(f'proj_{i}', _PROJ_INIT, (d, self.d_proj)) for i, d in enumerate(dims)
      ]

  def cluster_weights(self) -> list[tuple[jax.Array, jax.Array | None]]:
    """``(table, projection or None)`` per cluster, for tying the softmax."""
    bounds = cluster_bounds(self.vocab_size, self.cutoffs)
    if self.div_val == 1:
      return [(self.tables[0][start:end], self.projs[0]) for start, end in bounds]
    return list(zip(self.tables, self.projs))

  def __call__(self, tokens):
    bounds = cluster_bounds(self.vocab_size, self.cutoffs)
    out = jnp.zeros((*tokens.shape, self.d_proj), jnp.float32)
    for (start, end), (table, proj) in zip(bounds, self.cluster_weights()):
      inside = (tokens >= start) & (tokens < end)
      vectors = jnp.take(table, jnp.clip(tokens - start, 0, end - start - 1), axis=0)
      if proj is not None:
        vectors = vectors @ proj
      out = out + jnp.where(inside[..., None], vectors, 0.0)
    return out * self.d_proj**0.5


class AdaptiveSoftmax(nn.Module):
  """Hidden states ``[..., d_proj]`` -> log-probabilities over the whole vocabulary."""

  vocab_size: int
  d_embed: int
  d_proj: int
  cutoffs: Sequence[int] = ()
  div_val: int = 1
  tie_weight: bool = True
  tie_projs: Sequence[bool] | None = None  # per cluster; default: all but the head tied

  @nn.compact
  def __call__(self, hidden, embedding_weights=None):
    bounds = cluster_bounds(self.vocab_size, self.cutoffs)
    n_clusters = len(bounds)
    tie_projs = (
      self.tie_projs if self.tie_projs is not None else [False] + [True] * (n_clusters - 1)
    )
    if len(tie_projs) != n_clusters:
      raise ValueError(f'tie_projs needs one entry per cluster ({n_clusters}), got {tie_projs}.')
    if (self.tie_weight or any(tie_projs)) and embedding_weights is None:
      raise ValueError('a tied softmax needs the embedding weights (cluster_weights()).')
    if self.div_val == 1:
      dims = [self.d_embed] * n_clusters
    else:
      dims = cluster_dims(self.d_embed, n_clusters, self.div_val)

    logits = []
    for i, ((start, end), d) in enumerate(zip(bounds, dims)):
      if self.tie_weight:
        table = embedding_weights[i][0]
      else:
        table = self.param(f'table_{i}', _INIT, (end - start, d))
      if tie_projs[i] and embedding_weights[i][1] is not None:
        proj = embedding_weights[i][1]
      elif d != self.d_proj or self.div_val != 1:
        proj = self.param(f'proj_{i}', _PROJ_INIT, (d, self.d_proj))
      else:
        proj = None
      h = hidden @ proj.T if proj is not None else hidden
      bias = self.param(f'bias_{i}', nn.initializers.zeros, (end - start,))
      cluster_logits = h @ table.T + bias
      if i == 0 and n_clusters > 1:
        cluster_weight = self.param('cluster_weight', _INIT, (n_clusters - 1, d))
        cluster_bias = self.param('cluster_bias', nn.initializers.zeros, (n_clusters - 1,))
        cluster_logits = jnp.concatenate(
          [cluster_logits, h @ cluster_weight.T + cluster_bias], axis=-1
        )
      logits.append(cluster_logits)

    head = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
    shortlist = bounds[0][1]
    pieces = [head[..., :shortlist]]
    for i in range(1, n_clusters):
      tail = jax.nn.log_softmax(logits[i].astype(jnp.float32), axis=-1)
      pieces.append(head[..., shortlist + i - 1, None] + tail)
    return jnp.concatenate(pieces, axis=-1)
