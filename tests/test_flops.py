"""experiments/flops.py: the jaxpr FLOP counter against closed forms, and the closed-form model
FLOPs of the DDPM UNet against the jaxpr count of the network as implemented."""

import jax
import jax.numpy as jnp
import pytest

from ddpm_jax.models.unet import CIFAR10_DDPM, UNet
from experiments import flops

# name -> (UNet fields, image shape, FLOPs of the upsampling convolutions in textbook form).
# "small" upsamples twice, 64 channels each: to 16x16 and to 32x32, batch 3.
MODELS = {
    "tiny": (dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4), 8, 0),
    "small": (
        dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=16),
        32,
        2 * 3 * 9 * (16**2 + 32**2) * 64**2,
    ),
    "small_film_2heads_wide": (
        dict(
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=2,
            attn_resolutions=(8,),
            num_groups=8,
            num_heads=2,
            resblock_conditioning="scale_shift",
        ),
        (8, 16),
        2 * 3 * 9 * (8 * 16) * 32**2,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_closed_form_equals_the_jaxpr_count_up_to_the_upsampling(name):
    """The closed form of the architecture equals the count of the network's jaxpr, except for
    the upsampling convolutions, which the network computes with 4/9 of the multiply-adds
    (ops.upsample_conv)."""
    fields, size, upsample = MODELS[name]
    shape = (*size, 3) if isinstance(size, tuple) else (size, size, 3)
    model = UNet(**fields)
    variables = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,), jnp.int32)
    )
    nominal = flops.unet_forward_flops(fields, shape, 3)
    counted = flops.forward_flops(model, variables, shape, 3)
    assert counted == pytest.approx(nominal - upsample * (1 - 4 / 9))


def test_cifar10_model_flops():
    """The DDPM CIFAR-10 UNet: ~12.4 GFLOP per image forward (597 GFLOP per training step of 16
    in the README), linear in the batch."""
    one = flops.unet_forward_flops(CIFAR10_DDPM, (32, 32, 3), 1)
    assert 3 * 16 * one / 1e9 == pytest.approx(597, rel=0.005)
    assert flops.unet_forward_flops(CIFAR10_DDPM, (32, 32, 3), 128) == pytest.approx(128 * one)


def test_jaxpr_flop_count_matches_closed_forms():
    """Convolutions and dots counted from the jaxpr, nested calls included."""
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
    a = jax.ShapeDtypeStruct((4, 6), jnp.float32)
    b = jax.ShapeDtypeStruct((6, 7), jnp.float32)

    def f(x, w, a, b):
        y = jax.lax.conv_general_dilated(
            x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y, jax.jit(jnp.dot)(a, b)  # a nested call is counted too

    jaxpr = jax.make_jaxpr(f)(x, w, a, b)
    conv = 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)  # 2 x outputs x (window x input channels)
    assert flops.jaxpr_matmul_flops(jaxpr.jaxpr) == conv + 2 * 4 * 7 * 6


def test_xla_flops_of_a_compiled_matmul():
    compiled = jax.jit(jnp.dot).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
    assert flops.xla_flops(compiled) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)
