"""CPU-scale: quarter-width ResNet-18 on CIFAR-10 (TFDS download), Top-KAST 90/80."""

from configs import resnet_fashion_mnist


def get_config():
  config = resnet_fashion_mnist.get_config()
  config.dataset = 'cifar10'
  config.prepare_data = False  # `python -m topkast_jax.data.prepare cifar10` first
  config.sparsity.forward = 0.9
  config.sparsity.backward = 0.8
  config.num_epochs = 5.0  # 390 steps an epoch at batch 128
  config.eval_every_steps = 390
  return config
