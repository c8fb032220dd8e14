"""The pre-training loop: `pretrain(config, batches, run_dir)`.

One readable loop around a `macl.methods.Method`:
SGD (momentum 0.9, weight decay 1e-5) with a per-iteration cosine decay of the learning rate; mixed precision
on CUDA only; optional gradient-norm clipping; seeded, and deterministic on CPU; a JSON line per logged step
with every loss term, the total L, the learning rate and the throughput; checkpoints written atomically
(temporary file, then `os.replace`); exact resume; a non-finite loss term stops the run with
`NonFiniteLossError` naming the step and the term, leaving the last good checkpoint in place.

Run folder layout:
    run_dir/config.json              the resolved config and the network description
    run_dir/log.jsonl                one JSON object per logged step (with the `macl.diagnostics` fields)
    run_dir/diagnostics.json         the per-term verdicts and collapse events of `macl.diagnostics`
    run_dir/checkpoints/step_0000500.pt, latest.pt, final.pt

A checkpoint is a dict of plain types and tensors (loadable with `torch.load(..., weights_only=True)`):
    model, optimizer, scheduler, scaler (state dicts), step, epoch, rng (python/numpy/torch/cuda states),
    config (nested dict), network (the method's `describe()`).
`export_weights(checkpoint)` extracts the encoder/decoder tensors under the fine-tuning `UNet`'s names.

Under torchrun (`world` from `macl.parallel.init_from_env`): the method is wrapped in DistributedDataParallel
(optionally with SyncBatchNorm), its contrastive losses take keys from every rank (`process_group="world"`),
the logged terms are averaged over the ranks (so every rank sees the same values and a non-finite term stops
every rank at the same step), and only rank 0 writes the log, config and checkpoints (the unwrapped model:
they load at any world size).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import dataclasses
from dataclasses import dataclass
from collections.abc import Iterator as _IteratorABC
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from .run import folder as runfolder
from .run.signals import Interrupted, StopRequest
from .settings.config import OptimConfig, PretrainConfig, from_dict, to_dict
from .diagnostics import Diagnostics, DiagnosticsConfig
from .settings.geometry import require_valid_geometry
from .settings.presets import stored_config
from .methods import Batch, Method, build_method
from .parallel import SINGLE, World, local_device, loss_group, wrap_ddp

log = logging.getLogger(__name__)

Batches = Union[Iterable[Any], Callable[[int], Iterable[Any]]]
Progress = Callable[[int, int, Dict[str, Any]], None]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or ±inf. Attributes: step (1-based), term, value, checkpoint (path or None)."""

    def __init__(self, step: int, term: str, value: float, checkpoint: Optional[str]):
        self.step, self.term, self.value, self.checkpoint = step, term, value, checkpoint
        kept = f"last good checkpoint kept: {checkpoint}" if checkpoint else "no checkpoint had been written yet"
        super().__init__(f"non-finite loss at step {step}: term {term!r} = {value}; training stopped, {kept}")


@dataclass
class TrainResult:
    """What `pretrain` returns: the last step done, the final checkpoint path and the last log record."""

    step: int
    checkpoint: str
    record: Dict[str, Any]
    method: Method
    verdicts: list = dataclasses.field(default_factory=list)  # macl.diagnostics: one dict per loss term


# ----------------------------------------------------------------------------------------- small pieces
def resolve_device(name: str) -> torch.device:
    """"auto" → cuda if available else cpu; otherwise torch.device(name). Raises ValueError for cuda without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available")
    return device


def cosine_factor(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """lr(step)/lr_0 for the 0-based iteration `step` of `total`: linear warm-up, then cosine to min_ratio.

    Without warm-up: min_ratio + (1 − min_ratio)·½(1 + cos(π·step/total)), as the public LR_Scheduler("cos").
    """
    if step < warmup:
        return (step + 1) / warmup
    t = min(step - warmup, total - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(method: Method, cfg: OptimConfig, total_steps: int):
    """SGD(momentum, weight decay) and a LambdaLR that applies `cosine_factor` per iteration."""
    opt = torch.optim.SGD(method.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ratio = cfg.min_lr / cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_factor(s, total_steps, cfg.warmup_steps, ratio))
    return opt, sched


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states in weights_only-loadable types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside `path`, fsync, then os.replace: `path` is never half-written."""
    runfolder.save_torch_atomic(obj, path)  # a full disk: DiskFullError naming `path`, the old file kept


