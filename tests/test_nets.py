"""Networks: the public code's shapes, branch wiring, partial decoder = first blocks of the full one,
and pre-trained weights loading into the fine-tuning U-Net with no renaming."""
import numpy as np
import pytest
import torch

from macl.settings.config import NetConfig
from macl.nets import MACLModel, UNet, UNetDecoder, UNetEncoder, build_finetune_net, load_pretrained
from macl.nets.macl_model import EncoderProjector


def naive_linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) 1D linear interpolation with align_corners=True, written from the definition."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1 - frac
        w[i, i1] += frac
    return w


def naive_resize(x: torch.Tensor, size) -> torch.Tensor:
    """Separable (bi/tri)linear resize, align_corners=True, by explicit interpolation matrices."""
    out = x.detach().double().numpy()
    for axis, n_out in enumerate(size):
        w = naive_linear_weights(out.shape[2 + axis], n_out)
        out = np.moveaxis(np.tensordot(w, np.moveaxis(out, 2 + axis, 0), axes=(1, 0)), 0, 2 + axis)
    return torch.from_numpy(out)


def test_public_shapes_2d_512():
    """2D input 1×512×512, F=32, scale 0.25 → aux bottleneck 512×32×32, aux pixel head 128×32×32,
    dominant decoder output 128×32×32, dominant bottleneck 512×8×8, image projections 128-d."""
    torch.manual_seed(0)
    model = MACLModel(NetConfig(dims=2, base_width=32, depth=4)).eval()
    x = torch.randn(1, 1, 512, 512)
    with torch.no_grad():
        out = model(x, x, x, x)
    assert out.aux_bottleneck.shape == (1, 512, 32, 32)
    assert out.aux_pixel.shape == (1, 128, 32, 32)
    assert out.dom_bottleneck.shape == (1, 512, 8, 8)
    assert out.dom_pixel.shape == (1, 128, 32, 32)
    assert out.aux_image.shape == (1, 128) and out.dom_image.shape == (1, 128)


def test_public_shapes_3d_analogue():
    """3D patch 1×128³, F=32 → aux bottleneck 512×8³, aux pixel 128×8³, dominant bottleneck 512×2³,
    dominant decoder output 128×8³, projections 128-d (shape inference on the meta device)."""
    with torch.device("meta"):
        model = MACLModel(NetConfig(dims=3, base_width=32, depth=4))
        x = torch.empty(2, 1, 128, 128, 128)
        out = model(x, x, x, x)
    assert out.aux_bottleneck.shape == (2, 512, 8, 8, 8)
    assert out.aux_pixel.shape == (2, 128, 8, 8, 8)
    assert out.dom_bottleneck.shape == (2, 512, 2, 2, 2)
    assert out.dom_pixel.shape == (2, 128, 8, 8, 8)
    assert out.aux_image.shape == (2, 128) and out.dom_image.shape == (2, 128)


def test_parameter_count_matches_public_unet():
    """Fine-tuning U-Net (F=32, depth 4, 1 channel in, 4 classes): count from the layer formula."""
    F = 32
    def conv(ci, co, k=3, bias=True):
        return ci * co * k * k + (co if bias else 0)
    def cna(ci, co):  # conv + BN (weight, bias)
        return conv(ci, co) + 2 * co
    enc = sum(cna(ci, co) + cna(co, co) for ci, co in [(1, F), (F, 2 * F), (2 * F, 4 * F), (4 * F, 8 * F)])
    enc += conv(8 * F, 16 * F) + conv(16 * F, 16 * F)
    dec = sum(conv(2 * c, c, k=2) + cna(2 * c, c) + cna(c, c) for c in [8 * F, 4 * F, 2 * F, F])
    head = conv(F, 4, k=1, bias=False)
    net = UNet(NetConfig(base_width=F, depth=4), num_classes=4)
    assert sum(p.numel() for p in net.parameters()) == enc + dec + head
    assert net.head.bias is None


