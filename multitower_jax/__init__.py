"""multitower_jax: a multi-tower CTR/CVR model for search and retail-media ads in JAX/Flax."""

__version__ = "0.1.0"
