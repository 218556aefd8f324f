"""What every experiment shares: the sparse method with its hyper-parameters, and run control.

Each config of this folder starts from `get_config` (or from a sibling that does) and sets only
what differs, as flax's examples do; any field can be overridden on the command line
(``--config.sparsity.forward=0.9``).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.data_dir = ''  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets

  config.method = 'topkast'  # or dense, ste, static, set, rigl, magnitude_pruning
  config.sparsity = ml_collections.ConfigDict(
    dict(
      forward=0.8,
      backward=0.0,
      update_every=1,  # Top-KAST refresh interval: every step, as the paper
      exploration_l2=0.0,
      distribution='uniform',
      structure='none',  # or N:M as 'n:m' (forward = 1 - n/m), blocks as 'RxC' (every method)
      # static, set, rigl, magnitude_pruning (RigL's reference defaults; fractions of training):
      mask_update_every=100,
      drop_fraction=0.3,  # set, rigl: share of the mask replaced, cosine-decayed to 0
      begin_fraction=0.0,  # magnitude_pruning: pruning starts
      end_fraction=0.75,  # set, rigl: last mask update; magnitude_pruning: target reached
    )
  )

  config.max_checkpoints = 2
  config.num_devices = 0  # 0 = every local device
  config.sync_every_step = False  # wait on every step (always so in multi-process CPU runs)
  config.seed = 0
  return config
