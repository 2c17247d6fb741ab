"""Random model parameters for tests, drawn in NumPy from the `init_params` shapes: no initialiser to compile."""
import jax
import jax.numpy as jnp
import numpy as np

from lm import init_params


def random_params(cfg, seed=0, std=0.1):
    """Random parameters of `Transformer(cfg)`: N(0, std) everywhere (biases and every adapter, lora_b
    included, non-zero), norm scales N(1, std); std larger than the usual init makes attention far from uniform,
    so wrong positions or cache entries show up."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))

    def draw(path, s):
        noise = rng.normal(size=s.shape).astype(np.float32) * std
        is_scale = "norm" in jax.tree_util.keystr(path) and path[-1].key == "scale"
        return jnp.asarray(1.0 + noise if is_scale else noise, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
