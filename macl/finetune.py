"""Segmentation fine-tuning and evaluation: ``finetune(...)``, ``evaluate(...)``, ``evaluate_run(...)``.

Fine-tuning trains any network ``model_factory(in_channels, num_classes)`` mapping
(B, C, *spatial) -> (B, num_classes, *spatial) logits, from scratch or from pre-trained weights
(loaded by name with :func:`macl.nets.load_pretrained`: every pre-trained tensor must exist in the
network with the same shape). Loss Dice + cross-entropy (MONAI ``DiceCELoss``) or cross-entropy;
Adam, cosine decay per iteration to ``min_lr`` (MACL.md "Optimisation").

Run folder (``out_dir``)::

    finetune_config.json   the resolved config
    split.json             seed, train / test / labelled case ids (labelled_cases.json: the latter)
    pretrained_load.json   which pre-trained tensors were loaded (when pre-trained)
    finetune_log.jsonl     one JSON line per logged step (step, loss, lr, seconds)
    checkpoint_latest.pt   model, optimizer, scheduler, step, config (atomic; resumed automatically)
    model_final.pt         the final network state dict
    summary.json           nnU-Net-style metrics on the test cases (evaluate / evaluate_run)

Evaluation predicts each test volume in its pre-processed voxel grid (2D slice-wise or 3D, MONAI
sliding-window inference) and scores it per case and class with Dice and HD95 (mm, with the
volume's spacing) as defined in :mod:`macl.data.metrics` (matching MONAI's ``DiceMetric`` and
``compute_hausdorff_distance(percentile=95)``), in an nnU-Net-style summary.json with means.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from macl.run import folder as runfolder
from macl.run.signals import Interrupted, StopRequest
from macl.settings.fields import check_labels_fraction, coerce_fields
from macl.data.channels import finetune_channels, pretrained_input, select_volumes
from macl.data.errors import DataError
from macl.data.value_checks import classes_from_values
from macl.parallel import SINGLE, World, local_device, wrap_ddp
from macl.data.metrics import case_metrics, dice_score, hd95, summarize, write_json_atomic
from macl.data.preprocess import PreprocessConfig, Volume, load_volumes
from macl.data.readers import DatasetIndex
from macl.data.segsampling import SegBatchSampler, SegSamplingConfig
from macl.data.split_files import declared_test_cases, open_with_split
from macl.data.splits import select_labelled, split_cases
from macl.data.seg_augment import check_spatial_aug
from macl.nets.freeze import apply_freeze, check_freeze, frozen_prefixes, recalibrate_batchnorm, set_train_mode
from macl.nets.param_groups import build_optimizer
from macl.run.validation import Validator, check_val, mean_foreground_dice, split_validation

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "predict_volume", "evaluate", "evaluate_run",
           "prepare_split", "save_checkpoint", "case_metrics", "dice_score", "hd95", "summarize", "write_json_atomic"]
logger = logging.getLogger(__name__)
Progress = Callable[[int, int, dict], None]
ModelFactory = Callable[[int, int], nn.Module]


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (defaults: MACL.md "Optimisation", Dice+CE per the issue).

    Label budget: ``labels_fraction`` or ``labelled_cases`` (neither: all training cases).
    Split: ``test_cases`` if given, else the data set's declared split (a datalist's ``validation`` list, or
    fold ``split_fold`` of nnU-Net's ``splits_final.json``: macl.data.split_files), else ``test_fraction`` of
    the labelled cases, by ``seed``.
    Channels: ``channels`` (list of ints) if given, else the pre-training run's choice, else all channels of the
    data (macl.data.channels); a pre-trained network taking another number of channels is refused (one line).
    """

    dims: int = 2
    patch_size: tuple[int, ...] = (64, 64)
    slice_axis: int = 2
    steps: int = 1000
    batch_size: int = 10
    lr: float = 5e-4
    min_lr: float = 5e-6
    weight_decay: float = 1e-5
    loss: str = "dice_ce"
    labels_fraction: float | None = None
    labelled_cases: list[str] | None = None
    test_fraction: float = 0.2
    test_cases: list[str] | None = None
    seed: int = 0
    foreground_prob: float = 0.33
    mirror: bool = True
    checkpoint_every: int = 200
    log_every: int = 10
    sw_overlap: float = 0.25
    sw_batch_size: int = 8
    skip_bad: bool = False
    device: str = "cpu"
    channels: list[int] | None = None
    split_fold: int = 0
    # the recipe (macl.nets.freeze, macl.nets.param_groups, macl.run.validation; docs/workflow.md "Fine-tuning recipes")
    freeze: str = "none"
    probe_steps: int = 0
    warmup_steps: int = 0
    pretrained_lr_scale: float = 1.0
    bn_recalibrate: int = 0
    val_fraction: float = 0.0
    val_cases: list[str] | None = None
    val_every: int = 50
    spatial_aug: str = "none"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_labels_fraction(self.labels_fraction)
        if isinstance(self.preprocess, Mapping):
            self.preprocess = PreprocessConfig(**self.preprocess)
        self.patch_size = tuple(int(s) for s in self.patch_size)
        if self.dims not in (2, 3) or len(self.patch_size) != self.dims:
            raise ValueError(f"need dims in (2, 3) and {self.dims} patch sizes, got dims={self.dims}, "
                             f"patch_size={self.patch_size}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "sw_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loss not in ("dice_ce", "ce"):
            raise ValueError(f"loss must be 'dice_ce' or 'ce', got {self.loss!r}")
        if self.labels_fraction is not None and self.labelled_cases is not None:
            raise ValueError("give labels_fraction or labelled_cases, not both")
        if not 0 < self.lr or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        _check_recipe(self)

    def to_dict(self) -> dict:
        """Plain-JSON form (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model, the case ids used, the run folder."""

    model: nn.Module
    train: list[str]
    test: list[str]
    labelled: list[str]
    run_dir: Path
    num_classes: int
    class_names: dict[int, str]
    loaded_pretrained: list[str]
    last_loss: float


def _check_recipe(cfg: FinetuneConfig) -> None:
    """ValueError naming the first bad recipe setting (macl.nets.freeze / param_groups, macl.run.validation)."""
    check_freeze(cfg.freeze)
    check_spatial_aug(cfg.spatial_aug)
    check_val(cfg.val_fraction, cfg.val_cases, cfg.val_every)
    for name in ("probe_steps", "warmup_steps", "bn_recalibrate"):
        if int(getattr(cfg, name)) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.probe_steps >= cfg.steps:
        raise ValueError(f"probe_steps ({cfg.probe_steps}) must be below steps ({cfg.steps}): the fine-tuning "
                         f"phase would never start")
    if not cfg.pretrained_lr_scale > 0:
        raise ValueError(f"pretrained_lr_scale must be > 0, got {cfg.pretrained_lr_scale}")
    if cfg.probe_steps and cfg.freeze != "none":
        raise ValueError(f"probe_steps (linear probe, then fine-tune everything) needs freeze='none', "
                         f"got freeze={cfg.freeze!r}")


# ------------------------------------------------------------------------------------------ files
def save_checkpoint(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, ``os.replace``: never half-written."""
    runfolder.save_torch_atomic(obj, path)  # a full disk: DiskFullError naming `path`, the old file kept


def _pretrained_state(pretrained: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict from exported weights ({"state_dict": ...}), a pre-training checkpoint or a state dict."""
    obj = pretrained
    if isinstance(pretrained, (str, Path)):
        p = Path(pretrained)
        if p.is_dir():  # a pre-training run folder
            p = p / "checkpoints" / "final.pt" if (p / "checkpoints" / "final.pt").is_file() else p / "checkpoints" / "latest.pt"
        if not p.is_file():
            raise FileNotFoundError(f"pre-trained weights not found: {p}")
        obj = runfolder.load_checkpoint_safe(p)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return dict(obj["state_dict"])
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        from macl.train import export_weights
        return dict(export_weights(dict(obj))["state_dict"])
    return dict(obj)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- data
def _inputs(cfg: FinetuneConfig, index: DatasetIndex, volumes: list, pretrained) -> tuple[FinetuneConfig, list]:
    """The data set's declared split (datalist validation, splits_final.json) as test cases unless given, and
    the channels (given, else the pre-training run's, else all; macl.data.channels), applied to `volumes`."""
    declared = declared_test_cases(index)
    if cfg.test_cases is None and declared is not None:
        have = {v.case_id for v in volumes}
        cfg = dataclasses.replace(cfg, test_cases=[c for c in declared if c in have])
        logger.info("test cases from %s (%d)", index.extra["split"]["source"], len(cfg.test_cases))
    chans = finetune_channels(cfg.channels, volumes[0].image.shape[0],
                              pretrained_input(pretrained) if pretrained is not None else None, str(index.root))
    cfg = dataclasses.replace(cfg, channels=chans)
    return cfg, select_volumes(volumes, chans, str(index.root))


def _classes(index: DatasetIndex, volumes: Sequence[Volume]) -> dict[int, str]:
    if index.labels is not None:
        names = dict(sorted(index.labels.items()))
    else:  # no declared classes: the values must be 0..K, K <= 255 (macl.data.value_checks)
        names = classes_from_values(set().union(*(np.unique(v.label).tolist() for v in volumes
                                                  if v.label is not None)), index.root)
    if sorted(names) != list(range(len(names))):
        raise DataError(index.root, f"label values must be consecutive 0..K-1, got {sorted(names)}")
    return names


def prepare_split(case_ids: Sequence[str], cfg: FinetuneConfig) -> dict[str, Any]:
    """Train / test / labelled case ids for ``cfg`` (deterministic by ``cfg.seed``)."""
    if cfg.test_cases is not None:
        unknown = sorted(set(cfg.test_cases) - set(case_ids))
        if unknown:
            raise ValueError(f"test cases not among the labelled cases: {unknown[:10]}")
        test = sorted(cfg.test_cases)
        train = sorted(set(case_ids) - set(test))
    else:
        train, test = split_cases(case_ids, cfg.test_fraction, cfg.seed)
    if cfg.labelled_cases is not None:
        labelled = select_labelled(train, cases=cfg.labelled_cases, seed=cfg.seed)
    else:
        labelled = select_labelled(train, fraction=1.0 if cfg.labels_fraction is None else cfg.labels_fraction, seed=cfg.seed)
    return {"seed": cfg.seed, "labels_fraction": cfg.labels_fraction, "train": train, "test": test,
            "labelled": labelled}


# ------------------------------------------------------------------------------------- training
def _loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "ce":
        ce = nn.CrossEntropyLoss()
        return lambda logits, target: ce(logits, target[:, 0])
    from monai.losses import DiceCELoss
    return DiceCELoss(to_onehot_y=True, softmax=True)


def finetune(data: str | Path | DatasetIndex, out_dir: str | Path, model_factory: ModelFactory,
             cfg: FinetuneConfig | None = None, pretrained: str | Path | Mapping[str, Any] | None = None,
             progress: Progress | None = None, resume: bool = True, evaluate_test: bool = True,
             world: World = SINGLE) -> FinetuneResult:
    """Fine-tune a segmentation network on the labelled cases of ``data``.

    Args:
        data: a data set path (any layout :func:`macl.data.readers.open_dataset` reads) or an index.
        out_dir: the run folder (created; see module docstring).
        model_factory: ``model_factory(in_channels, num_classes) -> nn.Module`` giving logits
            (B, num_classes, *spatial) for input (B, in_channels, *spatial).
        cfg: settings (default :class:`FinetuneConfig`()).
        pretrained: exported weights file, pre-training checkpoint / run folder, or a state dict.
        progress: called as ``progress(step, total_steps, {"loss": float, "lr": float})``.
        resume: continue from ``out_dir/checkpoint_latest.pt`` when present.
        evaluate_test: run :func:`evaluate` on the test cases at the end (writes summary.json).
        world: under torchrun (:func:`macl.parallel.init_from_env`): the network is wrapped in
            DistributedDataParallel, ``cfg.batch_size`` is the global batch (each rank draws its share of
            every step independently), the logged loss is the mean over ranks, and only rank 0 writes files,
            reports progress and evaluates (the other ranks return after the last step).

    Raises:
        DataError: bad data (named file) before anything is trained or written.
        ValueError: bad settings, a network whose output shape is wrong, pre-trained tensors
            missing from the network, or a resume whose split differs.
        FloatingPointError: a non-finite loss (the last checkpoint is kept).
        macl.run.signals.Interrupted: a SIGINT / SIGTERM during training (single process, main thread): the
            current step finished and was checkpointed; rerunning continues exactly.
    """
    cfg = cfg or FinetuneConfig()
    index = data if isinstance(data, DatasetIndex) else open_with_split(data, cfg.split_fold)
    volumes = load_volumes(index, cfg.preprocess, labelled_only=True, skip_bad=cfg.skip_bad)
    cfg, volumes = _inputs(cfg, index, volumes, pretrained)
    class_names = _classes(index, volumes)
    split = split_validation(prepare_split([v.case_id for v in volumes], cfg), cfg.val_fraction, cfg.val_cases,
                             cfg.seed)
    by_id = {v.case_id: v for v in volumes}
    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path = run / "checkpoint_latest.pt"
    ckpt = runfolder.load_checkpoint_safe(ckpt_path) if resume and ckpt_path.is_file() else None
    if ckpt is not None and ckpt["split"] != split:
        raise ValueError(f"{ckpt_path} was trained on another split/label selection; use a new out_dir")
    lo, hi = world.shard(cfg.batch_size)
    if world.is_main:
        write_json_atomic(run / "finetune_config.json", {"config": cfg.to_dict(), "num_classes": len(class_names),
                                                          "class_names": class_names, "data": str(index.root),
                                                          "world_size": world.size})
        write_json_atomic(run / "split.json", split)
        write_json_atomic(run / "labelled_cases.json", split["labelled"])
    else:
        progress = None

    device = local_device(world, torch.device(cfg.device))
    torch.manual_seed(cfg.seed)
    in_ch = volumes[0].image.shape[0]
    model = model_factory(in_ch, len(class_names)).to(device)
    loaded: list[str] = []
    if pretrained is not None and ckpt is None:
        from macl.nets import load_pretrained
        loaded = load_pretrained(model, _pretrained_state(pretrained))
        if world.is_main:
            write_json_atomic(run / "pretrained_load.json", {"source": str(pretrained) if isinstance(
                pretrained, (str, Path)) else "<state dict>", "loaded": loaded})
            logger.info("loaded %d pre-trained tensors", len(loaded))
    if ckpt is not None:
        loaded = list(ckpt.get("loaded_pretrained", []))
    frozen = frozen_prefixes(cfg.freeze, model)
    apply_freeze(model, frozen)
    if frozen and cfg.bn_recalibrate and ckpt is None:  # frozen statistics re-estimated on shuffled training crops
        recal = SegBatchSampler([by_id[c] for c in split["train"] if c not in split.get("val", [])],
                                SegSamplingConfig(cfg.dims, cfg.patch_size, cfg.slice_axis, 0.0, cfg.mirror),
                                seed=cfg.seed + 7919)
        n_bn = recalibrate_batchnorm(model, frozen, (recal.batch(i, cfg.batch_size)[0].to(device)
                                                     for i in range(cfg.bn_recalibrate)))
        logger.info("re-estimated %d frozen BatchNorm layers on %d batches", n_bn, cfg.bn_recalibrate)
    trained = wrap_ddp(model, world, device)  # the model itself in a single process
    opt, sched = build_optimizer(model, cfg, loaded)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = int(ckpt["step"])
        logger.info("resumed %s at step %d", ckpt_path, start)
    sampler = SegBatchSampler([by_id[c] for c in split["labelled"]],
                              SegSamplingConfig(cfg.dims, cfg.patch_size, cfg.slice_axis, cfg.foreground_prob,
                                                cfg.mirror, spatial_aug=cfg.spatial_aug), seed=cfg.seed)
    validator = None
    if "val" in split and world.is_main:
        val_vols = [by_id[c] for c in split["val"]]
        validator = Validator(run, lambda m: mean_foreground_dice(evaluate(m, val_vols, cfg, None, class_names)),
                              cfg.val_every, cfg.steps, state=ckpt.get("validation") if ckpt is not None else None)
    loss_fn = _loss_fn(cfg.loss)
    log_path = run / "finetune_log.jsonl"
    if world.is_main:  # on resume, drop a partial last line and the lines of steps after the checkpoint
        if start > 0:
            runfolder.repair_log(log_path, start)
        else:
            runfolder.atomic_write(log_path, "")

    def checkpoint(step: int) -> None:
        if not world.is_main:
            return
        save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "step": step, "config": cfg.to_dict(), "split": split, "loaded_pretrained": loaded,
                         **({"validation": validator.state()} if validator is not None else {})}, ckpt_path)

    set_train_mode(model, frozen)  # frozen modules stay in eval mode: their BatchNorm statistics do not move
    loss_value, t0 = float("nan"), time.perf_counter()
    stop = StopRequest(enabled=world.size == 1)  # SIGINT / SIGTERM: checkpoint the current step, then stop
    for step in stop.during(range(start, cfg.steps)):
        img, lab = sampler.batch(step, hi - lo, stream=world.rank)
        logits = trained(img.to(device))
        if step == start and (logits.ndim != img.ndim or logits.shape[0] != img.shape[0]
                              or logits.shape[1] != len(class_names) or logits.shape[2:] != img.shape[2:]):
            raise ValueError(f"the network maps {tuple(img.shape)} to {tuple(logits.shape)}; expected "
                             f"({img.shape[0]}, {len(class_names)}, {', '.join(map(str, img.shape[2:]))})")
        loss = loss_fn(logits, lab.to(device))
        loss_value = float(world.mean(loss.detach().float().reshape(1)))  # the same on every rank
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite fine-tuning loss {loss_value} at step {step + 1}; last "
                                     f"checkpoint kept: {ckpt_path if ckpt_path.is_file() else 'none yet'}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        lr = float(opt.param_groups[0]["lr"])
        if world.is_main and (done % cfg.log_every == 0 or done == cfg.steps):
            runfolder.append_text(log_path, json.dumps({"step": done, "loss": loss_value, "lr": lr,
                                                        "seconds": round(time.perf_counter() - t0, 3),
                                                        "time": round(time.time(), 3)}) + "\n")
        if validator is not None and validator.maybe_check(model, done) is not None:
            set_train_mode(model, frozen)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if world.is_main:
                runfolder.fsync_file(log_path)  # the log reaches the disk before the checkpoint vouching for it
            checkpoint(done)
        if progress is not None:
            progress(done, cfg.steps, {"loss": loss_value, "lr": lr})
        if stop.signum is not None and done < cfg.steps:  # the step is done: checkpoint it, then stop
            runfolder.fsync_file(log_path)
            checkpoint(done)
            raise Interrupted(stop.signum, done, str(ckpt_path))
    if not world.is_main:
        return FinetuneResult(model, split["train"], split["test"], split["labelled"], run, len(class_names),
                              class_names, loaded, loss_value)
    kept = None
    if validator is not None:  # the best validation step's state is the final model; the last state is kept aside
        save_checkpoint(model.state_dict(), run / "model_last.pt")
        kept = validator.kept()
        if validator.best_state is not None:
            model.load_state_dict(validator.best_state)
        write_json_atomic(run / "kept.json", kept)
        logger.info("kept step %s (validation Dice %s)", kept["step"], kept["val_dice"])
    save_checkpoint(model.state_dict(), run / "model_final.pt")
    if evaluate_test and split["test"]:
        summary = evaluate(model, [by_id[c] for c in split["test"]], cfg, None, class_names,
                           records={c.case_id: c for c in index.cases}, allowed_labels=index.allowed_label_values)
        if kept is not None:
            summary["kept"] = kept
        write_json_atomic(run / "summary.json", summary)
    return FinetuneResult(model, split["train"], split["test"], split["labelled"], run, len(class_names),
                          class_names, loaded, loss_value)


