"""Tests for ddpm_jax.models.unet: the DDPM UNet.

Known answers: the exact CIFAR-10 parameter count of Ho et al.; exact identity-at-init from the
zero-initialised last layers; and, when torch and diffusers are installed, numerical equality with
diffusers' ``UNet2DModel`` (additive and scale-shift residual blocks, class embedding, multi-head
attention) and ``Transformer2DModel`` (the spatial-transformer block of attention.py, here because
it shares the reference) after converting their weights with ``ddpm_jax.weights``' converter.

The kernel families: "xla" and "cpu" give the same parameters, outputs and gradients; "xla"
supports forward mode (jacfwd equals the "cpu" kernels' jacrev); "auto" traces the "cpu" kernels on
this CPU backend. Dropout keyed by the example index makes a row's training output independent of
the rest of its batch.

Several tests perturb the parameters first: the zero-initialised last convolutions make the
network output exactly zero at initialisation (and every residual block the identity on its
shortcut), so no input -- t, y, context -- could change anything until those weights move.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params

from ddpm_jax.models.attention import SpatialTransformer
from ddpm_jax.models.layers import Dropout, ResBlock
from ddpm_jax.models.text import PromptUNet, TextEncoder
from ddpm_jax.models.unet import CIFAR10_DDPM, UNet, cifar10_ddpm
from ddpm_jax.weights.diffusers import convert_state_dict
from ddpm_jax.weights.diffusers_unet import convert_unet_weights

# Tests compile many small programs; XLA's LLVM optimisation level 0 halves compile time on CPU
# and does not change what is computed.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# Tiny model used by most tests: 8x8 inputs, levels at 8 and 4, attention at 4 and in the middle.
TINY = dict(
    ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, num_groups=8
)
B, H, W, C = 2, 8, 8, 3
NUM_CLASSES = 3


def _perturb(params, seed, scale=0.05):
    """Adds N(0, scale^2) noise to every parameter (moves the zero-initialised layers).

    NumPy on the host: no per-shape XLA compilation.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape, np.float32)),
        params,
    )


