"""The trainer: learning on synthetic volumes (2D and 3D), exact resume, non-finite stop, checkpoints,
exported weights, the schedule, clipping, the voxel-level L_d's memory, and the config."""
import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from macl.settings.config import (MethodConfig, NetConfig, OptimConfig, PretrainConfig, TrainConfig, apply_overrides,
                         from_dict, load_config, to_dict)
from macl.methods import Batch, build_method
from macl.nets import build_finetune_net, load_pretrained
from macl.train import NonFiniteLossError, export_weights, load_checkpoint, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ synthetic volumes
def phantom(gen, B, size, dims):
    """B slices (dims=2) or patches (dims=3) of a smooth 'anatomy' whose look depends on the position p.

    Returns images (B, 1, *S) and positions (B,) in [0.05, 0.95]. In 3D the first axis is the slice axis
    and a patch spans p ± 0.1. Each sample gets its own shift and smooth noise texture.
    """
    pos = torch.rand(B, generator=gen) * 0.9 + 0.05
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * dims, indexing="ij"))[None]
    p = pos.view(B, *([1] * dims))
    if dims == 3:
        p = p + 0.1 * grid[:, 0]
    g = grid + 0.08 * torch.randn(B, dims, generator=gen).view(B, dims, *([1] * dims))
    y, x = g[:, -2], g[:, -1]
    r1 = 0.15 + 0.4 * p
    img = torch.exp(-((x - (p - 0.5)) ** 2 + y ** 2) / (2 * r1 ** 2))
    img = img + (0.3 + 0.7 * p) * torch.exp(-((x - 0.4) ** 2 + (y - (0.6 - 1.2 * p)) ** 2) / (2 * 0.15 ** 2))
    img = img + 0.8 * (p > 0.5).float() * torch.exp(-((x + 0.5) ** 2 + (y + 0.5) ** 2) / (2 * 0.12 ** 2))
    noise = torch.randn((B, 1) + (size // 4,) * dims, generator=gen)
    noise = F.interpolate(noise, size=(size,) * dims, mode="bilinear" if dims == 2 else "trilinear")
    return img[:, None] + 0.15 * noise, pos


def intensity_view(gen, x):
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    contrast = 0.8 + 0.4 * torch.rand(shape, generator=gen)
    brightness = 0.2 * (torch.rand(shape, generator=gen) - 0.5)
    return x * contrast + brightness + 0.03 * torch.randn(x.shape, generator=gen)


def spatial_view(gen, x):
    dims = x.dim() - 2
    shifts = torch.randint(-2, 3, (x.shape[0], dims), generator=gen).tolist()
    return torch.stack([torch.roll(xi, shifts=s, dims=tuple(range(1, dims + 1))) for xi, s in zip(x, shifts)])


def synthetic_batch(gen, B, size, dims):
    x, pos = phantom(gen, B, size, dims)
    i1, i2 = intensity_view(gen, x), intensity_view(gen, x)
    return Batch(pos, i1, i2, spatial_view(gen, i1), spatial_view(gen, i2))


def synthetic_batches(seed, B, size, dims):
    """A factory: batches(start_step) yields the batches of steps start_step, start_step+1, ..."""
    def factory(start):
        step = start
        while True:
            yield synthetic_batch(torch.Generator().manual_seed(seed * 100003 + step), B, size, dims)
            step += 1
    return factory


def top1_retrieval(method, B, size, dims, n_batches=6, threshold=0.1):
    """Top-1 retrieval accuracy of positives (|Δpos| < threshold), on held-out batches of size B.

    image: among the 2B image projections [z3; z4], is each one's nearest other projection a positive?
    pixel: per location s, among the 2B pixel features [p1[:, :, s]; p2[:, :, s]], the same question.
    BatchNorm uses batch statistics (as in training) on a copy, so the model is not changed.
    """
    model = copy.deepcopy(method.model).train()
    image, pixel = [], []
    for k in range(n_batches):
        batch = synthetic_batch(torch.Generator().manual_seed(10_000 + k), B, size, dims)
        with torch.no_grad():
            out = model(batch.img1, batch.img2, batch.img3, batch.img4)
        pos = batch.positions.repeat(2)
        f = F.normalize(torch.cat([out.aux_image, out.dom_image]), dim=1)
        sim = (f @ f.T).fill_diagonal_(-math.inf)
        image.append(((pos[sim.argmax(1)] - pos).abs() < threshold).float().mean())
        g = F.normalize(torch.cat([out.aux_pixel, out.dom_pixel]).flatten(2), dim=1).permute(2, 0, 1)
        sim = g @ g.transpose(1, 2)
        idx = torch.arange(2 * B)
        sim[:, idx, idx] = -math.inf
        pixel.append(((pos[sim.argmax(2)] - pos[None]).abs() < threshold).float().mean())
    return float(torch.stack(image).mean()), float(torch.stack(pixel).mean())


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def tiny_config(steps=6, **train):
    # 32² at depth 2: the smallest non-degenerate MACL geometry (dominant bottleneck 2x2, L_d grid 8x8)
    return PretrainConfig(net=NetConfig(dims=2, base_width=4, depth=2), method=MethodConfig(),
                          optim=OptimConfig(lr=0.05), train=TrainConfig(steps=steps, **train))


# ------------------------------------------------------------------ learning
@pytest.mark.parametrize("dims,size,batch,steps,min_gain", [(2, 32, 16, 120, 0.2), (3, 16, 8, 160, 0.15)])
def test_pretraining_lowers_loss_and_raises_retrieval(tmp_path, dims, size, batch, steps, min_gain):
    # non-degenerate geometries (macl.settings.geometry): 32² at depth 2; 16³ at depth 2 with one decoder block (↓2)
    cfg = PretrainConfig(net=NetConfig(dims=dims, base_width=8, depth=2),
                         method=MethodConfig() if dims == 2 else MethodConfig(decoder_blocks=1, dominant_scale=0.5),
                         optim=OptimConfig(lr=0.05),
                         train=TrainConfig(steps=steps, checkpoint_every=0))
    torch.manual_seed(cfg.train.seed)
    before = top1_retrieval(build_method(cfg.net, cfg.method), batch, size, dims)
    result = pretrain(cfg, synthetic_batches(1, batch, size, dims), str(tmp_path))
    after = top1_retrieval(result.method, batch, size, dims)
    log = read_log(tmp_path)
    assert len(log) == steps
    first = sum(r["loss"] for r in log[:20]) / 20
    last = sum(r["loss"] for r in log[-20:]) / 20
    assert last < 0.85 * first, (first, last)
    assert after[0] >= before[0] + min_gain, ("image-level retrieval", before, after)
    assert after[1] >= before[1] + 0.2, ("pixel-level retrieval", before, after)


@pytest.mark.parametrize("name", ["pcl", "simclr"])
def test_baselines_fit_a_fixed_batch(tmp_path, name):
    batch = synthetic_batch(torch.Generator().manual_seed(3), 8, 32, 2)
    cfg = PretrainConfig(net=NetConfig(base_width=4, depth=3), method=MethodConfig(name=name),
                         optim=OptimConfig(lr=0.05), train=TrainConfig(steps=30, checkpoint_every=0))
    result = pretrain(cfg, [batch], str(tmp_path))  # a re-iterable: 30 passes ("epochs") over one batch
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == list(range(30))
    assert log[-1]["L_g"] < 0.8 * log[0]["L_g"]
    assert set(export_weights(result.checkpoint)["state_dict"]) == set(result.method.model.pretrained_state_dict())


# ------------------------------------------------------------------ loop mechanics
def global_rng_batches(start):
    """Batches drawn from the global torch RNG: exact resume needs the RNG state restored."""
    while True:
        x = torch.randn(4, 1, 32, 32)
        yield Batch(torch.rand(4), x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x), x.flip(-1), x)


def test_resume_continues_exactly(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    pretrain(tiny_config(steps=6, checkpoint_every=3), global_rng_batches, full)

    class Crash(Exception):
        pass

    def crash_at_3(step, total, record):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        pretrain(tiny_config(steps=6, checkpoint_every=3), global_rng_batches, part, progress=crash_at_3)
    assert load_checkpoint(os.path.join(part, "checkpoints", "latest.pt"))["step"] == 3
    pretrain(tiny_config(steps=6, checkpoint_every=3), global_rng_batches, part, resume="auto")
    a, b = read_log(full), read_log(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    keys = ("loss", "L_g", "L_d", "L_ER", "lr")
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["step"]
    fa = load_checkpoint(os.path.join(full, "checkpoints", "final.pt"))["model"]
    fb = load_checkpoint(os.path.join(part, "checkpoints", "final.pt"))["model"]
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_config(steps=10, checkpoint_every=2)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg.net, cfg.method)
    real_forward, calls = method.forward, [0]

    def poisoned(batch):
        calls[0] += 1
        terms = real_forward(batch)
        if calls[0] == 5:
            terms["L_d"] = terms["L_d"] * float("nan")
        return terms

    method.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 5: term 'L_d' = nan") as info:
        pretrain(cfg, global_rng_batches, str(tmp_path), method=method)
    latest = os.path.join(tmp_path, "checkpoints", "latest.pt")
    assert info.value.checkpoint == latest and latest in str(info.value)
    ckpt = load_checkpoint(latest)
    assert ckpt["step"] == 4
    fresh = build_method(cfg.net, cfg.method)
    fresh.load_state_dict(ckpt["model"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "final.pt"))
    last = read_log(tmp_path)[-1]
    assert isinstance(last.pop("time"), float)   # every log line carries a Unix timestamp
    assert last == {"step": 5, "event": "non_finite", "term": "L_d", "value": "nan"}


def test_checkpoint_contents_and_exported_weights(tmp_path):
    result = pretrain(tiny_config(steps=4, checkpoint_every=2), global_rng_batches, str(tmp_path))
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["final.pt", "latest.pt", "step_0000002.pt"]
    ckpt = load_checkpoint(result.checkpoint)  # weights_only=True
    assert {"model", "optimizer", "scheduler", "scaler", "step", "epoch", "rng", "config", "network"} <= set(ckpt)
    assert ckpt["step"] == 4 and from_dict(ckpt["config"]) == tiny_config(steps=4, checkpoint_every=2)
    assert ckpt["network"]["network"]["decoder_blocks"] == 2
    assert ckpt["optimizer"]["state"], "momentum buffers are saved"
    out = str(tmp_path / "pretrained.pt")
    exported = export_weights(result.checkpoint, out)
    again = torch.load(out, weights_only=True)
    assert set(again["state_dict"]) == set(exported["state_dict"])
    net = build_finetune_net(again["net"], num_classes=3)
    load_pretrained(net, again["state_dict"])
    trained = result.method.model.state_dict()
    assert all(torch.equal(net.state_dict()[k], trained[k]) for k in again["state_dict"])
    config_json = json.load(open(tmp_path / "config.json"))
    assert config_json["config"] == to_dict(tiny_config(steps=4, checkpoint_every=2))


def test_log_has_every_term_and_cosine_lr(tmp_path):
    cfg = tiny_config(steps=5, checkpoint_every=0)
    seen = []
    pretrain(cfg, global_rng_batches, str(tmp_path), progress=lambda s, t, r: seen.append((s, t)))
    log = read_log(tmp_path)
    assert seen == [(s, 5) for s in range(1, 6)]
    for r in log:
        assert {"step", "loss", "L_g", "L_d", "L_ER", "lr", "step_time_s", "samples_per_s"} <= set(r)
        assert math.isclose(r["lr"], 0.5 * 0.05 * (1 + math.cos(math.pi * (r["step"] - 1) / 5)), rel_tol=1e-12)
        assert math.isclose(r["loss"], r["L_g"] + 0.5 * r["L_d"] + r["L_ER"], rel_tol=1e-5)


def test_gradient_clipping_bounds_the_update(tmp_path):
    cfg = PretrainConfig(net=NetConfig(base_width=4, depth=2), method=MethodConfig(),
                         optim=OptimConfig(lr=1.0, weight_decay=0.0, grad_clip_norm=1e-3),
                         train=TrainConfig(steps=1, checkpoint_every=0))
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg.net, cfg.method)
    before = [p.detach().clone() for p in method.parameters()]
    pretrain(cfg, global_rng_batches, str(tmp_path), method=method)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(method.parameters(), before)))
    assert read_log(tmp_path)[0]["grad_norm"] > 1e-2  # the unclipped norm, so clipping was active
    assert step <= 1e-3 * (1 + 1e-4)


