"""The paper's enwik8 run: 24-layer Transformer-XL (d_model 1024, d_ff 3072, 8 heads), Top-KAST.

Window 768 with train memory 2304 and eval memory 5000; Adam with warm-up over 4000 steps from
1e-7 to 2e-4, then cosine decay; global-norm clip 0.25. ``get_config('small')`` gives the 69M
model (d_model 512, d_ff 1536). Fields as in the paper's appendix; batch size and steps as in
Transformer-XL's published enwik8 script (22 x 400k).
"""

import ml_collections

from configs import base


def get_config(variant: str = 'large'):
  if variant not in ('large', 'small'):
    raise ValueError(f"variant must be 'large' or 'small', got {variant!r}.")
  d_model, d_inner = (1024, 3072) if variant == 'large' else (512, 1536)
  config = base.get_config()
  config.task = 'language_modeling'
  config.dataset = 'enwik8'
  config.prepare_data = False  # `python -m topkast_jax.data.prepare enwik8`

  config.model = ml_collections.ConfigDict(
    dict(
      name='transformer_xl',
      n_layer=24,
      d_model=d_model,
      n_head=8,
      d_head=d_model // 8,
      d_inner=d_inner,
      dropout=0.15,
      dropatt=0.15,
      pre_norm=False,
      mem_len=2304,
      untie_r=True,
      cutoffs=(),  # adaptive softmax cluster boundaries; () = one plain softmax
      div_val=1,
    )
  )

  config.optimizer = ml_collections.ConfigDict(
    dict(name='adam', b1=0.9, b2=0.999, clip_norm=0.25, weight_decay=0.0)
  )
  config.schedule = ml_collections.ConfigDict(
    dict(name='warmup_cosine', init_lr=1e-7, peak_lr=2e-4, warmup_steps=4000, end_lr=0.0)
  )

  config.batch_size = 22  # rows, over all devices and processes
  config.tgt_len = 768
  config.eval_batch_size = 8
  config.eval_tgt_len = 768
  config.eval_mem_len = 5000
  config.num_train_steps = 400_000
  config.log_every_steps = 200
  config.eval_every_steps = 20_000
  config.checkpoint_every_steps = 5_000
  config.max_checkpoints = 3
  return config
