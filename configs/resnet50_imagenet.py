"""The paper's ImageNet run: ResNet-50, Top-KAST 90/80, first conv and classifier dense.

32k steps at batch 4096 (about 102 epochs), SGD with Nesterov momentum 0.9, LR 0.1 x batch / 256
= 1.6 with a 5-epoch linear warm-up and x0.1 at epochs 30, 70 and 90, label smoothing 0.1,
L2 1e-4 (the exploration penalty on sparse kernels, weight decay on the dense ones).
Needs ImageNet prepared by TFDS (manual download): `python -m topkast_jax.data.prepare
imagenet2012`.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.task = 'image_classification'
  config.dataset = 'imagenet2012'
  config.data_dir = ''
  config.prepare_data = False
  config.image_size = 0  # 224

  config.model = ml_collections.ConfigDict(
    dict(name='resnet50', width=64, stem='imagenet', zero_init_last_bn=True)
  )
  config.half_precision = True  # bfloat16 compute on TPU/GPU; parameters stay float32

  config.method = 'topkast'  # or dense, ste, static, set, rigl, magnitude_pruning
  config.sparsity = ml_collections.ConfigDict(
    dict(
      forward=0.9,
      backward=0.8,
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
    dict(name='stepwise', base_lr_per_256=0.1, warmup_epochs=5, decay_epochs=(30, 70, 90))
  )
  config.label_smoothing = 0.1

  config.batch_size = 4096
  config.eval_batch_size = 2000  # 50000 validation images in 25 batches
  config.num_epochs = 102.4  # 32k steps at batch 4096 (1,281,167 images)
  config.num_train_steps = 32000
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  config.max_checkpoints = 3
  config.num_devices = 0
  config.sync_every_step = False  # wait on every step (always so in multi-process CPU runs)
  config.seed = 0
  return config
