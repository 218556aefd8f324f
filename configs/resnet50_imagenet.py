"""The paper's ImageNet run: ResNet-50, Top-KAST 90/80, first conv and classifier dense.

32k steps at batch 4096 (about 102 epochs), SGD with Nesterov momentum 0.9, LR 0.1 x batch / 256
= 1.6 with a 5-epoch linear warm-up and x0.1 at epochs 30, 70 and 90, label smoothing 0.1,
L2 1e-4 (the exploration penalty on sparse kernels, weight decay on the dense ones).
Needs ImageNet prepared by TFDS (manual download): `python -m topkast_jax.data.prepare
imagenet2012`.
"""

import ml_collections

from configs import resnet_fashion_mnist


def get_config():
  config = resnet_fashion_mnist.get_config()
  config.dataset = 'imagenet2012'
  config.prepare_data = False
  config.model.update(dict(name='resnet50', width=64, stem='imagenet'))
  config.half_precision = True  # bfloat16 compute on TPU/GPU; parameters stay float32

  config.sparsity.forward = 0.9
  config.sparsity.backward = 0.8
  config.schedule = ml_collections.ConfigDict(
    dict(name='stepwise', base_lr_per_256=0.1, warmup_epochs=5, decay_epochs=(30, 70, 90))
  )

  config.batch_size = 4096
  config.eval_batch_size = 2000  # 50000 validation images in 25 batches
  config.num_epochs = 102.4  # 32k steps at batch 4096 (1,281,167 images)
  config.num_train_steps = 32000
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  config.max_checkpoints = 3
  return config
