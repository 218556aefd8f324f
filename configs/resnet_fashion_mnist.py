"""CPU-scale: quarter-width ResNet-18 (0.7M parameters) on Fashion-MNIST, Top-KAST 80/50.

About 0.6 s per step at batch 128 on 2 CPU cores; one epoch is 468 steps.
"""

import ml_collections

from configs import base


def get_config():
  config = base.get_config()
  config.task = 'image_classification'
  config.dataset = 'fashion_mnist'
  config.prepare_data = True  # prepare from Debian's files (or download) when missing
  config.image_size = 0  # 0 = the data set's own size

  config.model = ml_collections.ConfigDict(
    dict(name='resnet18', width=16, stem='small', zero_init_last_bn=True)
  )
  config.half_precision = False

  config.sparsity.backward = 0.5
  config.sparsity.exploration_l2 = 1e-4
  config.sparsity.dense_first_last = True
  config.optimizer = ml_collections.ConfigDict(
    dict(name='sgd', momentum=0.9, nesterov=True, weight_decay=1e-4, clip_norm=0.0)
  )
  config.schedule = ml_collections.ConfigDict(
    dict(name='warmup_cosine', init_lr=0.0, peak_lr=0.1, warmup_steps=50, end_lr=0.0)
  )
  config.label_smoothing = 0.1

  config.batch_size = 128  # global, over all devices and processes
  config.eval_batch_size = 400  # 25 batches of the 10000 test images; divides over 1-16 devices
  config.num_epochs = 1.0
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.log_every_steps = 50
  config.eval_every_steps = 117  # plus once at the end
  config.checkpoint_every_steps = 200
  return config