def test_run_dir_guard_and_early_end(tmp_path):
    pretrain(tiny_config(steps=2, checkpoint_every=0), global_rng_batches, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="resume='auto'"):
        pretrain(tiny_config(steps=2), global_rng_batches, str(tmp_path / "a"))
    one_shot = iter([next(global_rng_batches(0)) for _ in range(3)])
    result = pretrain(tiny_config(steps=10), one_shot, str(tmp_path / "b"))
    assert result.step == 3 and load_checkpoint(result.checkpoint)["step"] == 3
    with pytest.raises(ValueError, match="no batch"):
        pretrain(tiny_config(steps=2), [], str(tmp_path / "c"))


def test_resume_refuses_another_architecture(tmp_path):
    pretrain(tiny_config(steps=2, checkpoint_every=1), global_rng_batches, str(tmp_path))
    other = tiny_config(steps=4)
    other.net.base_width = 8
    with pytest.raises(ValueError, match="net config"):
        pretrain(other, global_rng_batches, str(tmp_path), resume="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
def test_amp_on_gpu(tmp_path):
    cfg = tiny_config(steps=3, checkpoint_every=0)
    cfg.train.device = "cuda"
    result = pretrain(cfg, global_rng_batches, str(tmp_path))
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["scaler"], "the fp16 gradient scaler state is saved"
    assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path))