def _key(seed):
    """PRNG key for model.init: 'rbg' compiles much faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


def _inputs(seed=0, batch=B, h=H, w=W, c=C):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, h, w, c))
    t = jax.random.randint(kt, (batch,), 0, 1000)
    return x, t


@pytest.fixture(scope="module")
def class_model():
    """Tiny class-conditional model, perturbed params and one jitted apply."""
    model = UNet(**TINY, num_classes=NUM_CLASSES)
    x, t = _inputs()
    y = jnp.array([0, 1])
    params = _jit(model.init)(_key(1), x, t, y)
    perturbed = _perturb(params, 2)

    def apply(p, x, t, y, train=False, seed=0):
        rngs = {"dropout": jax.random.key(seed)}
        return model.apply(p, x, t, y, train=train, rngs=rngs)

    apply = _jit(apply, static_argnames="train")
    return model, params, perturbed, apply


# ----------------------------------------------------------------------------------------------
# Known answers: parameter count, timestep embedding, identity at initialisation.


def test_cifar10_config_has_exactly_35_746_307_params():
    assert CIFAR10_DDPM == dict(
        ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
    )
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(cifar10_ddpm().init, jax.random.key(0), x, t)
    assert sum(p.size for p in jax.tree.leaves(shapes)) == 35_746_307
    # The named config composes with overrides; the label table has num_classes + 1 rows.
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(cifar10_ddpm(num_classes=10).init, jax.random.key(0), x, t, y)
    assert shapes["params"]["label_emb"]["embedding"].shape == (11, 512)
    assert sum(p.size for p in jax.tree.leaves(shapes)) == 35_746_307 + 11 * 512


@pytest.mark.slow
def test_zero_init_makes_output_zero_and_every_block_identity(class_model):
    model, params, _, apply = class_model
    x, t = _inputs()
    y = jnp.array([0, NUM_CLASSES])
    np.testing.assert_array_equal(apply(params, x, t, y), 0.0)

    kinds = ("ResBlock", "AttnBlock")

    @_jit
    def block_io(params):
        records = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                kind = type(context.module).__name__
                records["/".join(context.module.path)] = (kind, args[0], out)
            return out

        with nn.intercept_methods(interceptor):
            model.apply(params, x, t, y)
        return {p: (inp, out) for p, (kind, inp, out) in records.items() if kind in kinds}

    blocks = block_io(params)
    assert len(blocks) == 8 + 4  # ResBlocks: 2 down, 2 mid, 4 up; attention: 1 down, mid, 2 up
    identities = 0
    for path, (inp, out) in blocks.items():
        if inp.shape == out.shape:  # identity (no 1x1 shortcut needed)
            np.testing.assert_array_equal(out, inp, err_msg=path)
            identities += 1
    # The 5 ResBlocks that change the width (down_1_block_0, every up block with its skip
    # concatenation) return their 1x1 shortcut of the input.
    assert identities == 7
    for path, (inp, out) in blocks.items():
        if inp.shape != out.shape:
            shortcut = params["params"][path.split("/")[0]]["shortcut"]
            expected = inp @ shortcut["kernel"][0, 0] + shortcut["bias"]
            np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=path)


# ----------------------------------------------------------------------------------------------
# Shapes and validation.


@pytest.mark.parametrize(
    "h, w, c, ch_mult, out_channels",
    [
        (8, 8, 3, (1, 2), None),
        (16, 16, 1, (1, 2, 2), None),
        (8, 16, 4, (1, 2), 8),
        (4, 4, 2, (1,), None),
    ],
)
def test_output_shape_matches_input(h, w, c, ch_mult, out_channels):
    model = UNet(16, ch_mult, 1, (8,), num_groups=8, out_channels=out_channels)
    x, t = _inputs(h=h, w=w, c=c)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)
    out = jax.eval_shape(model.apply, params, x, t)
    assert out.shape == (B, h, w, out_channels or c) and out.dtype == jnp.float32


def test_scalar_t_is_broadcast(class_model):
    model, _, perturbed, _ = class_model
    x, _ = _inputs()
    out = jax.eval_shape(model.apply, perturbed, x, jnp.int32(5), jnp.array([0, 1]))
    assert out.shape == x.shape


def test_clear_value_errors():
    x, t = _inputs(h=8, w=10)
    model = UNet(16, (1, 2, 2), 1, (), num_groups=8)
    with pytest.raises(ValueError, match=r"resolution 8x10 .* divisible by .* = 4"):
        jax.eval_shape(model.init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match=r"num_groups=32 .* \[16, 32\]"):
        UNet(16, (1, 2), 1, ())
    with pytest.raises(ValueError, match=r"num_groups=8 .* \[12\]"):
        UNet(12, (2,), 1, (), num_groups=8)
    with pytest.raises(ValueError, match="resblock_conditioning"):
        UNet(16, (1,), 1, (), num_groups=8, resblock_conditioning="film")
    with pytest.raises(ValueError, match="dropout"):
        UNet(16, (1,), 1, (), num_groups=8, dropout=1.0)
    with pytest.raises(ValueError, match="ch_mult"):
        UNet(16, (), 1, (), num_groups=8)
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNet(16, (1,), 0, (), num_groups=8)
    with pytest.raises(
        ValueError, match=r"kernels must be one of \('auto', 'xla', 'cpu'\), got 'gpu'"
    ):
        UNet(16, (1,), 1, (), num_groups=8, kernels="gpu")
    x, t = _inputs()
    small = UNet(16, (1, 2), 1, (4,), num_groups=8, num_heads=3)
    with pytest.raises(ValueError, match="num_heads=3"):
        jax.eval_shape(small.init, jax.random.key(0), x, t)
    plain = UNet(16, (1, 2), 1, (), num_groups=8)
    with pytest.raises(ValueError, match=r"t must have shape"):
        jax.eval_shape(plain.init, jax.random.key(0), x, t[:1])
    with pytest.raises(ValueError, match=r"example_index must be int \[B\] = \(2,\)"):
        jax.eval_shape(plain.init, jax.random.key(0), x, t, example_index=jnp.arange(3))
    with pytest.raises(ValueError, match="num_classes is None"):
        jax.eval_shape(plain.init, jax.random.key(0), x, t, t)
    with pytest.raises(ValueError, match="context_dim is None"):
        jax.eval_shape(plain.init, jax.random.key(0), x, t, context=jnp.zeros((B, 4, 8)))
    with pytest.raises(ValueError, match=r"null label y = jnp.full\(\(B,\), 3\)"):
        jax.eval_shape(UNet(**TINY, num_classes=3).init, jax.random.key(0), x, t)
    with_context = UNet(16, (1, 2), 1, (), num_groups=8, context_dim=8)
    with pytest.raises(ValueError, match="context_dim=8 requires context"):
        jax.eval_shape(with_context.init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="context_dim=8"):
        jax.eval_shape(with_context.init, jax.random.key(0), x, t, context=jnp.zeros((B, 4, 6)))


def test_nchw_input_is_named_when_parameters_are_bound(class_model):
    model, params, _, _ = class_model
    x, t = _inputs()
    y = jnp.array([0, 1])
    nchw = jnp.transpose(x, (0, 3, 1, 2))  # [2, 3, 8, 8]
    with pytest.raises(ValueError, match=r"8 channels, but conv_in takes 3: .*NHWC \[B, H, W, C\]"):
        jax.eval_shape(model.apply, params, nchw, t, y)
    with pytest.raises(ValueError, match=r"was an NCHW \[B, C, H, W\] array passed\?"):
        jax.eval_shape(model.apply, params, jnp.zeros((B, 4, H, W)), t, y)
    # Without bound parameters (init) any channel count is the model's input width.
    assert jax.eval_shape(model.init, jax.random.key(0), x[..., :2], t, y)


def test_null_label_is_the_last_row_of_the_label_embedding(class_model):
    model, params, _, _ = class_model
    assert model.null_label == NUM_CLASSES
    assert params["params"]["label_emb"]["embedding"].shape[0] == model.null_label + 1
    assert UNet(**TINY).null_label is None
    assert UNet(**TINY, context_dim=8).null_label is None


# ----------------------------------------------------------------------------------------------
# Conditioning reaches the network.


def _res_block_outputs(model, params, x, t, cond, temb_gain, replace_inputs=None):
    """{path: (input, output)} of every ResBlock; optionally force each block's input.

    Every block's ``temb`` is multiplied by ``temb_gain`` (traced, so 1.0 and 0.0 share one
    compilation); 0.0 simulates a network whose residual blocks ignore the timestep.
    """
    records = {}

    def interceptor(next_fun, args, kwargs, context):
        if not (isinstance(context.module, ResBlock) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        h, temb, *rest = args
        if replace_inputs is not None:
            h = replace_inputs[path][0]
        out = next_fun(h, temb * temb_gain.astype(temb.dtype), *rest, **kwargs)
        records[path] = (h, out)
        return out

    with nn.intercept_methods(interceptor):
        model.apply(params, x, t, **cond)
    return records


def _blocks_ignoring_t(model, params, cond):
    """Checks, block by block, that a ResBlock's output for the SAME input changes with t.

    Pass 1 runs the network at t1 and records each block's input; pass 2 runs it at t2 but feeds
    every block its pass-1 input, so a difference can only come from the block's own use of t.

    Returns:
      (ResBlocks ignoring t, ResBlocks ignoring t when temb is zeroed -- the negative control).
    """
    x, _ = _inputs()
    t1, t2 = jnp.array([3, 500]), jnp.array([700, 40])

    @_jit
    def outputs(params, gain):  # both passes in one compiled function
        first = _res_block_outputs(model, params, x, t1, cond, gain)
        second = _res_block_outputs(model, params, x, t2, cond, gain, replace_inputs=first)
        return {p: (first[p][1], second[p][1]) for p in first}

    results = []
    for gain in (1.0, 0.0):
        pairs = outputs(params, jnp.float32(gain))
        assert len(pairs) == 2 * 1 + 2 + 2 * 2  # down, middle, up
        # Per example: every example of the batch must react.
        results.append(
            [
                p
                for p, (a, b) in pairs.items()
                if np.any(np.all(np.isclose(a, b, rtol=0, atol=1e-6), axis=(1, 2, 3)))
            ]
        )
    return results


def test_timestep_reaches_every_res_block(class_model):
    model, _, perturbed, _ = class_model
    ignoring, ignoring_control = _blocks_ignoring_t(model, perturbed, dict(y=jnp.array([0, 1])))
    assert ignoring == []
    assert len(ignoring_control) == 8  # the check fails for blocks that ignore t


@pytest.fixture(scope="module")
def context_model():
    """Tiny text-conditional model (FiLM residual blocks, 2 heads): shapes, random params."""
    model = UNet(**TINY, context_dim=8, num_heads=2, resblock_conditioning="scale_shift")
    x, t = _inputs()
    ctx = jax.random.normal(jax.random.key(3), (B, 5, 8))
    # Shapes only (no compiled initialiser): norm scales 1 + noise, everything else noise.
    shapes = jax.eval_shape(model.init, _key(0), x, t, context=ctx)
    ones = jax.tree_util.tree_map_with_path(
        lambda path, s: np.full(s.shape, path[-1].key == "scale", np.float32), shapes
    )
    return model, shapes, _perturb(ones, 1), ctx


def test_timestep_reaches_every_res_block_with_scale_shift(context_model):
    model, _, perturbed, ctx = context_model
    ignoring, ignoring_control = _blocks_ignoring_t(model, perturbed, dict(context=ctx))
    assert ignoring == []
    assert len(ignoring_control) == 8


def test_class_labels_and_null_label_change_output(class_model):
    _, _, perturbed, apply = class_model
    x, t = _inputs()
    x, t = jnp.concatenate([x, x]), jnp.concatenate([t, t])
    outs = [apply(perturbed, x, t, jnp.full((4,), label)) for label in range(NUM_CLASSES + 1)]
    for a in range(len(outs)):
        for b in range(a):
            assert np.abs(outs[a] - outs[b]).max() > 1e-3, (a, b)
    # Labels act per example: the same (x, t, y) gives the same output wherever it sits.
    mixed = apply(perturbed, x, t, jnp.array([0, 1, NUM_CLASSES, 2]))
    np.testing.assert_allclose(mixed[0], outs[0][0], atol=1e-5)
    np.testing.assert_allclose(mixed[2], outs[NUM_CLASSES][2], atol=1e-5)


def test_dropout_active_only_in_training(class_model):
    _, _, perturbed, apply = class_model
    x, t = _inputs()
    y = jnp.array([0, 1])
    eval_a = apply(perturbed, x, t, y)
    eval_b = apply(perturbed, x, t, y, False, 7)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(perturbed, x, t, y, True, 7)
    train_b = apply(perturbed, x, t, y, True, 8)
    np.testing.assert_array_equal(train_a, apply(perturbed, x, t, y, True, 7))
    assert np.abs(train_a - train_b).max() > 1e-4
    assert np.abs(train_a - eval_a).max() > 1e-4


def test_context_changes_output_and_uses_cross_attention(context_model):
    model, params, perturbed, ctx = context_model
    assert set(params["params"]["mid_attn"]) >= {"attn1", "attn2", "norm3", "ff_in", "proj_out"}
    assert params["params"]["mid_attn"]["attn2"]["to_k"]["kernel"].shape == (8, 32)
    x, t = _inputs()
    apply = _jit(lambda p, c: model.apply(p, x, t, context=c))
    out = apply(perturbed, ctx)
    assert np.abs(out - apply(perturbed, ctx.at[:, 2].add(1.0))).max() > 1e-3
    # Only the second example's context changed: only its output changes.
    other = apply(perturbed, ctx.at[1].add(1.0))
    np.testing.assert_allclose(other[0], out[0], atol=1e-5)
    assert np.abs(other[1] - out[1]).max() > 1e-3
    # Any context length works (attention over the M tokens).
    longer = jnp.concatenate([ctx, ctx], axis=1)
    assert jax.eval_shape(model.apply, perturbed, x, t, context=longer).shape == x.shape


# ----------------------------------------------------------------------------------------------
# Precision, jit and gradients.


def test_bfloat16_compute_close_to_float32(class_model):
    _, _, perturbed, apply = class_model
    model16 = UNet(**TINY, num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    x, t = _inputs()
    y = jnp.array([0, NUM_CLASSES])
    params16 = jax.eval_shape(model16.init, jax.random.key(1), x, t, y)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
    out16 = _jit(model16.apply)(perturbed, x, t, y)
    out32 = apply(perturbed, x, t, y)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0 < rel < 0.05, rel  # measured ~0.013


@pytest.mark.slow
def test_jit_and_grad_finite(class_model):
    model, params, perturbed, _ = class_model
    x, t = _inputs()
    y = jnp.array([1, NUM_CLASSES])

    @_jit
    def grad_fn(p, rng):
        def loss(p):
            out = model.apply(p, x, t, y, train=True, rngs={"dropout": rng})
            return jnp.mean(jnp.square(out - x))

        return jax.value_and_grad(loss)(p)

    for p in (params, perturbed):
        value, grads = grad_fn(p, jax.random.key(0))
        assert np.isfinite(value)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        assert float(jnp.abs(grads["params"]["conv_out"]["kernel"]).max()) > 0
    # With moved weights every parameter receives gradient (nothing is disconnected).
    grads = grad_fn(perturbed, jax.random.key(0))[1]
    dead = [
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if not float(jnp.abs(g).max()) > 0
    ]
    assert dead == []


# ----------------------------------------------------------------------------------------------
# Reference implementation: diffusers (skipped when torch / diffusers are not installed).


def _randomise_torch(module, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _assert_same_tree(converted, reference):
    def shapes(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}

    got, want = shapes(converted), shapes(reference)
    assert got == want, {
        k: (got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k)
    }


@pytest.mark.parametrize(
    "conditioning, num_heads, num_classes",
    [("additive", 1, None), ("scale_shift", 2, NUM_CLASSES)],
)
def test_matches_diffusers_unet2d(conditioning, num_heads, num_classes):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    block_out = (32, 64, 64)
    ref = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=C,
        out_channels=C,
        block_out_channels=block_out,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        norm_eps=1e-6,
        freq_shift=1,
        flip_sin_to_cos=False,
        downsample_padding=0,
        attention_head_dim=None if num_heads == 1 else 64 // num_heads,
        resnet_time_scale_shift="default" if conditioning == "additive" else "scale_shift",
        num_class_embeds=None if num_classes is None else num_classes + 1,
    ).eval()
    if conditioning == "scale_shift":
        # diffusers drops the GroupNorm of the middle attention in scale-shift mode (its
        # `attn_groups` quirk); improved-diffusion, like DDPM, normalises there. Put it back.
        ref.mid_block.attentions[0].group_norm = torch.nn.GroupNorm(8, 64, eps=1e-6)
    _randomise_torch(ref, 0)
    model = UNet(
        32,
        (1, 2, 2),
        1,
        (4,),
        num_heads=num_heads,
        num_groups=8,
        num_classes=num_classes,
        resblock_conditioning=conditioning,
    )
    x, t = _inputs()
    y = None if num_classes is None else jnp.array([1, num_classes])
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = convert_unet_weights(model, state, in_channels=C, height=8)
    _assert_same_tree(params, jax.eval_shape(model.init, jax.random.key(0), x, t, y))
    out = np.asarray(_jit(model.apply)(params, x, t, y))
    with torch.no_grad():
        ref_out = (
            ref(
                torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)),
                torch.tensor(np.asarray(t)),
                class_labels=None if y is None else torch.tensor(np.asarray(y)).long(),
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    scale = np.abs(ref_out).max()
    assert scale > 0.1
    np.testing.assert_allclose(out, ref_out, atol=2e-5 * scale, rtol=0)  # measured ~2e-6


def test_spatial_transformer_matches_diffusers_transformer2d():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.models.Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=32,
        num_layers=1,
        cross_attention_dim=8,
        norm_num_groups=8,
    ).eval()
    _randomise_torch(ref, 1)
    block_names = {"ff_in": "ff.net.0.proj", "ff_out": "ff.net.2", "to_out": "to_out.0"}

    def name_fn(path):  # our path -> diffusers' key; 1x1-conv projections become Dense
        *modules, leaf = (block_names.get(p, p) for p in path)
        if modules[0] not in ("norm", "proj_in", "proj_out"):
            modules.insert(0, "transformer_blocks.0")
        return ".".join([*modules, "bias" if leaf == "bias" else "weight"])

    block = SpatialTransformer(num_heads=2, num_groups=8)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 8))
    shapes = jax.eval_shape(block.init, jax.random.key(0), x, ctx)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = {"params": convert_state_dict(shapes["params"], state, name_fn=name_fn)}
    _assert_same_tree(params, shapes)
    out = np.asarray(_jit(block.apply)(params, x, ctx))
    with torch.no_grad():
        ref_out = (
            ref(
                torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)),
                encoder_hidden_states=torch.tensor(np.asarray(ctx)),
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    assert np.abs(ref_out - np.asarray(x)).max() > 0.1  # the block does something
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)  # measured ~7e-7


# ----------------------------------------------------------------------------------------------
# Kernel families: "xla" (plain XLA, forward and reverse mode) and "cpu" (custom VJPs).


def _kernels_traced(model, params, *args, **kwargs):
    """Which kernels a traced apply contains: custom VJPs, JAX's random_bits / threefry."""
    rngs = {"dropout": jax.random.key(0)}
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, *args, **kwargs, rngs=rngs))(params))
    return {name: name in jaxpr for name in ("custom_vjp_call", "random_bits", "threefry2x32")}


