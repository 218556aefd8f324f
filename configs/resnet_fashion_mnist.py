"""CPU-scale: quarter-width ResNet-18 (0.7M parameters) on Fashion-MNIST, Top-KAST 80/50.

About 0.6 s per step at batch 128 on 2 CPU cores; one epoch is 468 steps.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.task = 'image_classification'
  config.dataset = 'fashion_mnist'
  config.data_dir = ''  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.prepare_data = True  # prepare from Debian's files (or download) when missing
  config.image_size = 0  # 0 = the data set's own size

  config.model = ml_collections.ConfigDict(
    dict(name='resnet18', width=16, stem='small', zero_init_last_bn=True)
  )
  config.half_precision = False

  config.method = 'topkast'  # or dense, ste, static, set, rigl, magnitude_pruning
  config.sparsity = ml_collections.ConfigDict(
    dict(
      forward=0.8,
      backward=0.5,
      update_every=1,  # Top-KAST refresh interval: every step, as the paper
      exploration_l2=1e-4,
      distribution='uniform',
      dense_first_last=True,
      # static, set, rigl, magnitude_pruning (RigL's reference defaults; fractions of training):
      mask_update_every=100,
      drop_fraction=0.3,  # set, rigl: share of the mask replaced, cosine-decayed to 0
      begin_fraction=0.0,  # magnitude_pruning: pruning starts
      end_fraction=0.75,  # set, rigl: last mask update; magnitude_pruning: target reached
    )
  )

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
  config.max_checkpoints = 2
  config.num_devices = 0  # 0 = every local device
  config.sync_every_step = False  # wait on every step (always so in multi-process CPU runs)
  config.seed = 0
  return config