def test_downsample_is_bilinear_align_corners():
    torch.manual_seed(0)
    model = MACLModel(NetConfig(dims=2, base_width=4, depth=2))
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    got = model.downsample(x)
    assert got.shape == (2, 1, 8, 8)
    assert torch.allclose(got, naive_resize(x, (8, 8)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dims", [2, 3])
def test_partial_decoder_equals_first_blocks_of_full(dims):
    """D_k (k=2) has the full decoder's first-k-block parameter names and computes its block-k output."""
    torch.manual_seed(0)
    enc = UNetEncoder(dims, 1, 4, 3).eval()
    full = UNetDecoder(dims, 4, 3).eval()
    part = UNetDecoder(dims, 4, 3, num_blocks=2).eval()
    sd = {k: v for k, v in full.state_dict().items() if k.startswith(("blocks.0.", "blocks.1."))}
    assert set(sd) == set(part.state_dict())
    part.load_state_dict(sd, strict=True)
    x = torch.randn(2, 1, *([16] * dims))
    with torch.no_grad():
        b, skips = enc(x)
        assert torch.equal(part(b, skips)[-1], full(b, skips)[1])


@pytest.mark.parametrize("source", ["decoder", "encoder"])
def test_branch_wiring(source):
    """Each output is computed from the view and branch the method says (checked by recomputing it)."""
    torch.manual_seed(0)
    model = MACLModel(NetConfig(dims=2, base_width=4, depth=3), dominant_image_source=source).eval()
    imgs = [torch.randn(3, 1, 32, 32) for _ in range(4)]
    with torch.no_grad():
        out = model(*imgs)
        a1 = model.encoder(imgs[0])[0]
        assert torch.equal(out.aux_bottleneck, a1)
        assert torch.equal(out.aux_pixel, model.aux_pixel_head(a1))
        assert torch.equal(out.aux_image, model.aux_image_head(model.encoder(imgs[2])[0]))
        b2, skips2 = model.encoder(model.downsample(imgs[1]))
        assert torch.equal(out.dom_bottleneck, b2)
        assert torch.equal(out.dom_pixel, model.decoder(b2, skips2)[-1])
        b4, skips4 = model.encoder(model.downsample(imgs[3]))
        src = model.decoder(b4, skips4)[-1] if source == "decoder" else b4
        assert torch.equal(out.dom_image, model.dom_image_head(src))
    # one shared encoder: no second copy of encoder weights anywhere
    assert sum(1 for n, _ in model.named_modules() if isinstance(_, UNetEncoder)) == 1


def test_geometry_errors_name_values():
    with pytest.raises(ValueError, match="0.5"):
        MACLModel(NetConfig(depth=3), decoder_blocks=2, dominant_scale=0.5)
    with pytest.raises(ValueError, match="decoder_blocks"):
        MACLModel(NetConfig(depth=2), decoder_blocks=3, dominant_scale=0.125)
    model = MACLModel(NetConfig(base_width=4, depth=3))
    with pytest.raises(ValueError, match=r"\(24, 24\)"):
        model(*[torch.randn(2, 1, 24, 24)] * 4)


@pytest.mark.parametrize("dims", [2, 3])
def test_exported_weights_load_strictly_into_finetune_net(dims):
    torch.manual_seed(0)
    net = NetConfig(dims=dims, base_width=4, depth=3)
    model = MACLModel(net)
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
    exported = model.pretrained_state_dict()
    assert exported and all(k.startswith(("encoder.", "decoder.blocks.0.", "decoder.blocks.1.")) for k in exported)
    ft = build_finetune_net(model.describe()["net"], num_classes=3)
    loaded = load_pretrained(ft, exported)
    assert loaded == sorted(exported)
    ft_sd = ft.state_dict()
    for k, v in exported.items():
        assert torch.equal(ft_sd[k], v), k
    # every encoder tensor and the first two decoder blocks are pre-trained; the rest is fine-tuning only
    rest = sorted(set(ft_sd) - set(exported))
    assert rest and all(k.startswith(("decoder.blocks.2.", "head.")) for k in rest)
    assert all(k in exported for k in ft_sd if k.startswith("encoder."))
    # and the exported dict plus the fine-tuning-only tensors is a strict state dict of the U-Net
    UNet(ft.net_config, 3).load_state_dict({**{k: ft_sd[k] for k in rest}, **exported}, strict=True)


def test_load_pretrained_rejects_mismatches():
    model = MACLModel(NetConfig(base_width=4, depth=3))
    exported = model.pretrained_state_dict()
    with pytest.raises(ValueError, match="shape mismatch for 'encoder.stages.0.0.conv.weight'"):
        load_pretrained(UNet(NetConfig(base_width=8, depth=3), 2), exported)
    with pytest.raises(KeyError, match="bogus.weight"):
        load_pretrained(UNet(NetConfig(base_width=4, depth=3), 2), {**exported, "bogus.weight": torch.zeros(1)})


def test_pcl_network_exports_encoder_only():
    torch.manual_seed(0)
    model = EncoderProjector(NetConfig(base_width=4, depth=3))
    assert model.image_head.fc1.in_features == 32 and model.image_head.fc2.out_features == 32  # 2^d·F → 2^d·F
    exported = model.pretrained_state_dict()
    assert exported and all(k.startswith("encoder.") for k in exported)
    ft = UNet(NetConfig(base_width=4, depth=3), 2)
    load_pretrained(ft, exported)
    assert torch.equal(ft.encoder.center[0].weight, model.encoder.center[0].weight)
