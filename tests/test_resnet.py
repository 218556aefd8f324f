"""ResNet: parameter counts, shapes, BatchNorm in train and eval, and BatchNorm under pmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import topkast_jax
from topkast_jax.models import ResNet18, ResNet34, ResNet50, ResNet101, ResNetTiny, resnet_sparsity
from topkast_jax.sparsity import is_dense


def param_count(model, shape):
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))


# torchvision's published counts for the same architectures (convs without bias, BN scale and
# bias, classifier with bias).
@pytest.mark.parametrize(
  'model, expected',
  [(ResNet18, 11_689_512), (ResNet34, 21_797_672), (ResNet50, 25_557_032), (ResNet101, 44_549_160)],
)
def test_imagenet_parameter_counts(model, expected):
  assert param_count(model(num_classes=1000), (1, 224, 224, 3)) == expected


def test_output_shapes_and_names():
  model = ResNet50(num_classes=1000)
  out = jax.eval_shape(
    lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 224, 224, 3)))[0]
  )
  chex.assert_shape(out, (2, 1000))
  small = ResNet18(num_classes=10, stem='small', width=16)
  variables = small.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  chex.assert_shape(small.apply(variables, jnp.zeros((3, 28, 28, 1))), (3, 10))
  params = variables['params']
  assert params['stem_conv']['kernel'].shape == (3, 3, 1, 16)
  assert params['head']['kernel'].shape == (128, 10)
  assert 'proj_conv' in params['stage2_block1'] and 'proj_conv' not in params['stage1_block1']
  # Quarter width, as the CPU-scale configs use it: about 0.7M parameters.
  assert 650_000 < param_count(small, (1, 28, 28, 1)) < 750_000


def test_sparsity_helper_keeps_first_conv_and_classifier_dense():
  model = ResNetTiny(num_classes=10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  specs = topkast_jax.resolve_sparsities(params, 0.9, 0.8, sparsity=resnet_sparsity())
  paths = [topkast_jax.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  sparse = {p for p, s in zip(paths, jax.tree.leaves(specs, is_leaf=is_dense)) if not is_dense(s)}
  assert 'stem_conv/kernel' not in sparse and 'head/kernel' not in sparse
  assert 'stage1_block1/conv1/kernel' in sparse and 'stage2_block1/proj_conv/kernel' in sparse
  assert all(p.endswith('kernel') for p in sparse)


def test_zero_init_last_bn():
  model = ResNetTiny(num_classes=10, zero_init_last_bn=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  assert float(jnp.abs(params['stage1_block1']['bn2']['scale']).max()) == 0.0
  assert float(params['stage1_block1']['bn1']['scale'].min()) == 1.0


def test_batchnorm_train_vs_eval():
  model = ResNetTiny(num_classes=4)
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3)) * 3 + 1
  variables = model.init(jax.random.key(0), x)
  out_train, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  # Training normalises with batch statistics: one example's output depends on the others.
  out_train_half, _ = model.apply(variables, x[:3], train=True, mutable=['batch_stats'])
  assert not np.allclose(out_train[:3], out_train_half, atol=1e-4)
  # Running statistics moved towards the batch statistics.
  old = variables['batch_stats']['stem_bn']['mean']
  new = updates['batch_stats']['stem_bn']['mean']
  assert not np.allclose(old, new)
  # Evaluation uses running statistics: per-example, no dependence on the rest of the batch.
  out_eval = model.apply(variables, x)
  chex.assert_trees_all_close(model.apply(variables, x[:3]), out_eval[:3], atol=1e-5)


def test_batch_statistics_identical_across_replicas_under_pmap():
  n = jax.local_device_count()
  model = ResNetTiny(num_classes=4, bn_axis_name='batch')
  x = jax.random.normal(jax.random.key(2), (n * 2, 8, 8, 3)) * 2 + 0.5
  variables = model.init(jax.random.key(0), x[:1])

  def train_stats(variables, x, model=model):
    _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return updates['batch_stats']

  replicated = jax.tree.map(lambda v: jnp.broadcast_to(v, (n, *v.shape)), variables)
  stats = jax.pmap(train_stats, axis_name='batch')(replicated, x.reshape(n, 2, 8, 8, 3))
  for r in range(1, n):
    chex.assert_trees_all_equal(
      jax.tree.map(lambda s, r=r: s[r], stats), jax.tree.map(lambda s: s[0], stats)
    )
  # Averaged over devices = computed on the whole batch on one device.
  whole = train_stats(variables, x, model=ResNetTiny(num_classes=4))
  chex.assert_trees_all_close(jax.tree.map(lambda s: s[0], stats), whole, rtol=1e-4, atol=1e-5)