def test_auto_kernels_are_the_cpu_kernels_on_a_cpu_backend(class_model, monkeypatch):
    model, params, _, _ = class_model
    x, t = _inputs()
    y = jnp.array([0, 1])
    index = jnp.array([4, 5], jnp.int32)
    assert model.kernels == "auto" and jax.default_backend() == "cpu"
    traced = {
        k: _kernels_traced(model.clone(kernels=k), params, x, t, y, train=True)
        for k in ("auto", "cpu", "xla")
    }
    assert (
        traced["auto"]
        == traced["cpu"]
        == dict.fromkeys(traced["cpu"], False) | {"custom_vjp_call": True}
    )  # fused threefry: neither of JAX's random primitives
    assert traced["xla"] == {"custom_vjp_call": False, "random_bits": True, "threefry2x32": False}
    xla = model.clone(kernels="xla")
    keyed = _kernels_traced(xla, params, x, t, y, train=True, example_index=index)
    assert keyed == {"custom_vjp_call": False, "random_bits": False, "threefry2x32": True}
    # Elsewhere "auto" is plain XLA (decided at trace time).
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _kernels_traced(model, params, x, t, y, train=True) == traced["xla"]


@pytest.mark.slow
def test_xla_and_cpu_kernels_give_the_same_params_outputs_and_gradients(class_model):
    """One checkpoint serves both families: identical initial parameters; outputs and
    gradients in training mode (dropout masks keyed by example index) agree to 1e-5."""
    model, params, perturbed, _ = class_model
    x, t = _inputs()
    y = jnp.array([0, NUM_CLASSES])
    index = jnp.array([7, 3], jnp.int32)
    rng = np.random.default_rng(0)
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    # The fixture's params are those of "auto" = "cpu" on this backend.
    init = _jit(model.clone(kernels="xla").init)(_key(1), x, t, y)
    assert jax.tree.all(jax.tree.map(np.array_equal, init, params))
    results = {}
    for kernels in ("xla", "cpu"):
        m = model.clone(kernels=kernels)

        @_jit
        def value_and_grad(p, m=m):
            rngs = {"dropout": jax.random.key(5)}
            fn = lambda p: m.apply(p, x, t, y, train=True, example_index=index, rngs=rngs)
            out, vjp = jax.vjp(fn, p)
            return out, vjp(dy)[0]

        results[kernels] = value_and_grad(perturbed)
    for part, name in ((0, "output"), (1, "gradients")):
        want = jax.tree.leaves(results["cpu"][part])
        norms = [float(np.linalg.norm(w)) for w in want]
        for got, w, n in zip(jax.tree.leaves(results["xla"][part]), want, norms, strict=True):
            # Floor: the attention key bias's gradient is zero in exact arithmetic (noise).
            err = float(np.linalg.norm(got - w)) / max(n, 1e-2 * max(norms))
            assert err <= 1e-5, (name, err)