def write_text_atomic(text: str, path: str) -> None:
    """Write text to `path` atomically (temporary file + os.replace)."""
    runfolder.atomic_write(path, text)


def load_checkpoint(path: str, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """torch.load(path, weights_only=True). Raises FileNotFoundError / ValueError (unreadable) naming the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return runfolder.load_checkpoint_safe(path, map_location)


def export_weights(checkpoint: Union[str, Dict[str, Any]], out_path: Optional[str] = None) -> Dict[str, Any]:
    """The pre-trained encoder/decoder of a checkpoint, ready for `macl.nets.load_pretrained`.

    Returns {"state_dict": {encoder.* / decoder.* tensors}, "net": NetConfig dict, "network": description,
    "step": int}; also saved atomically to `out_path` when given. Build the fine-tuning net with
    `macl.nets.build_finetune_net(result["net"], num_classes)` and load with `load_pretrained(net, result["state_dict"])`.
    """
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    from .nets.api import export_tapped, tapped_description
    if tapped_description(ckpt) is not None:  # a user's / MONAI network: a plain state dict under its own names
        return export_tapped(ckpt, out_path)
    prefixes = ("model.encoder.", "model.decoder.")
    state = {k[len("model."):]: v for k, v in ckpt["model"].items() if k.startswith(prefixes)}
    if not state:
        raise ValueError("checkpoint holds no model.encoder.* / model.decoder.* tensors to export")
    out = {"state_dict": state, "net": ckpt["config"]["net"], "network": ckpt["network"], "step": ckpt["step"]}
    if out_path is not None:
        save_atomic(out, out_path)
    return out


def _is_factory(batches: Batches) -> bool:
    return callable(batches) and not hasattr(batches, "__iter__")


def _open_batches(batches: Batches, start_step: int) -> Iterator[Any]:
    """A fresh pass: batches(start_step) for a factory, iter(batches) otherwise."""
    return iter(batches(start_step)) if _is_factory(batches) else iter(batches)


def _trim_log(path: str, last_step: int) -> None:
    """Keep only records with step <= last_step (the interrupted run's later lines are replaced on resume); a
    partial last line left by a crash is dropped with a warning."""
    runfolder.repair_log(path, last_step)


# ----------------------------------------------------------------------------------------- the loop
def pretrain(config: PretrainConfig, batches: Batches, run_dir: str, *, resume: Union[bool, str, None] = None,
             progress: Optional[Progress] = None, method: Optional[Method] = None,
             world: World = SINGLE) -> TrainResult:
    """Pre-train `config.method` on `batches` for `config.train.steps` steps, writing into `run_dir`.

    batches: an iterable of batches (each a `Batch`, a mapping with img1…img4/positions, or a tuple
        (img1, img2, img3, img4, positions, ...)), re-iterated when exhausted if it is re-iterable (a list, a
        DataLoader); or a callable `batches(start_step) -> iterable` whose batches begin at `start_step`
        (what exact resume needs). A one-shot iterator that runs dry ends the run early.
    resume: None/False — a fresh run (refuses a run_dir that already has checkpoints); "auto" — continue from
        run_dir/checkpoints/latest.pt if present; a path — continue from that checkpoint.
    progress: called as progress(step, total_steps, record) after every step (record = the log record).
    method: use this (already built) method instead of `build_method(config.net, config.method)`.
    world: this process's place under torchrun (`macl.parallel.init_from_env()`); `batches` then yields this
        rank's rows of every global batch (`macl.data.batches_from_step(..., world=world)` does), and only
        rank 0 writes files and reports progress.

    Signals (single process, main thread): a SIGINT or SIGTERM during the loop lets the current step finish,
    writes checkpoints/latest.pt at it and raises `macl.run.signals.Interrupted` (a KeyboardInterrupt); a second
    signal interrupts at once. The previous handlers are restored when the loop ends.

    Returns a `TrainResult`. Raises `NonFiniteLossError` when a loss term is NaN/inf (see the class), and
    ValueError for a run_dir with checkpoints but no resume, or a resume whose checkpoint has another
    net/method config.
    """
    total = int(config.train.steps)
    device = local_device(world, resolve_device(config.train.device))
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    latest = os.path.join(ckpt_dir, "latest.pt")
    os.makedirs(ckpt_dir, exist_ok=True)
    resume_from, ckpt = None, None
    if resume == "auto":  # latest.pt, else the newest loadable step_*.pt (a warning says which)
        found = runfolder.find_resume_checkpoint(ckpt_dir, map_location="cpu")
        resume_from, ckpt = (str(found[0]), found[1]) if found else (None, None)
    elif isinstance(resume, str) and resume:
        resume_from = resume
    elif resume not in (None, False):
        raise ValueError(f"resume must be None, False, 'auto' or a checkpoint path, got {resume!r}")
    if resume_from is None and os.path.exists(latest):
        raise ValueError(f"{run_dir} already holds checkpoints; pass resume='auto' to continue or use a new run_dir")

    prev_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    prev_cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        seed_everything(config.train.seed)
        method = method if method is not None else build_method(config.net, config.method)
        method.to(device)
        method.process_group = loss_group(world)
        model = wrap_ddp(method, world, device, config.train.sync_batchnorm)  # method itself when not distributed
        opt, sched = make_optimizer(method, config.optim, total)
        use_amp = bool(config.train.amp) and device.type == "cuda"
        amp_dtype = getattr(torch, config.train.amp_dtype)
        scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
        step, epoch = 0, 0
        if resume_from is not None:
            ckpt = ckpt if ckpt is not None else load_checkpoint(resume_from, map_location="cpu")
            saved = from_dict(stored_config(ckpt["config"]))
            for part in ("net", "method"):
                if getattr(saved, part) != getattr(config, part):
                    raise ValueError(f"cannot resume {resume_from}: its {part} config {getattr(saved, part)} "
                                     f"differs from {getattr(config, part)}")
            method.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            step, epoch = int(ckpt["step"]), int(ckpt["epoch"])
            log.info("resumed %s at step %d", resume_from, step)
        log_path = os.path.join(run_dir, "log.jsonl")
        if world.is_main:
            if resume_from is not None:
                _trim_log(log_path, step)
            else:
                write_text_atomic("", log_path)
            write_text_atomic(json.dumps({"config": to_dict(config), "network": method.describe(),
                                          "world_size": world.size}, indent=2), os.path.join(run_dir, "config.json"))
        else:
            progress = None

        def checkpoint(path: str) -> None:
            if not world.is_main:
                return
            save_atomic({"model": method.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step,
                         "epoch": epoch, "rng": rng_state(), "config": to_dict(config),
                         "network": method.describe()}, path)

        last_good = resume_from
        record: Dict[str, Any] = {}
        diag = Diagnostics(DiagnosticsConfig(window=config.train.collapse_window,
                                             grad_every=config.train.diag_grad_every),
                           log_warnings=world.is_main) if config.train.diagnostics else None
        geometry_checked = False
        it = _open_batches(batches, step)
        reiterable = _is_factory(batches) or not isinstance(batches, _IteratorABC)
        fresh_pass = True
        method.train()
        tick = time.perf_counter()
        with runfolder.JsonlAppender(log_path) if world.is_main else contextlib.nullcontext() as log_file, \
                StopRequest(enabled=world.size == 1) as stop:  # SIGINT / SIGTERM: checkpoint, then stop
            while step < total:
                try:
                    raw = next(it)
                except StopIteration:
                    if not reiterable or fresh_pass:
                        if fresh_pass:
                            raise ValueError("batches yielded no batch") from None
                        log.warning("batches ran out after step %d of %d; stopping early", step, total)
                        break
                    it, epoch, fresh_pass = _open_batches(batches, step), epoch + 1, True
                    continue
                fresh_pass = False
                batch = Batch.from_any(raw).to(device, non_blocking=True)
                if not geometry_checked:  # a degenerate loss term fails before the first step (macl.settings.geometry)
                    views = [getattr(batch, v) for v in ("img1", "img3") if getattr(batch, v) is not None]
                    if views and not hasattr(method.model, "tapset"):  # tapped networks check their own shapes
                        require_valid_geometry(config.net, config.method, tuple(views[0].shape[2:]))
                    geometry_checked = True
                lr = opt.param_groups[0]["lr"]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    terms = model(batch)
                    loss = method.combine(terms)
                # averaged over the ranks: the global batch's terms, identical on every rank
                values = dict(zip(list(terms) + ["loss"], world.mean(torch.stack(
                    [t.detach().float() for t in terms.values()] + [loss.detach().float()])).tolist()))
                bad = next((k for k, v in values.items() if not math.isfinite(v)), None)
                if bad is not None:
                    if log_file is not None:
                        log_file.write(json.dumps({"step": step + 1, "event": "non_finite", "term": bad,
                                                   "value": str(values[bad]), "time": round(time.time(), 3)}) + "\n")
                    raise NonFiniteLossError(step + 1, bad, values[bad], last_good)
                if diag is not None and diag.due_grad(step + 1, world.size):  # each term's share of the encoder gradient
                    values.update(diag.grad_shares(method, terms, scaler.get_scale() if scaler.is_enabled() else 1.0))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.optim.grad_clip_norm is not None:
                    scaler.unscale_(opt)
                    gnorm = torch.nn.utils.clip_grad_norm_(method.parameters(), config.optim.grad_clip_norm)
                    values["grad_norm"] = float(gnorm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                logged = step % config.train.log_every == 0 or step == total
                if diag is not None:
                    values.update(diag.observe(step, method, values, logged and log_file is not None))
                dt = time.perf_counter() - tick
                record = {"step": step, "epoch": epoch, **values, "lr": lr, "step_time_s": dt,
                          "samples_per_s": batch.size * world.size / dt if dt > 0 else float("inf")}
                if log_file is not None and logged:
                    log_file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")  # unix s
                if config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and step < total:
                    if log_file is not None:
                        log_file.sync()  # the log reaches the disk before the checkpoint that vouches for it
                    checkpoint(os.path.join(ckpt_dir, f"step_{step:07d}.pt"))
                    checkpoint(latest)
                    last_good = latest
                if progress is not None:
                    progress(step, total, record)
                if stop.signum is not None and step < total:  # at most the current step was lost: none
                    if log_file is not None:
                        log_file.sync()
                    checkpoint(latest)
                    raise Interrupted(stop.signum, step, latest)
                tick = time.perf_counter()  # throughput counts data + compute, not checkpoints or callbacks
        verdicts = diag.verdicts() if diag is not None else []
        if verdicts and world.is_main:  # a resumed run that was already finished keeps its earlier file
            for v in verdicts:
                log.info("%s", v["line"])
            write_text_atomic(json.dumps({"verdicts": verdicts, "events": diag.events}, indent=1),
                              os.path.join(run_dir, "diagnostics.json"))
        final = os.path.join(ckpt_dir, "final.pt")
        if world.is_main:
            runfolder.fsync_file(log_path)
        checkpoint(final)
        checkpoint(latest)
        world.barrier()  # every rank returns once the final checkpoint exists
        return TrainResult(step, final, record, method, verdicts)
    finally:
        torch.use_deterministic_algorithms(prev_det[0], warn_only=prev_det[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_cudnn