# ------------------------------------------------------------------------------------ inference
@torch.no_grad()
def predict_volume(model: nn.Module, image: np.ndarray, cfg: FinetuneConfig, slice_batch: int = 32) -> np.ndarray:
    """Label map of one volume: 2D slice-wise or 3D, each by MONAI sliding-window inference.

    Args:
        image: float32 (C, X, Y, Z) pre-processed volume.
        cfg: uses dims, patch_size (the window), slice_axis, sw_overlap, sw_batch_size, device.

    Returns:
        int16 (X, Y, Z) argmax labels.
    """
    from monai.inferers import sliding_window_inference
    was_training = model.training
    model.eval()
    device = torch.device(cfg.device)
    x = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy: cached volumes are read-only memmaps
    try:
        if cfg.dims == 3:
            logits = sliding_window_inference(x[None].to(device), cfg.patch_size, cfg.sw_batch_size, model,
                                              overlap=cfg.sw_overlap)
            return logits[0].argmax(0).cpu().numpy().astype(np.int16)
        slices = x.movedim(1 + cfg.slice_axis, 0)  # (n, C, *in-plane)
        out = []
        for s in range(0, slices.shape[0], slice_batch):
            logits = sliding_window_inference(slices[s:s + slice_batch].to(device), cfg.patch_size,
                                              cfg.sw_batch_size, model, overlap=cfg.sw_overlap)
            out.append(logits.argmax(1).cpu())
        return torch.cat(out).movedim(0, cfg.slice_axis).numpy().astype(np.int16)
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, volumes: Sequence[Volume], cfg: FinetuneConfig, summary_path: str | Path | None,
             class_names: Mapping[int, str], progress: Progress | None = None,
             predictions: dict[str, np.ndarray] | None = None, records: Mapping[str, Any] | None = None,
             allowed_labels: Any = None) -> dict[str, Any]:
    """Predict each labelled volume and score it; write the summary to ``summary_path``.

    Args:
        volumes: pre-processed volumes with labels.
        predictions: if a dict is given, each case's (X, Y, Z) prediction (pre-processed grid) is stored in it.
        records: case id -> :class:`~macl.data.readers.CaseRecord`. A case found here is scored in its label
            file's own voxel grid: the prediction goes back to that grid exactly as ``macl predict`` writes it
            (:func:`macl.data.image_space.image_space_mask`) and is scored against the label as stored, with its
            spacing (:func:`macl.data.image_space.score_in_image_space`), so ``macl evaluate --predictions`` on a run's
            own predictions reproduces its summary, with or without resampling. Other cases are scored in the
            pre-processed grid (``reference_file`` then names the image). ``allowed_labels``: the data set's
            declared label values, checked when the label is read again.

    Returns:
        the summary dict (see :func:`summarize`); JSON on disk has NaN as null.
    """
    per_case = []
    classes = [k for k in sorted(class_names) if k != 0]
    for i, vol in enumerate(volumes):
        if vol.label is None:
            raise ValueError(f"volume {vol.case_id} ({vol.source}) has no label to evaluate against")
        pred = predict_volume(model, np.asarray(vol.image), cfg)
        if predictions is not None:
            predictions[vol.case_id] = pred
        rec = (records or {}).get(vol.case_id)
        if rec is not None and rec.label is not None:  # one path back to the image grid: macl.predict's
            from macl.data.image_space import image_space_mask, image_space_reference, score_in_image_space
            mask, _ = image_space_mask(pred, vol.affine, rec)
            per_case.append(score_in_image_space(mask, image_space_reference(rec, allowed_labels), classes))
        else:
            per_case.append({"case_id": vol.case_id, "reference_file": vol.source, "prediction_file": None,
                             "spacing": list(vol.spacing),
                             "metrics": case_metrics(pred, np.asarray(vol.label), classes, vol.spacing)})
        if progress is not None:
            progress(i + 1, len(volumes), {"case": vol.case_id})
    summary = summarize(per_case, class_names)
    if summary_path is not None:
        write_json_atomic(summary_path, summary)
    return summary