@pytest.mark.slow
def test_forward_mode_autodiff_with_xla_kernels():
    """jax.jacfwd / jax.jvp through the UNet with kernels="xla": the Jacobian equals the one of
    reverse mode through the "cpu" kernels (rows by jax.vjp), and a JVP with respect to the
    parameters in training mode satisfies <u, J v> = <J^T u, v>. The "cpu" kernels raise."""
    model = UNet(**TINY, kernels="xla")
    x, t = _inputs(batch=1, h=4, w=4)
    params = random_params(model, x, t)
    fn = lambda m: lambda x: m.apply(params, x, t)
    jac_fwd = _jit(jax.jacfwd(fn(model)))(x)
    jac_rev = _jit(jax.jacrev(fn(model.clone(kernels="cpu"))))(x)
    assert jac_fwd.shape == (*x.shape, *x.shape)
    scale = float(np.linalg.norm(jac_rev))
    assert scale > 0.1
    np.testing.assert_allclose(jac_fwd, jac_rev, atol=1e-5 * scale, rtol=0)
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(fn(model.clone(kernels="cpu")), (x,), (x,))

    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    u = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    rngs = {"dropout": jax.random.key(2)}
    train = lambda m: (
        lambda p: m.apply(p, x, t, train=True, example_index=jnp.array([9]), rngs=rngs)
    )
    jv = _jit(lambda p, v: jax.jvp(train(model), (p,), (v,))[1])(params, v)
    jtu = _jit(lambda p, u: jax.vjp(train(model.clone(kernels="cpu")), p)[1](u)[0])(params, u)
    lhs = float(jnp.vdot(u, jv))
    pairs = zip(jax.tree.leaves(jtu), jax.tree.leaves(v), strict=True)
    rhs = sum(float(jnp.vdot(a, b)) for a, b in pairs)
    assert abs(lhs - rhs) <= 1e-5 * float(jnp.linalg.norm(u) * jnp.linalg.norm(jv)), (lhs, rhs)


