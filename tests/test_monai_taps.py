"""MACL on MONAI's BasicUNet, UNet and DynUNet (2D and 3D) through taps (macl/nets/taps.py, adapters.py):
one pre-training step, the tapped shapes, every loss term against a hand computation on features hooked
independently (a full forward of the network, no early stop), gradients, exported weights loading into a fresh
MONAI network with values checked, PCL / GCL on the same networks, and the one-line errors."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from macl.methods import Batch, build_method
from macl.nets import TapError, adapt
from macl.nets.from_config import build_net
from macl.settings.config import MethodConfig, NetConfig
from macl.settings.geometry import GeometryError

sys.path.insert(0, os.path.dirname(__file__))
from test_methods import naive_location_loop, naive_pos_supcon  # noqa: E402

POS = torch.tensor([0.05, 0.5, 0.12], dtype=torch.float64)  # |Δ| far from the 0.1 threshold

# (arch, args, dims, crop, bottleneck module, decoder module, (C_b, C_d), bottleneck stride)
CASES = {
    "BasicUNet-2d": ("monai:BasicUNet", {"features": [4, 4, 8, 8, 16, 4]}, 2, 128, "down_4", "upcat_3", (16, 8), 16),
    "BasicUNet-3d": ("monai:BasicUNet", {"features": [2, 2, 2, 4, 4, 2]}, 3, 128, "down_4", "upcat_3", (4, 2), 16),
    "UNet-2d": ("monai:UNet", {"channels": [4, 8, 8, 16], "strides": [2, 2, 2]}, 2, 64,
                "model.1.submodule.1.submodule.1.submodule", "model.1.submodule.2", (16, 4), 8),
    "UNet-3d": ("monai:UNet", {"channels": [2, 4, 4, 8], "strides": [2, 2, 2], "num_res_units": 1}, 3, 64,
                "model.1.submodule.1.submodule.1.submodule", "model.1.submodule.2", (8, 2), 8),
    "DynUNet-2d": ("monai:DynUNet", {"kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2],
                                     "upsample_kernel_size": [2, 2, 2], "filters": [4, 8, 8, 16]},
                   2, 64, "bottleneck", "upsamples.1", (16, 8), 8),
    "DynUNet-3d": ("monai:DynUNet", {"kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2],
                                     "upsample_kernel_size": [2, 2, 2], "filters": [2, 4, 4, 8], "res_block": True},
                   3, 64, "bottleneck", "upsamples.1", (8, 4), 8),
}


def make(case, method="macl", **mkw):
    arch, args, dims, crop, *_ = CASES[case]
    torch.manual_seed(0)
    m = build_method(NetConfig(dims=dims, arch=arch, arch_args=args),
                     MethodConfig(name=method, impl="torch", **mkw))
    return m.to(dtype_of(case))


def dtype_of(case):
    """float64 in 2D (tight comparisons); float32 in 3D (CPU 3D convolutions in float64 are very slow)."""
    return torch.float64 if CASES[case][2] == 2 else torch.float32


def batch_for(case, B=3):
    dims, crop = CASES[case][2], CASES[case][3]
    g = torch.Generator().manual_seed(1)
    shape = (B, 1) + (crop,) * dims
    dt = dtype_of(case)
    return Batch(POS[:B].to(dt), *(torch.rand(shape, generator=g, dtype=dt) for _ in range(4)))


class _Done(Exception):
    pass


def hooked(net, paths, x):
    """The outputs of the modules at `paths` in a forward of net (own hooks; stopped once all have returned)."""
    out, handles = {}, []

    def keep(p):
        def hook(module, inputs, output):
            out.setdefault(p, output)
            if len(out) == len(paths):
                raise _Done
        return hook
    for p in paths:
        handles.append(net.get_submodule(p).register_forward_hook(keep(p)))
    try:
        net(x)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_macl_step_shapes_losses_and_gradients(case):
    arch, args, dims, crop, bpath, dpath, (cb, cd), stride = CASES[case]
    m = make(case)
    model, net = m.model, m.model.net
    assert model.tapset.paths == {"bottleneck": bpath, "er": bpath, "decoder": dpath}
    batch = batch_for(case)
    out = model(batch.img1, batch.img2, batch.img3, batch.img4)
    g, d = crop // stride, crop // stride // 4
    assert out.aux_bottleneck.shape == (3, cb) + (g,) * dims
    assert out.dom_bottleneck.shape == (3, cb) + (d,) * dims
    assert out.aux_pixel.shape == out.dom_pixel.shape == (3, cd) + (g,) * dims
    assert out.aux_image.shape == out.dom_image.shape == (3, 128)

    # hand computation: features hooked by our own hooks on full forward passes, the heads applied by hand
    def feats(x, small):
        x = F.interpolate(x, size=(crop // 4,) * dims, mode="bilinear" if dims == 2 else "trilinear",
                          align_corners=True) if small else x
        return hooked(net, [bpath, dpath], x)
    f1, f2, f3, f4 = feats(batch.img1, False), feats(batch.img2, True), feats(batch.img3, False), feats(batch.img4, True)
    p1 = model.aux_pixel_head(f1[bpath])
    z3, z4 = model.aux_image_head(f3[bpath]), model.dom_image_head(f4[dpath])
    cfg = m.cfg
    ref_g = naive_pos_supcon(torch.stack([z3, z4], 1).double(), POS, 0.1, 0.1)
    ref_d = naive_location_loop(p1.double(), f2[dpath].double(), POS, 0.1, 0.1)
    small = F.interpolate(f1[bpath], size=f2[bpath].shape[2:], mode="bilinear" if dims == 2 else "trilinear",
                          align_corners=True)
    ref_er = (small - f2[bpath]).abs().mean()
    terms = m(batch)
    tight = 1e-9 if dims == 2 else 2e-5
    for name, ref, tol in (("L_g", ref_g, tight), ("L_d", ref_d, tight), ("L_ER", ref_er, 2e-6)):  # L_ER: float32
        assert terms[name].dtype == (torch.float32 if name == "L_ER" else dtype_of(case))
        assert torch.allclose(terms[name].double(), ref.double(), rtol=tol, atol=tol), (name, terms[name], ref)
    assert cfg.contrast_scale == pytest.approx(0.1 / 0.07)

    m.zero_grad(set_to_none=True)
    m.combine(terms).backward()
    first = next(p for n, p in net.named_parameters())  # the first encoder layer
    for mod in (bpath, dpath):
        grads = [p.grad for p in net.get_submodule(mod).parameters()]
        assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads), mod
    assert first.grad is not None and first.grad.abs().sum() > 0
    trained = set(model.pretrained_keys)
    named = dict(net.named_parameters(remove_duplicate=False))
    for key, p in named.items():  # exactly the tensors MACL trains have gradients
        assert (p.grad is not None) == (key in trained), key


@pytest.mark.parametrize("case", ["BasicUNet-2d", "UNet-3d", "DynUNet-3d"])
def test_exported_weights_load_into_a_fresh_monai_net(case):
    arch, args, dims, crop, bpath, dpath, _, _ = CASES[case]
    m = make(case)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    terms = m(batch_for(case))
    m.combine(terms).backward()
    opt.step()  # the exported values are no longer MONAI's initial ones
    sd = m.pretrained_state_dict()
    fresh = build_net(NetConfig(dims=dims, arch=arch, arch_args=args), 5).to(dtype_of(case))  # another out_channels
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    res = fresh.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == []
    assert sorted(res.missing_keys) == m.model.missing_keys
    after = fresh.state_dict()
    for k in sd:
        assert torch.equal(after[k], sd[k]), k
    assert any(not torch.equal(before[k], sd[k]) for k in sd if k.endswith("weight"))
    assert not any(k.startswith(("output_block", "final_conv")) for k in sd)
    for k in res.missing_keys:  # untouched
        assert torch.equal(after[k], before[k])
    # the expected missing keys by name: the decoder levels below the tap and the output layers
    expected = {"BasicUNet-2d": ("upcat_2.", "upcat_1.", "final_conv."),
                "UNet-3d": ("model.2.",),
                "DynUNet-3d": ("upsamples.2.", "output_block.", "skip_layers.upsample.")}[case]
    assert m.model.missing_keys and all(k.startswith(expected) for k in m.model.missing_keys)


@pytest.mark.parametrize("method", ["pcl", "simclr", "gcl"])
def test_other_methods_on_a_monai_net(method):
    m = make("DynUNet-2d", method, meta_labels=["position"], gcl_pixel_anchors="all", gcl_pixel_keys="all") \
        if method == "gcl" else make("DynUNet-2d", method)
    terms = m(batch_for("DynUNet-2d"))
    m.combine(terms).backward()
    net = m.model.net
    assert net.bottleneck.conv1.conv.weight.grad.abs().sum() > 0
    decoder_grad = net.upsamples[1].transp_conv.conv.weight.grad
    if method == "gcl":  # image and pixel branches: the decoder up to the tap is trained
        assert decoder_grad.abs().sum() > 0 and not any(k.startswith("upsamples.2") for k in m.model.pretrained_keys)
    else:  # encoder-only methods tap the bottleneck only
        assert decoder_grad is None and not any(k.startswith("upsamples") for k in m.model.pretrained_keys)
    if method == "pcl":  # L_g by hand on independently hooked bottlenecks
        b = batch_for("DynUNet-2d")
        h3, h4 = hooked(net, ["bottleneck"], b.img3)["bottleneck"], hooked(net, ["bottleneck"], b.img4)["bottleneck"]
        ref = naive_pos_supcon(torch.stack([m.model.image_head(h3), m.model.image_head(h4)], 1), POS, 0.1, 0.1)
        assert ref.dtype == torch.float64
        assert torch.allclose(m(b)["L_g"], ref, rtol=1e-6)


def test_adapt_any_module_with_explicit_taps():
    from monai.networks.nets import BasicUNet
    net = BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4))
    m = adapt(net, taps={"bottleneck": "down_4", "decoder": ["upcat_3"]})
    assert m.model.net is net and m.model.ratio() == (4, 4) and m.model.channels() == (16, 8)
    m2 = adapt(net, taps={"bottleneck": "down_4", "decoder": "upcat_4"},
               method=MethodConfig(dominant_scale=0.5, decoder_blocks=1))
    assert m2.model.ratio() == (2, 2)


# ------------------------------------------------------------------------------------------ errors
def _one_line(exc):
    return "\n" not in str(exc.value)


def test_wrong_tap_name_is_one_line_and_names_the_module():
    from monai.networks.nets import BasicUNet
    with pytest.raises(TapError, match=r"tap 'decoder': BasicUNet has no module 'upcat_9'; nearest: \[.*upcat") as e:
        adapt(BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4)), taps={"bottleneck": "down_4", "decoder": "upcat_9"})
    assert _one_line(e)
    with pytest.raises(TapError, match="unknown tap name"):
        adapt(BasicUNet(2, 1, 2), taps={"bottleneck": "down_4", "decodr": "upcat_3"})


def test_a_module_that_is_not_an_encoder_decoder_is_refused():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(TapError, match=r"Sequential is not an encoder–decoder at its taps: the bottleneck '0' .*no down") as e:
        adapt(plain, taps={"bottleneck": "0", "decoder": "2"})
    assert _one_line(e)
    down_only = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    with pytest.raises(TapError, match=r"decoder tap '2' .* not finer than the bottleneck '0'"):
        adapt(down_only, taps={"bottleneck": "0", "decoder": "2"})
    with pytest.raises(TapError, match="no built-in MACL tap map"):
        adapt(plain)
    with pytest.raises(TapError, match="monai:DenseNet121.*no MACL tap map"):
        build_method(NetConfig(arch="monai:DenseNet121"), MethodConfig())


def test_a_1x1_dominant_bottleneck_names_module_and_size():
    m = make("DynUNet-2d")
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64)
    with pytest.raises(GeometryError, match=r"MACL on DynUNet at patch 32x32: the dominant bottleneck "
                                            r"\(module 'bottleneck'\) is 1x1 .*Use a patch of 64x64") as e:
        m(Batch(POS, x, x, x, x))
    assert _one_line(e)
    with pytest.raises(GeometryError, match="not divisible by 32x32"):
        m(Batch(POS, *(torch.rand(3, 1, 48, 48, dtype=torch.float64),) * 4))


def test_hooks_are_inert_in_the_users_own_forward():
    from monai.networks.nets import BasicUNet
    net = BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4))
    m = adapt(net)
    x = torch.rand(2, 1, 64, 64)
    y = net(x)  # the full network, nothing stopped, nothing kept
    assert y.shape == (2, 2, 64, 64) and m.model.tapset._store == {}
    m.model.tapset.remove()
    assert not net.down_4._forward_hooks


MEMORY_SCRIPT = """
import json, resource, sys, tempfile, torch
from macl.settings.config import MethodConfig, NetConfig, PretrainConfig, TrainConfig
from macl.methods import Batch
from macl.train import pretrain
torch.set_num_threads(2)
net = NetConfig(dims=3, arch="monai:DynUNet", arch_args={"kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                "upsample_kernel_size": [2, 2], "filters": [2, 4, 8]})
cfg = PretrainConfig(net=net, method=MethodConfig(dense_mode=sys.argv[1], dense_negatives="batch", impl="torch"),
                     train=TrainConfig(steps=1, checkpoint_every=0, diagnostics=False))
g = torch.Generator().manual_seed(0)
x = torch.randn(4, 1, 64, 64, 64, generator=g)
result = pretrain(cfg, [Batch(torch.rand(4, generator=g), x, x + 0.1, x.flip(-1), x)], tempfile.mkdtemp())
out = result.method.model(x[:1], x[:1])
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "L_d": result.record["L_d"],
                  "voxels": 4 * out.aux_pixel[0, 0].numel()}))
"""


def test_dense_voxel_loss_on_a_dynunet_never_allocates_the_voxel_pair_matrix():
    """3D DynUNet (bottleneck 1/4) on 64³ crops, batch 4, L_d "voxel" with batch negatives: 4 × 16³ = 16384
    auxiliary voxels against 16384 dominant ones, a 1 GiB float32 pair matrix. The peak RSS exceeds the same run
    with L_d "location" by far less."""
    import json
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {}
    for mode in ("location", "voxel"):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    n = runs["voxel"]["voxels"]
    assert n == 4 * 16 ** 3
    growth = (runs["voxel"]["peak_kib"] - runs["location"]["peak_kib"]) * 1024
    assert runs["voxel"]["L_d"] > 0
    assert growth < n * n * 4 / 8, (growth / 2 ** 20, n * n * 4 / 2 ** 20)
