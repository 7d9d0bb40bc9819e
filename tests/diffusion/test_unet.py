"""UNet: the named architecture's size, shapes, class conditioning, config serialisation and the folded upsampling."""
import json

import pytest
import torch
import torch.nn.functional as F

from diffusion.unet import (UNET_CONFIGS, ResBlock, UNet, UNetConfig, Upsample, count_parameters,
                           set_upsample_folding)

from diffusion_testlib import TINY_UNET, make_tiny_unet


def test_ddpm_cifar10_has_35_7M_parameters():
    # Ho et al. 2020's CIFAR-10 model has 35.7M parameters; ours adds an 11 x 512 class embedding
    # (5,632 parameters), which must not change the rounded figure.  Built on the meta device: no memory.
    with torch.device("meta"):
        model = UNet(UNET_CONFIGS["ddpm-cifar10"])
    n = count_parameters(model)
    assert 35_700_000 <= n < 35_800_000, n
    assert model.class_emb.weight.numel() == 11 * 512


def test_named_configs_are_valid():
    for name, cfg in UNET_CONFIGS.items():
        assert UNetConfig.from_dict(cfg.to_dict()) == cfg, name
        with torch.device("meta"):
            UNet(cfg)


def test_output_shape_equals_input_shape(tiny_unet):
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 1, 500, 999])
    y = torch.tensor([0, 1, 2, 3])  # 3 = null class
    out = tiny_unet(x, t, y)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_other_sizes_and_channels():
    cfg = UNetConfig(image_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attn_resolutions=(8,), dropout=0.0, num_classes=2)
    model = make_tiny_unet(config=cfg)
    x = torch.randn(2, 1, 16, 16)
    assert model(x, torch.tensor([3, 4]), torch.tensor([0, 2])).shape == x.shape


def test_null_class_row(tiny_unet):
    assert tiny_unet.null_class == TINY_UNET.num_classes
    assert tiny_unet.class_emb.num_embeddings == TINY_UNET.num_classes + 1
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    tiny_unet(x, t, torch.tensor([tiny_unet.null_class]))  # the null label is a valid input
    with pytest.raises(IndexError):
        tiny_unet(x, t, torch.tensor([tiny_unet.null_class + 1]))


def test_class_label_changes_output(tiny_unet):
    x = torch.randn(1, 3, 8, 8).expand(4, -1, -1, -1)
    t = torch.full((4,), 100)
    out = tiny_unet(x, t, torch.tensor([0, 1, 2, 3]))
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 1e-3, (i, j)


def test_timestep_changes_output(tiny_unet):
    x = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1)
    out = tiny_unet(x, torch.tensor([10, 900]), torch.tensor([1, 1]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_batch_elements_are_independent(tiny_unet):
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([5, 50, 500, 999]), torch.tensor([0, 1, 2, 3])
    full = tiny_unet(x, t, y)
    for i in range(4):
        torch.testing.assert_close(tiny_unet(x[i:i + 1], t[i:i + 1], y[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=0)


def test_config_round_trip_through_json():
    cfg = TINY_UNET
    d = json.loads(json.dumps(cfg.to_dict()))  # tuples become lists in JSON
    assert isinstance(d["channel_mult"], list)
    back = UNetConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.channel_mult, tuple) and isinstance(back.attn_resolutions, tuple)
    assert UNetConfig.from_dict({}) == UNetConfig()  # missing keys take the defaults


def test_config_rejects_unknown_keys():
    d = TINY_UNET.to_dict()
    d["num_heads"] = 4
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig.from_dict(d)


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS) + ["tiny-test"])
def test_every_groupnorm_has_at_least_two_channels_per_group(name):
    # With one channel per group GroupNorm subtracts each channel's own mean, which erases the
    # per-channel timestep/class bias ResBlock adds right before norm2: those blocks ignore t and y.
    cfg = TINY_UNET if name == "tiny-test" else UNET_CONFIGS[name]
    with torch.device("meta"):
        model = UNet(cfg)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms
    for m in norms:
        assert m.num_channels // m.num_groups >= 2, (m.num_channels, m.num_groups)


@pytest.mark.parametrize("width", [8, 16, 32, 64])
def test_every_res_block_sees_the_embedding(width):
    torch.manual_seed(0)
    block = ResBlock(width, width, emb_dim=4 * width, dropout=0.0).eval()
    x = torch.randn(1, width, 4, 4).expand(2, -1, -1, -1)
    emb = torch.randn(2, 4 * width)
    out = block(x, emb)
    assert (out[0] - out[1]).abs().max() > 1e-2


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_upsample_is_nearest_upsampling_then_its_3x3_conv(size):
    """The folded transposed conv computes conv(interpolate(x, 2x nearest)): values and weight gradients."""
    torch.manual_seed(0)
    up = Upsample(6).double()
    x = torch.randn(3, 6, size, size + 1, dtype=torch.double)
    out = up(x)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    up.folded = False
    assert torch.equal(up(x), ref)
    assert out.shape == (3, 6, 2 * size, 2 * size + 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    (gw,) = torch.autograd.grad((out * g).sum(), [up.conv.weight])
    (gw_ref,) = torch.autograd.grad((ref * g).sum(), [up.conv.weight])
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)


def test_upsample_keeps_the_checkpoint_keys():
    assert set(Upsample(4).state_dict()) == {"conv.weight", "conv.bias"}


def test_unet_gives_the_same_eps_with_folded_and_plain_upsampling(tiny_unet):
    torch.manual_seed(1)
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 4, (4,))
    with torch.no_grad():
        folded = tiny_unet(x, t, y)
        plain = set_upsample_folding(tiny_unet, False)(x, t, y)
        set_upsample_folding(tiny_unet, True)
    assert sum(isinstance(m, Upsample) and m.folded for m in tiny_unet.modules()) >= 1
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