# ----------------------------------------------------------------------------------------------
# Dropout keyed by the example's index in the global batch.


@pytest.mark.slow
def test_example_index_makes_training_outputs_independent_of_the_batch(class_model):
    """With example_index (and one 'dropout' key), an example's training output is the same in
    any batch it sits in; without it, the masks depend on the row's position (control)."""
    model, _, perturbed, _ = class_model
    x, t = _inputs(batch=4)
    y = jnp.array([0, 1, 2, NUM_CLASSES])
    index = jnp.array([10, 11, 12, 13], jnp.int32)

    @_jit
    def train(x, t, y, index):
        rngs = {"dropout": jax.random.key(3)}
        return model.apply(perturbed, x, t, y, train=True, example_index=index, rngs=rngs)

    whole = train(x, t, y, index)
    rows = jnp.array([2, 0])  # another batch: rows 2 and 0 (e.g. on another device)
    part = train(x[rows], t[rows], y[rows], index[rows])
    np.testing.assert_allclose(part, whole[rows], atol=1e-5)
    control = _jit(
        lambda *a: model.apply(perturbed, *a, train=True, rngs={"dropout": jax.random.key(3)})
    )
    assert np.abs(control(x[rows], t[rows], y[rows]) - control(x, t, y)[rows]).max() > 1e-3
    # The index keys the masks: another index, another output.
    assert np.abs(train(x, t, y, index + 4) - whole).max() > 1e-3


def test_prompt_unet_forwards_example_index_to_every_dropout():
    unet = UNet(**TINY, context_dim=8)
    model = PromptUNet(
        unet,
        TextEncoder(vocab_size=5, max_length=3, width=8, depth=1, num_heads=2),
        ((2, 3, 0), (0, 0, 0)),
    )
    x, t = _inputs()
    index = jnp.array([5, 6], jnp.int32)
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, Dropout) and context.method_name == "__call__":
            seen.append(args[2] if len(args) > 2 else kwargs.get("example_index"))
        return next_fun(*args, **kwargs)

    variables = jax.eval_shape(model.init, jax.random.key(0), x, t, jnp.array([0, 1]))
    rngs = {"dropout": jax.random.key(1)}
    with nn.intercept_methods(interceptor):
        jax.eval_shape(
            lambda v: model.apply(v, x, t, jnp.array([0, 1]), True, index, rngs=rngs), variables
        )
        tokens = jnp.zeros((B, 3), jnp.int32)
        call = lambda v: model.apply(v, x, t, tokens, True, index, rngs=rngs, method="from_tokens")
        jax.eval_shape(call, variables)
    assert len(seen) == 2 * 8 and all(s is not None and s.shape == (B,) for s in seen)
