"""Helpers shared by several test modules."""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(module, *args, seed=0, **kwargs):
    """Random variables for ``module`` without compiling JAX's RNG for every parameter shape.

    ``jax.eval_shape`` gives the parameter shapes; NumPy fills them: kernels and embeddings
    N(0, 1 / fan_in), scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), so no parameter is trivial.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1].key
        if leaf == "scale":
            value = 1.0 + 0.1 * rng.normal(size=s.shape)
        elif leaf == "bias":
            value = 0.1 * rng.normal(size=s.shape)
        else:
            value = rng.normal(size=s.shape) / np.sqrt(max(1, int(np.prod(s.shape[:-1]))))
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
