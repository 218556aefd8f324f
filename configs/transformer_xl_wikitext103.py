"""The paper's WikiText-103 run: 18-layer Transformer-XL with adaptive input and softmax.

d_model 1024, d_ff 4096, 16 heads, cutoffs 20000/40000/200000, div_val 4, tied head; window 512
with memory 768 (train) / 2000 (eval). Optimiser as for enwik8.
"""

from configs import transformer_xl_enwik8


def get_config():
  config = transformer_xl_enwik8.get_config()
  config.dataset = 'wikitext103'
  config.model.update(
    dict(
      n_layer=18,
      d_model=1024,
      n_head=16,
      d_head=64,
      d_inner=4096,
      dropout=0.2,
      dropatt=0.2,
      mem_len=768,
      cutoffs=(20000, 40000, 200000),
      div_val=4,
    )
  )
  config.sparsity.forward = 0.8
  config.sparsity.backward = 0.0
  config.batch_size = 64
  config.tgt_len = 512
  config.eval_tgt_len = 512
  config.eval_mem_len = 2000
  config.num_train_steps = 200_000
  return config
