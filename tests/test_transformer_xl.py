"""Transformer-XL: relative shift, causality, recurrence, adaptive softmax, parameter counts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import topkast_jax
from topkast_jax.models import (
  AdaptiveEmbedding,
  AdaptiveSoftmax,
  TransformerXL,
  rel_shift,
  transformer_xl_sparsity,
)
from topkast_jax.sparsity import is_dense

TINY = dict(
  vocab_size=40, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, dropout=0.1, dropatt=0.1
)
ADAPTIVE = dict(TINY, vocab_size=100, cutoffs=(10, 30, 60), div_val=2)


def tokens(seed, shape, vocab):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_rel_shift_matches_index_formula():
  qlen, klen = 4, 7
  x = jnp.arange(2 * qlen * klen, dtype=jnp.float32).reshape(2, qlen, klen)
  shifted = np.asarray(rel_shift(x))
  mlen = klen - qlen
  for i in range(qlen):
    for j in range(i + mlen + 1):  # every key a causal query may see
      distance = i + mlen - j
      np.testing.assert_array_equal(shifted[:, i, j], np.asarray(x)[:, i, klen - 1 - distance])


@pytest.mark.parametrize(
  'config', [TINY, dict(TINY, pre_norm=True), ADAPTIVE], ids=['post_norm', 'pre_norm', 'adaptive']
)
def test_causal(config):
  model = TransformerXL(mem_len=8, **config)
  x = tokens(0, (2, 8), config['vocab_size'])
  variables = model.init(jax.random.key(0), x)
  mems = model.apply(variables, tokens(1, (2, 8), config['vocab_size']))[1]
  for t in (3, 7):
    changed = x.at[:, t].set((x[:, t] + 1) % config['vocab_size'])
    for m in (None, mems):
      before, _ = model.apply(variables, x, m)
      after, _ = model.apply(variables, changed, m)
      np.testing.assert_array_equal(before[:, :t], after[:, :t])
      assert not np.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize(
  'config',
  [TINY, dict(TINY, pre_norm=True, untie_r=False), ADAPTIVE],
  ids=['post_norm', 'pre_norm_shared_biases', 'adaptive'],
)
def test_recurrence_equals_one_pass_over_both_segments(config):
  seg = 6
  model = TransformerXL(mem_len=seg, **config)
  both = tokens(2, (3, 2 * seg), config['vocab_size'])
  variables = model.init(jax.random.key(1), both)
  first, mems = model.apply(variables, both[:, :seg])
  second, _ = model.apply(variables, both[:, seg:], mems)
  whole, _ = model.apply(variables, both)
  chex.assert_trees_all_close(first, whole[:, :seg], atol=1e-5)
  chex.assert_trees_all_close(second, whole[:, seg:], atol=1e-5)


def test_memory_length_and_no_gradient_into_memory():
  model = TransformerXL(mem_len=5, **TINY)
  x = tokens(3, (2, 4), TINY['vocab_size'])
  variables = model.init(jax.random.key(0), x)
  _, mems = model.apply(variables, x)
  assert [m.shape for m in mems] == [(2, 4, 16)] * 2
  _, mems = model.apply(variables, x, mems)
  assert [m.shape for m in mems] == [(2, 5, 16)] * 2  # capped at mem_len

  def memory_sum(params):
    return sum(jnp.sum(m) for m in model.apply({'params': params}, x, mems)[1])

  grads = jax.grad(memory_sum)(variables['params'])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_dropout_only_in_training():
  model = TransformerXL(mem_len=4, **TINY)
  x = tokens(4, (2, 4), TINY['vocab_size'])
  variables = model.init(jax.random.key(0), x)
  eval_out, _ = model.apply(variables, x)
  train_out, _ = model.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(5)})
  assert not np.allclose(eval_out, train_out)


def test_adaptive_softmax_normalised_and_single_cluster_is_plain_softmax():
  hidden = jax.random.normal(jax.random.key(0), (3, 5, 16))
  embed = AdaptiveEmbedding(100, 16, 16, cutoffs=(10, 30, 60), div_val=2)
  softmax = AdaptiveSoftmax(100, 16, 16, cutoffs=(10, 30, 60), div_val=2)
  ids = jnp.zeros((1, 1), jnp.int32)
  e_vars = embed.init(jax.random.key(1), ids)
  weights = embed.apply(e_vars, method=embed.cluster_weights)
  s_vars = softmax.init(jax.random.key(2), hidden, weights)
  log_probs = softmax.apply(s_vars, hidden, weights)
  chex.assert_shape(log_probs, (3, 5, 100))
  chex.assert_trees_all_close(jnp.exp(log_probs).sum(-1), jnp.ones((3, 5)), atol=1e-5)

  plain_embed = AdaptiveEmbedding(100, 16, 16)
  plain = AdaptiveSoftmax(100, 16, 16)
  p_weights = plain_embed.apply(
    plain_embed.init(jax.random.key(1), ids), method=plain_embed.cluster_weights
  )
  p_vars = plain.init(jax.random.key(2), hidden, p_weights)
  p_vars = jax.tree.map(lambda b: b + 0.1, p_vars)  # a non-zero bias
  table = p_weights[0][0]
  expected = jax.nn.log_softmax(hidden @ table.T + p_vars['params']['bias_0'], axis=-1)
  chex.assert_trees_all_close(plain.apply(p_vars, hidden, p_weights), expected, atol=1e-5)


def test_adaptive_embedding_routes_tokens_to_clusters():
  embed = AdaptiveEmbedding(100, 16, 8, cutoffs=(10, 30, 60), div_val=2)
  ids = jnp.array([[0, 9, 10, 29, 30, 59, 60, 99]])
  variables = embed.init(jax.random.key(0), ids)
  out = embed.apply(variables, ids)
  p = variables['params']
  for position, (cluster, start) in enumerate(
    [(0, 0), (0, 0), (1, 10), (1, 10), (2, 30), (2, 30), (3, 60), (3, 60)]
  ):
    row = p[f'table_{cluster}'][int(ids[0, position]) - start]
    expected = row @ p[f'proj_{cluster}'] * 8**0.5
    np.testing.assert_allclose(out[0, position], expected, rtol=1e-5, atol=1e-6)


def layer_params(d, heads, d_head, d_inner):
  attn = 4 * d * heads * d_head + heads * d_head * d + 2 * heads * d_head + 2 * d
  return attn + (d * d_inner + d_inner + d_inner * d + d) + 2 * d


def adaptive_params(vocab, d, cutoffs, div_val):
  ends = [0, *cutoffs, vocab]
  dims = [d // div_val**i for i in range(len(ends) - 1)]
  sizes = [b - a for a, b in zip(ends, ends[1:])]
  embed = sum(v * e for v, e in zip(sizes, dims)) + sum(e * d for e in dims)
  n_tail = len(cutoffs)
  softmax = vocab + n_tail * dims[0] + n_tail + dims[0] * d  # biases, clusters, untied proj_0
  return embed + softmax


# The paper's models (Dai et al. 2019 report 277M for enwik8 and 285M for WikiText-103; the
# Top-KAST paper's small enwik8 model has 69M).
PAPER_MODELS = {
  'enwik8': (
    dict(vocab_size=256, n_layer=24, d_model=1024, n_head=8, d_head=128, d_inner=3072),
    277e6,
  ),
  'enwik8_small': (
    dict(vocab_size=256, n_layer=24, d_model=512, n_head=8, d_head=64, d_inner=1536),
    69e6,
  ),
  'wikitext103': (
    dict(
      vocab_size=267_735,
      n_layer=18,
      d_model=1024,
      n_head=16,
      d_head=64,
      d_inner=4096,
      cutoffs=(20_000, 40_000, 200_000),
      div_val=4,
    ),
    285e6,
  ),
}
EXPECTED_COUNTS = {'enwik8': 277_332_224, 'enwik8_small': 69_460_224, 'wikitext103': 285_205_322}


@pytest.mark.parametrize('name', sorted(PAPER_MODELS))
def test_paper_parameter_counts(name):
  config, published = PAPER_MODELS[name]
  model = TransformerXL(mem_len=4, **config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  layers = config['n_layer'] * layer_params(
    config['d_model'], config['n_head'], config['d_head'], config['d_inner']
  )
  if 'cutoffs' in config:
    heads = adaptive_params(
      config['vocab_size'], config['d_model'], config['cutoffs'], config['div_val']
    )
  else:
    heads = config['vocab_size'] * config['d_model'] + config['vocab_size']  # tied + bias
  assert count == layers + heads == EXPECTED_COUNTS[name]
  assert abs(count - published) / published < 0.01


def test_sparsity_helper_selects_attention_and_feed_forward_kernels():
  model = TransformerXL(mem_len=4, **ADAPTIVE)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  specs = topkast_jax.resolve_sparsities(params, 0.9, 0.8, sparsity=transformer_xl_sparsity())
  paths = [topkast_jax.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  sparse = sorted(
    p for p, s in zip(paths, jax.tree.leaves(specs, is_leaf=is_dense)) if not is_dense(s)
  )
  expected = sorted(
    f'layer_{i}/{m}/kernel'
    for i in range(2)
    for m in ('attn/q', 'attn/k', 'attn/v', 'attn/o', 'attn/r', 'ff/in', 'ff/out')
  )
  assert sparse == expected


def test_bad_input():
  model = TransformerXL(mem_len=4, **TINY)
  x = tokens(0, (2, 4), TINY['vocab_size'])
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='mems must be 2 arrays'):
    model.apply(variables, x, (jnp.zeros((2, 3, 16)),))
  with pytest.raises(ValueError, match='tokens must be an int array'):
    model.apply(variables, x.astype(jnp.float32))
  with pytest.raises(ValueError, match='cutoffs must rise strictly'):
    TransformerXL(mem_len=4, **dict(TINY, cutoffs=(30, 20))).init(jax.random.key(0), x)


def test_attention_matches_explicit_relative_distances():
  """The module against a direct loop over (query, key) pairs with explicit distances."""
  from topkast_jax.models.transformer_xl import RelativeMultiHeadAttention, sinusoidal_positions

  heads, d_head, d_model, qlen, mlen = 2, 4, 8, 3, 2
  klen = qlen + mlen
  attn = RelativeMultiHeadAttention(heads, d_head, d_model, 0.0, 0.0, pre_norm=True)
  rng = np.random.default_rng(0)
  h, mem = rng.standard_normal((1, qlen, d_model)), rng.standard_normal((1, mlen, d_model))
  u, v = rng.standard_normal((heads, d_head)), rng.standard_normal((heads, d_head))
  pos = sinusoidal_positions(klen, d_model)
  variables = attn.init(jax.random.key(0), h, pos, mem, u, v, True)
  out = np.asarray(attn.apply(variables, h, pos, mem, u, v, True))

  p = jax.tree.map(np.asarray, variables['params'])
  ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)  # noqa: E731
  context = np.concatenate([mem, h], axis=1)[0]
  q = (ln(h[0]) @ p['q']['kernel']).reshape(qlen, heads, d_head)
  k = (ln(context) @ p['k']['kernel']).reshape(klen, heads, d_head)
  val = (ln(context) @ p['v']['kernel']).reshape(klen, heads, d_head)
  # Encoding of distance d: row klen - 1 - d of the descending table.
  r = (np.asarray(pos) @ p['r']['kernel']).reshape(klen, heads, d_head)
  expected = np.zeros((qlen, heads * d_head))
  for i in range(qlen):
    for n in range(heads):
      scores = np.full(klen, -np.inf)
      for j in range(mlen + i + 1):
        distance = mlen + i - j
        scores[j] = (q[i, n] + u[n]) @ k[j, n] + (q[i, n] + v[n]) @ r[klen - 1 - distance, n]
      probs = np.exp((scores - scores.max()) / np.sqrt(d_head))
      probs /= probs.sum()
      expected[i, n * d_head : (n + 1) * d_head] = probs @ val[:, n]
  expected = h[0] + expected @ p['o']['kernel']
  np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-5)
