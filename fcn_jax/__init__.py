"""fcn-jax: fully convolutional networks for dense prediction in JAX/Flax."""

__version__ = "0.1.0"
