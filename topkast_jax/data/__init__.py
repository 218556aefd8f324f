"""Input data for topkast_jax experiments."""