def evaluate_run(run_dir: str | Path, data: str | Path | DatasetIndex, model_factory: ModelFactory,
                 progress: Progress | None = None, cases: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate a fine-tuning run folder's final model on its test cases (or ``cases``).

    Reads ``finetune_config.json``, ``split.json`` and ``model_final.pt`` from ``run_dir`` and
    writes ``run_dir/summary.json``.

    Raises:
        FileNotFoundError: a run file is missing (named). DataError: bad data. ValueError: a case
            id not in the data set.
    """
    run = Path(run_dir)
    for name in ("finetune_config.json", "split.json", "model_final.pt"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: is {run} a finished fine-tuning run?")
    saved = json.loads((run / "finetune_config.json").read_text())
    cfg = FinetuneConfig(**saved["config"])
    class_names = {int(k): v for k, v in saved["class_names"].items()}
    wanted = list(cases) if cases is not None else json.loads((run / "split.json").read_text())["test"]
    if not wanted:
        raise ValueError(f"{run}: no test cases to evaluate (split.json 'test' is empty); pass cases=")
    index = data if isinstance(data, DatasetIndex) else open_with_split(data, cfg.split_fold)
    known = {c.case_id: c for c in index.labelled()}
    missing = sorted(set(wanted) - set(known))
    if missing:
        raise ValueError(f"cases not among the labelled cases of {index.root}: {missing[:10]}")
    volumes = load_volumes(index, cfg.preprocess, cases=[known[c] for c in wanted], skip_bad=cfg.skip_bad)
    volumes = select_volumes(volumes, cfg.channels, str(index.root))
    model = model_factory(volumes[0].image.shape[0], len(class_names)).to(cfg.device)
    model.load_state_dict(runfolder.load_checkpoint_safe(run / "model_final.pt", cfg.device))
    summary = evaluate(model, volumes, cfg, None, class_names, progress, records=known,
                       allowed_labels=index.allowed_label_values)
    if (run / "kept.json").is_file():  # which validation step model_final.pt is (see the fine-tuning recipe)
        summary["kept"] = json.loads((run / "kept.json").read_text())
    write_json_atomic(run / "summary.json", summary)
    return summary
