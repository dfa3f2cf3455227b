"""FLOPs of the DDPM UNet and of compiled programs, counted three ways for the benchmark.

- :func:`unet_forward_flops`: the *model FLOPs* of one forward pass, in closed form from the UNet's
  configuration (``config.model`` or a dict of the same fields): every convolution, dense layer
  and attention product of the DDPM architecture in its textbook form (a 3x3 convolution of the
  2x upsampled image, separate q / k / v maps). 3x this is the training step's model FLOPs, the
  numerator of the usual "MFU".
- :func:`forward_flops`: the convolution and matmul FLOPs of the network as implemented, counted
  from the jaxpr of its forward pass (:func:`jaxpr_matmul_flops`). It equals the closed form
  except for the upsampling convolutions, which the CPU kernels of ``ops.upsample_conv`` compute
  with 4/9 of the textbook multiply-adds.
- :func:`xla_flops`: XLA's cost analysis of a compiled executable (XLA also skips padding taps
  and adds elementwise work).

FLOPs are 2 x multiply-adds throughout.

Example:
    >>> model_gflop = 3 * unet_forward_flops(config.model, (32, 32, 3), batch=128) / 1e9
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def _eqn_flops(eqn) -> float:
    """2 x multiply-adds of a convolution or dot_general equation, else 0."""
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out = eqn.outvars[0].aval
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) positions
        window = np.prod([rhs.shape[i] for i in rhs_spec[2:]])
        in_features = rhs.shape[rhs_spec[1]]
        return 2.0 * np.prod(out.shape) * window * in_features
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        out = eqn.outvars[0].aval
        return 2.0 * np.prod(out.shape) * np.prod([lhs.shape[i] for i in lhs_contract])
    return 0.0


def _sub_jaxprs(value) -> Iterator[jex_core.Jaxpr]:
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_matmul_flops(jaxpr: jex_core.Jaxpr) -> float:
    """FLOPs of every convolution and dot_general in a jaxpr, nested calls included.

    Scan and while bodies are counted once: use it on straight-line functions such as a forward
    pass.

    Args:
      jaxpr: e.g. ``jax.make_jaxpr(f)(*args).jaxpr``.

    Returns:
      2 x the multiply-adds of its convolutions and matrix products.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                total += jaxpr_matmul_flops(sub)
    return total


def forward_flops(
    model: nn.Module, variables: Any, image_shape: Sequence[int], batch: int
) -> float:
    """Convolution + matmul FLOPs of one forward pass of ``model``, counted from its jaxpr.

    Args:
      model: a UNet (``model.apply(variables, x, t, y=None)``; labels when ``null_label`` is set).
      variables: its variables, arrays or ``jax.ShapeDtypeStruct`` (nothing is computed).
      image_shape: ``(H, W, C)``.
      batch: B.
    """
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    y = None if getattr(model, "null_label", None) is None else t

    def forward(v, x, t, y):
        return model.apply(v, x, t, y=y)

    return jaxpr_matmul_flops(jax.make_jaxpr(forward)(variables, x, t, y).jaxpr)


def unet_forward_flops(m: Mapping[str, Any], image_shape: Sequence[int], batch: int) -> float:
    """Model FLOPs of one forward pass of the DDPM UNet, from its configuration alone.

    Args:
      m: the UNet's fields ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions`` and
        optionally ``resblock_conditioning`` (``config.model``, or a dict such as
        ``ddpm_jax.models.unet.CIFAR10_DDPM``); no text conditioning.
      image_shape: ``(H, W, C)``; the output has C channels too.
      batch: B.

    Returns:
      2 x the multiply-adds of every convolution, dense layer and attention product in its
      textbook form (see the module docstring).
    """
    ch, mult = m["ch"], tuple(m["ch_mult"])
    nres, attn_res = m["num_res_blocks"], tuple(m["attn_resolutions"])
    film = 2 if m.get("resblock_conditioning", "additive") == "scale_shift" else 1
    temb = 4 * ch
    height, width, channels = image_shape

    def conv(h, w, cin, cout, k=3):
        return 2.0 * batch * h * w * k * k * cin * cout

    def res_block(h, w, cin, cout):
        f = conv(h, w, cin, cout) + conv(h, w, cout, cout) + 2.0 * batch * temb * cout * film
        return f + (conv(h, w, cin, cout, k=1) if cin != cout else 0.0)

    def attn(h, w, c):  # q, k, v, out projections; q k^T and attention-weighted v
        tokens = h * w
        return 4 * 2.0 * batch * tokens * c * c + 2 * 2.0 * batch * tokens * tokens * c

    total = 2.0 * batch * (ch * temb + temb * temb) + conv(height, width, channels, ch)
    skips, h, w, c = [ch], height, width, ch
    for i, k in enumerate(mult):
        for _ in range(nres):
            total += res_block(h, w, c, ch * k)
            c = ch * k
            total += attn(h, w, c) if h in attn_res else 0.0
            skips.append(c)
        if i != len(mult) - 1:
            h, w = h // 2, w // 2
            total += conv(h, w, c, c)  # stride 2: at the output resolution
            skips.append(c)
    total += 2 * res_block(h, w, c, c) + attn(h, w, c)
    for i in reversed(range(len(mult))):
        for _ in range(nres + 1):
            total += res_block(h, w, c + skips.pop(), ch * mult[i])
            c = ch * mult[i]
            total += attn(h, w, c) if h in attn_res else 0.0
        if i != 0:
            h, w = 2 * h, 2 * w
            total += conv(h, w, c, c)  # after nearest-neighbour upsampling
    return total + conv(height, width, ch, channels)


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled executable from XLA's cost analysis (None if absent).

    A ``lax.scan``'s body is counted once; a program mapped over devices is counted per device.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


__all__ = ["forward_flops", "jaxpr_matmul_flops", "unet_forward_flops", "xla_flops"]
