"""Semi-supervised segmentation with ARCO: ``train_semi(data, out_dir, cfg, progress=None)``.

The data are read as by ``macl finetune`` (any layout :func:`macl.data.open_dataset` reads); the labelled
cases are split into train / test exactly as fine-tuning does (``labels_fraction`` or ``labelled_cases`` of
the training cases keep their labels); every other training case, and every case without a label file, is
used as unlabelled images.

One step (public ARCO code, `macl.semi.losses` for the loss pieces):
1. the teacher (EMA of the student, momentum 0.99) predicts the unlabelled batch: pseudo-labels and
   confidences; CutMix mixes images, pseudo-labels and confidences, then brightness/contrast jitter and
   Gaussian blur make the strong view (`macl.semi.augment`);
2. the student sees [labelled | strong unlabelled] → logits and representation; the teacher the same images;
3. L = L_sup + λ_c·L_contrast + λ_u·L_unsup + λ_nn·L_nn (1, 0.01, 1, 1):
   L_sup = Dice + CE (MONAI ``DiceCELoss``) on the labelled images; L_unsup = confidence-weighted pseudo-label CE;
   L_contrast = ARCO's prototype-vs-bank contrast with the chosen sampler ("sg", "sag", "ns", "index_sg",
   "index_sag", or "all"); L_nn = the nearest-neighbour term (by default the public code's, which carries no
   gradient: see `macl.semi.losses`);
4. SGD (momentum 0.9, Nesterov, weight decay 1e-4), lr = lr₀·(1 − step/steps)^0.9; then the EMA update.
Every random choice of step t is drawn from a generator seeded by (seed, t), so a resumed run repeats it.

Run folder (``out_dir``)::

    semi_config.json, split.json, labelled_cases.json, semi_log.jsonl (one JSON line per logged step)
    checkpoint_latest.pt    student, teacher, memory bank, NN pool, optimizer, step, config, split (atomic)
    model_final.pt          the student `UNet` state dict (loads into the fine-tuning `UNet` as it is)
    finetune_config.json, resolved_config.json   so `macl evaluate --run out_dir` evaluates it
    summary.json            Dice / HD95 on the test cases (as `macl finetune`)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from macl.run import folder as runfolder
from macl.settings.config import NetConfig
from macl.settings.fields import check_labels_fraction, coerce_fields
from macl.data.metrics import write_json_atomic
from macl.data.preprocess import PreprocessConfig, load_volumes
from macl.data.readers import DatasetIndex, open_dataset
from macl.data.segsampling import SegBatchSampler, SegSamplingConfig
from macl.finetune import FinetuneConfig, _classes, evaluate, prepare_split, save_checkpoint
from macl.semi.losses import (NN_MODES, ClassMemoryBank, NNPool, arco_contrast, contrast_masks, ema_update, nn_term,
                               unsup_loss)
from macl.semi.net import ArcoNet
from macl.parallel import SINGLE, World, local_device, wrap_ddp
from macl.semi.sampling import SAMPLERS
from macl.semi.augment import cutmix, strong_intensity

logger = logging.getLogger(__name__)
Progress = Callable[[int, int, dict], None]
SEMI_SAMPLERS = SAMPLERS + ("all",)


@dataclass
class SemiConfig:
    """Every setting of ``train_semi`` (defaults: the public ARCO code; see the module docstring).

    net: the U-Net backbone (None: `NetConfig(dims=dims)`).
    Data and split: as :class:`macl.finetune.FinetuneConfig` (dims, patch_size, slice_axis, labels_fraction /
    labelled_cases, test_fraction / test_cases, seed, foreground_prob, mirror, preprocess, skip_bad).
    batch_size labelled and unlabelled_batch_size (None: = batch_size) images per step.
    sampler: "sg" | "sag" | "ns" | "index_sg" | "index_sag" | "all" (None: "sg" in 2D, "sag" in 3D);
    grid: grid cells per axis of the spatial strata; num_anchors per class, num_negatives per anchor.
    alpha0: α_0 of the entropy-percentile schedule α_t = α_0·(1 − step/steps).
    nn_mode: "public" (no gradient, as the public code) | "student" | "off".
    """

    net: Optional[NetConfig] = None
    dims: int = 2
    patch_size: tuple = (64, 64)
    slice_axis: int = 2
    steps: int = 1000
    batch_size: int = 4
    unlabelled_batch_size: Optional[int] = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    labels_fraction: Optional[float] = None
    labelled_cases: Optional[list] = None
    test_fraction: float = 0.2
    test_cases: Optional[list] = None
    seed: int = 0
    foreground_prob: float = 0.33
    mirror: bool = True
    ema_momentum: float = 0.99
    sampler: Optional[str] = None
    grid: int = 4
    num_anchors: int = 256
    num_negatives: int = 512
    temperature: float = 0.5
    rep_dim: int = 64
    bank_size: int = 30000
    background_bank_size: int = 50000
    anchor_threshold: float = 0.3
    negative_threshold: float = 0.97
    strong_threshold: float = 0.97
    low_rank: int = 3
    high_rank: int = 20
    alpha0: float = 20.0
    lambda_contrast: float = 0.01
    lambda_unsup: float = 1.0
    lambda_nn: float = 1.0
    nn_mode: str = "public"
    nn_pool: int = 36
    nn_topk: int = 5
    cutmix_area: float = 0.5
    p_jitter: float = 0.5
    p_blur: float = 0.5
    checkpoint_every: int = 200
    log_every: int = 10
    sw_overlap: float = 0.25
    sw_batch_size: int = 8
    device: str = "cpu"
    impl: str = "auto"
    skip_bad: bool = False
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_labels_fraction(self.labels_fraction)
        if self.net is None:
            self.net = NetConfig(dims=self.dims)
        elif isinstance(self.net, Mapping):
            self.net = NetConfig(**self.net)
        if isinstance(self.preprocess, Mapping):
            self.preprocess = PreprocessConfig(**self.preprocess)
        self.patch_size = tuple(int(s) for s in self.patch_size)
        if self.dims not in (2, 3) or len(self.patch_size) != self.dims:
            raise ValueError(f"need dims in (2, 3) and {self.dims} patch sizes, got dims={self.dims}, "
                             f"patch_size={self.patch_size}")
        if self.net.dims != self.dims:
            raise ValueError(f"net.dims={self.net.dims} differs from dims={self.dims}")
        if self.sampler is None:
            self.sampler = "sg" if self.dims == 2 else "sag"
        if self.sampler not in SEMI_SAMPLERS:
            raise ValueError(f"sampler must be one of {SEMI_SAMPLERS}, got {self.sampler!r}")
        if self.nn_mode not in NN_MODES:
            raise ValueError(f"nn_mode must be one of {NN_MODES}, got {self.nn_mode!r}")
        for name in ("steps", "batch_size", "grid", "num_anchors", "num_negatives", "rep_dim", "bank_size",
                     "background_bank_size", "nn_pool", "nn_topk", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum!r}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be > 0, got {self.temperature!r} and {self.lr!r}")
        if not 0 <= self.alpha0 <= 100:
            raise ValueError(f"alpha0 must be in [0, 100], got {self.alpha0!r}")

    def to_dict(self) -> dict:
        """Plain JSON form (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SemiConfig":
        """Inverse of `to_dict`. Raises ValueError naming unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown semi-supervised setting(s) {bad}; known: {sorted(known)}")
        return cls(**dict(d))

    def finetune_config(self) -> FinetuneConfig:
        """The split / evaluation settings as a FinetuneConfig (what `prepare_split` and `evaluate` read)."""
        return FinetuneConfig(dims=self.dims, patch_size=self.patch_size, slice_axis=self.slice_axis,
                              steps=self.steps, batch_size=self.batch_size, labels_fraction=self.labels_fraction,
                              labelled_cases=self.labelled_cases, test_fraction=self.test_fraction,
                              test_cases=self.test_cases, seed=self.seed, foreground_prob=self.foreground_prob,
                              mirror=self.mirror, sw_overlap=self.sw_overlap, sw_batch_size=self.sw_batch_size,
                              skip_bad=self.skip_bad, device=self.device, preprocess=self.preprocess)


@dataclass
class SemiResult:
    """What `train_semi` returns."""

    model: ArcoNet
    run_dir: Path
    split: dict
    class_names: dict
    last_record: dict
    summary: Optional[dict]


def _poly(step: int, total: int, power: float) -> float:
    return (1.0 - step / total) ** power


def _step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    key = [int(seed) & 0xFFFFFFFF, int(step), 17] + ([int(rank)] if rank else [])
    return torch.Generator().manual_seed(int(np.random.default_rng(key).integers(2 ** 62)))


class _State(torch.nn.Module):
    """Everything that changes during training, in one state dict."""

    def __init__(self, cfg: SemiConfig, num_classes: int, in_channels: int, width: int):
        super().__init__()
        net = dataclasses.replace(cfg.net, in_channels=in_channels)
        self.student = ArcoNet(net, num_classes, cfg.rep_dim)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        sizes = [cfg.background_bank_size] + [cfg.bank_size] * (num_classes - 1)
        self.bank = ClassMemoryBank(sizes, cfg.rep_dim, cfg.dims)
        self.pool = NNPool(cfg.nn_pool, width, torch.Generator().manual_seed(cfg.seed))


def arco_step(state: _State, cfg: SemiConfig, xl: torch.Tensor, yl: torch.Tensor, xu: torch.Tensor, step: int,
              g: torch.Generator, dice_ce, student: Optional[torch.nn.Module] = None) -> dict:
    """One ARCO forward: the loss terms (0-d tensors) of step `step` (see the module docstring).
    student: what runs the student's forward (its DistributedDataParallel wrapper under torchrun)."""
    student, teacher = student or state.student, state.teacher
    bl = xl.shape[0]
    with torch.no_grad():
        teacher.train()
        prob_w = torch.softmax(teacher(xu)[0], 1)
        conf, pseudo = prob_w.max(1)
    xu_s, yu_s, cu_s = cutmix(xu, pseudo, conf, g, cfg.cutmix_area)
    xu_s = strong_intensity(xu_s, g, cfg.p_jitter, cfg.p_blur)
    x_all = torch.cat([xl, xu_s])
    logits, rep = student(x_all)
    with torch.no_grad():
        t_logits, t_rep = teacher(x_all)
    terms = {"L_sup": dice_ce(logits[:bl], yl), "L_unsup": unsup_loss(logits[bl:], yu_s, cu_s, cfg.strong_threshold)}
    labels = torch.cat([yl[:, 0], yu_s])
    labelled = torch.arange(x_all.shape[0], device=x_all.device) < bl
    alpha = cfg.alpha0 * (1.0 - step / cfg.steps)
    masks = contrast_masks(labels, torch.softmax(t_logits, 1), torch.softmax(logits.detach(), 1), labelled, alpha,
                           cfg.anchor_threshold, cfg.negative_threshold, cfg.low_rank, cfg.high_rank)
    con = arco_contrast(rep, t_rep, masks, state.bank, cfg.sampler, cfg.num_anchors, cfg.num_negatives,
                        cfg.temperature, cfg.grid, g, cfg.impl)
    terms["L_contrast"] = con["loss"]
    terms["L_nn"] = nn_term(rep[bl:], t_rep[bl:], state.pool, cfg.nn_topk, cfg.nn_mode)
    state.pool.push(t_rep[bl:])
    terms["contrast_classes"] = con["classes"].float()
    return terms


def train_semi(data: str | Path | DatasetIndex, out_dir: str | Path, cfg: Optional[SemiConfig] = None,
               progress: Optional[Progress] = None, resume: bool = True, evaluate_test: bool = True,
               world: World = SINGLE) -> SemiResult:
    """Train ARCO (student + EMA teacher) on the labelled and unlabelled cases of `data` (module docstring).

    Args:
        data: a data set path or index. out_dir: the run folder (created).
        cfg: settings (default `SemiConfig`()). progress: called as progress(step, steps, {"loss", "lr", ...}).
        resume: continue from out_dir/checkpoint_latest.pt when present.
        evaluate_test: evaluate the student on the test cases at the end (summary.json).
        world: under torchrun (:func:`macl.parallel.init_from_env`): the student is wrapped in
            DistributedDataParallel; the labelled and unlabelled batch sizes are global (each rank draws its
            share of every step independently); the memory bank and the nearest-neighbour pool are per rank
            (each rank contrasts its anchors against its own bank; the checkpoint keeps rank 0's); the logged
            terms are means over ranks; only rank 0 writes files, reports progress and evaluates.

    Raises:
        DataError: bad data (named file). ValueError: bad settings, a resume whose split or settings differ.
        FloatingPointError: a non-finite loss (the last checkpoint is kept).
    """
    from monai.losses import DiceCELoss

    cfg = cfg or SemiConfig()
    ft = cfg.finetune_config()
    index = data if isinstance(data, DatasetIndex) else open_dataset(data)
    volumes = load_volumes(index, cfg.preprocess, skip_bad=cfg.skip_bad)
    with_label = [v for v in volumes if v.label is not None]
    class_names = _classes(index, with_label)  # the same class table as `macl finetune`
    split = prepare_split([v.case_id for v in with_label], ft)
    by_id = {v.case_id: v for v in volumes}
    unl_ids = sorted((set(split["train"]) - set(split["labelled"])) | {v.case_id for v in volumes if v.label is None})
    if not unl_ids:
        logger.warning("no unlabelled case: the labelled training images are also used as unlabelled ones")
        unl_ids = list(split["labelled"])
    split = {**split, "unlabelled": unl_ids}
    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path = run / "checkpoint_latest.pt"
    ckpt = runfolder.load_checkpoint_safe(ckpt_path) if resume and ckpt_path.is_file() else None
    if ckpt is not None and (ckpt["split"] != split or ckpt["config"] != cfg.to_dict()):
        raise ValueError(f"{ckpt_path} was trained with another split or other settings; use a new out_dir")
    bu = cfg.unlabelled_batch_size or cfg.batch_size
    (lo, hi), (ulo, uhi) = world.shard(cfg.batch_size), world.shard(bu)
    if world.is_main:
        write_json_atomic(run / "semi_config.json", {"config": cfg.to_dict(), "class_names": class_names,
                                                     "data": str(index.root), "world_size": world.size})
        write_json_atomic(run / "split.json", split)
        write_json_atomic(run / "labelled_cases.json", split["labelled"])
    else:
        progress = None

    device = local_device(world, torch.device(cfg.device))
    torch.manual_seed(cfg.seed)
    in_ch = volumes[0].image.shape[0]
    K = len(class_names)
    width = cfg.rep_dim * math.prod(cfg.patch_size)
    state = _State(cfg, K, in_ch, width).to(device)
    student = state.student
    forward = wrap_ddp(student, world, device)  # the student itself in a single process
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.momentum > 0)
    start = 0
    if ckpt is not None:
        state.load_state_dict(ckpt["state"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        logger.info("resumed %s at step %d", ckpt_path, start)
    seg_cfg = SegSamplingConfig(cfg.dims, cfg.patch_size, cfg.slice_axis, cfg.foreground_prob, cfg.mirror)
    lab_sampler = SegBatchSampler([by_id[c] for c in split["labelled"]], seg_cfg, seed=cfg.seed)
    blank = [dataclasses.replace(by_id[c], label=np.zeros(by_id[c].shape, dtype=np.int16)) for c in unl_ids]
    unl_sampler = SegBatchSampler(blank, dataclasses.replace(seg_cfg, foreground_prob=0.0), seed=cfg.seed + 1)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    weights = {"L_sup": 1.0, "L_contrast": cfg.lambda_contrast, "L_unsup": cfg.lambda_unsup, "L_nn": cfg.lambda_nn}
    log_path = run / "semi_log.jsonl"
    if world.is_main:  # on resume, drop a partial last line and the lines of steps after the checkpoint
        if start > 0:
            runfolder.repair_log(log_path, start)
        else:
            runfolder.atomic_write(log_path, "")

    def checkpoint(step: int) -> None:
        if not world.is_main:
            return
        save_checkpoint({"state": state.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "config": cfg.to_dict(), "split": split}, ckpt_path)

    record: dict = {}
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        lr = cfg.lr * _poly(step, cfg.steps, cfg.poly_power)
        for group in opt.param_groups:
            group["lr"] = lr
        xl, yl = lab_sampler.batch(step, hi - lo, stream=world.rank)
        xu, _ = unl_sampler.batch(step, uhi - ulo, stream=world.rank)
        student.train()
        terms = arco_step(state, cfg, xl.to(device), yl.to(device), xu.to(device), step,
                          _step_generator(cfg.seed, step, world.rank), dice_ce, forward)
        loss = sum(weights[k] * terms[k] for k in weights)
        names = list(terms) + ["loss"]   # means over the ranks: the same values (and the same stop) everywhere
        values = dict(zip(names, world.mean(torch.stack([terms[k].detach().float() for k in terms]
                                                        + [loss.detach().float()])).tolist()))
        if not math.isfinite(values["loss"]):
            bad = next(k for k in weights if not math.isfinite(values[k]))
            raise FloatingPointError(f"non-finite loss term {bad} = {values[bad]} at step {step + 1}; last checkpoint "
                                     f"kept: {ckpt_path if ckpt_path.is_file() else 'none yet'}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(state.teacher, student, cfg.ema_momentum)
        done = step + 1
        record = {"step": done, **values, "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
        if world.is_main and (done % cfg.log_every == 0 or done == cfg.steps):
            runfolder.append_text(log_path, json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if world.is_main:
                runfolder.fsync_file(log_path)
            checkpoint(done)
        if progress is not None:
            progress(done, cfg.steps, record)
    if not world.is_main:
        return SemiResult(student, run, split, class_names, record, None)
    save_checkpoint(student.unet.state_dict(), run / "model_final.pt")
    write_json_atomic(run / "finetune_config.json", {"config": ft.to_dict(), "num_classes": K,
                                                     "class_names": class_names, "data": str(index.root)})
    net = {k: v for k, v in dataclasses.asdict(cfg.net).items() if k != "in_channels"}
    write_json_atomic(run / "resolved_config.json", {"data": str(index.root), "pretrained": None, "net": net,
                                                     "finetune": ft.to_dict(), "semi": cfg.to_dict()})
    summary = None
    if evaluate_test and split["test"]:
        summary = evaluate(student.unet, [by_id[c] for c in split["test"]], ft, run / "summary.json", class_names)
    return SemiResult(student, run, split, class_names, record, summary)