# ------------------------------------------------------------------ voxel-level L_d memory
MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, tempfile, torch
    from macl.settings.config import *
    from macl.methods import Batch
    from macl.train import pretrain
    torch.set_num_threads(2)
    mode = sys.argv[1]
    cfg = PretrainConfig(net=NetConfig(dims=3, base_width=8, depth=1),
                         method=MethodConfig(dense_mode=mode, dense_negatives="batch", decoder_blocks=1,
                                             dominant_scale=0.5),
                         train=TrainConfig(steps=1, checkpoint_every=0))
    def batches(start):
        g = torch.Generator().manual_seed(start)
        while True:
            x = torch.randn(4, 1, 32, 32, 32, generator=g)
            yield Batch(torch.rand(4, generator=g), x, x + 0.1, x.flip(-1), x)
    result = pretrain(cfg, batches, tempfile.mkdtemp())
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "L_d": result.record["L_d"],
                      "voxels": 4 * result.method.model(*[torch.zeros(1, 1, 32, 32, 32)] * 2).aux_pixel[0, 0].numel()}))
""")


def test_voxel_dense_loss_on_32cubed_patches_never_allocates_a_voxel_pair_matrix():
    """3D MACL trains with L_d "voxel" (batch negatives) on 32³ patches: 4 patches × 16³ voxels = 16384
    anchors against 16384 keys, a 1 GiB float32 voxel-pair matrix. The peak RSS of that run exceeds the
    peak of the same run with L_d "location" (same network, tiny per-location groups) by far less."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {}
    for mode in ("location", "voxel"):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    n = runs["voxel"]["voxels"]
    assert n == 4 * 16 ** 3
    matrix_bytes = n * n * 4
    growth = (runs["voxel"]["peak_kib"] - runs["location"]["peak_kib"]) * 1024
    assert math.isfinite(runs["voxel"]["L_d"]) and runs["voxel"]["L_d"] > 0
    assert growth < matrix_bytes / 8, (growth / 2 ** 20, matrix_bytes / 2 ** 20)


# ------------------------------------------------------------------ config
def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="-0.1"):
        MethodConfig(temperature=-0.1)
    with pytest.raises(ValueError, match="'voxels'"):
        MethodConfig(dense_mode="voxels")
    with pytest.raises(ValueError, match="dims must be 2 or 3, got 4"):
        NetConfig(dims=4)
    with pytest.raises(ValueError, match="bogus"):
        from_dict({"optim": {"bogus": 1}})


def test_config_round_trip_and_overrides(tmp_path):
    cfg = apply_overrides(PretrainConfig(), ["optim.lr=0.1", "method.dense_mode=voxel", "optim.grad_clip_norm=none",
                                             "net.dims=3", "train.amp=false"])
    assert cfg.optim.lr == 0.1 and cfg.method.dense_mode == "voxel" and cfg.net.dims == 3 and cfg.train.amp is False
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    path = tmp_path / "run.toml"
    path.write_text('[net]\ndims = 3\nbase_width = 16\n[method]\nlambda_d = 0.25\n')
    loaded = load_config(str(path))
    assert loaded.net.base_width == 16 and loaded.method.lambda_d == 0.25 and loaded.optim == OptimConfig()
    with pytest.raises(ValueError, match="section.key"):
        apply_overrides(cfg, ["lr=0.1"])
