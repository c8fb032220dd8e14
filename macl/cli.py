"""The ``macl`` command line: ``macl pretrain | finetune | evaluate | predict | train-semi | demo | bench``.

Each command shows a progress bar with ETA (tqdm, on stderr), saves its resolved config in the run folder,
appends JSON lines to ``events.jsonl`` there (start, warnings, end or error), and on failure prints one line
``macl: error: ...`` and exits with a non-zero status (``--debug`` shows the traceback instead).
``python -m macl.cli`` works like ``macl``. Run ``macl COMMAND --help`` for every flag.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from macl.cli_output import Bars, EventLog, TqdmHandler

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130
#: errors whose message is shown as it is (others get their type name in front)
KNOWN_ERRORS = ("ValueError", "OSError", "KeyError", "FloatingPointError", "NonFiniteLossError", "MissingExtraError")


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(str(text).split())
    return text or type(exc).__name__


def _quiet_event(log: EventLog, kind: str, **fields: Any) -> None:
    """An event from the error path: a write failure there (a full disk) must not hide the real message."""
    try:
        log.event(kind, **fields)
    except OSError:
        pass


def _channel_list(text: str) -> list:
    try:
        values = [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected channel numbers >= 0 separated by commas, e.g. 0 or 0,1; "
                                         f"got {text!r}")
    return values


def _float_list(n: int):
    def parse(text: str) -> tuple:
        parts = [float(p) for p in text.replace(",", " ").split()]
        if len(parts) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return tuple(parts)
    return parse


def _preprocess_overrides(args: argparse.Namespace) -> dict:
    out = {}
    if args.spacing is not None:
        out["spacing"] = list(args.spacing)
    if args.ct_window is not None:
        out["ct_window"] = list(args.ct_window)
    if args.cache_dir is not None:
        out["cache_dir"] = str(args.cache_dir)
    if args.orientation is not None:
        out["orientation"] = None if args.orientation.lower() == "none" else args.orientation
    return out


# ------------------------------------------------------------------------------------------ commands
def cmd_pretrain(args: argparse.Namespace, log: EventLog, bars: Bars) -> int:
    from macl.settings.config import PretrainConfig
    from macl.workflow import RESOLVED, PretrainSpec, read_config_file, run_pretrain
    run = Path(args.out)
    spec = PretrainSpec(str(args.data), PretrainConfig())
    if args.resume is not None and (run / RESOLVED).is_file():  # continue with the run's own settings
        spec = PretrainSpec.from_dict(json.loads((run / RESOLVED).read_text()), data=str(args.data))
    sections = read_config_file(args.config) if args.config else {}
    flags = []
    for flag, key in (("method", "method.name"), ("preset", "method.preset"), ("dims", "net.dims"),
                      ("steps", "train.steps"),
                      ("lr", "optim.lr"), ("base_width", "net.base_width"), ("depth", "net.depth"),
                      ("norm", "net.norm"), ("seed", "train.seed"), ("seed", "data.seed"), ("device", "train.device"),
                      ("checkpoint_every", "train.checkpoint_every"), ("batch_size", "data.batch_size"),
                      ("views", "data.views"), ("slice_axis", "data.slice_axis"),
                      ("patches_per_volume", "data.patches_per_volume"), ("net", "net.arch"),
                      ("net_args", "net.arch_args")):
        value = getattr(args, flag)
        if value is not None:
            flags.append(f"{key}={value!r}")
    if args.patch_size is not None:
        flags.append(f"data.patch_size={list(args.patch_size)!r}")
    if args.meta_csv is not None:
        flags.append(f"data.meta_csv={str(args.meta_csv)!r}")
    if args.exclude_cases is not None:
        flags.append(f"data.exclude_cases={str(args.exclude_cases)!r}")
    if args.channels is not None:
        flags.append(f"data.channel={args.channels!r}")
    flags += [f"preprocess.{k}={v!r}" for k, v in _preprocess_overrides(args).items()]
    spec = spec.updated(sections, flags + list(args.set or []))
    spec.skip_bad = spec.skip_bad or args.skip_bad
    log.event("config", resolved=spec.to_dict())
    from macl.parallel import init_from_env, shutdown
    world = init_from_env(spec.config.train.device)  # a process group only under torchrun with WORLD_SIZE > 1
    try:
        out = run_pretrain(spec, run, resume=args.resume, progress=_tb(args, run, bars("pretrain"), "pretrain"), load_progress=bars("load"),
                           world=world)
    finally:
        shutdown(world)
    bars.close()
    if not world.is_main:
        return 0
    rec = out["record"]
    log.event("verdicts", verdicts=out.get("verdicts", []))
    log.event("done", step=out["step"], checkpoint=out["checkpoint"], weights=out["weights"],
              resumed_from=out["resumed_from"], last=rec)
    resumed = f" (resumed from {out['resumed_from']})" if out["resumed_from"] else ""
    loss = f", last loss {rec['loss']:.4f}" if "loss" in rec else ""
    print(f"pre-training done{resumed}: {out['step']} step{'s' if out['step'] != 1 else ''}{loss}, "
          f"{out['seconds']:.0f} s")
    for verdict in out.get("verdicts", []):
        print(f"  {verdict['line']}")
    print(f"weights for fine-tuning: {out['weights']}  (macl finetune --pretrained {shlex.quote(str(run))} ...)")
    return 0


RECIPE_FLAGS = ("freeze", "probe_steps", "warmup_steps", "pretrained_lr_scale", "bn_recalibrate", "val_fraction",
                "val_every", "spatial_aug", "foreground_prob")


def _recipe_flags(p: argparse.ArgumentParser) -> None:
    """`macl finetune`'s recipe flags (macl.nets.freeze, macl.nets.param_groups, macl.run.validation; docs/workflow.md)."""
    g = p.add_argument_group("recipe (docs/workflow.md, \"Fine-tuning recipes\")")
    g.add_argument("--freeze", choices=("none", "encoder", "encoder+decoder"), help="keep these pre-trained parts "
                   "fixed (parameters and BatchNorm statistics; default none)")
    g.add_argument("--probe", action="store_true", help="linear probe: --freeze encoder+decoder, BatchNorm "
                   "statistics re-estimated on 16 batches (--bn-recalibrate), only the 1x1 head trains")
    g.add_argument("--bn-recalibrate", type=int, metavar="N", help="re-estimate frozen BatchNorm statistics on N "
                   "batches of training crops first (default 0; --probe: 16)")
    g.add_argument("--probe-steps", type=int, metavar="N", help="linear-probe-then-fine-tune: train only the head "
                   "for N steps, then everything (default 0)")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up of the non-head layers after "
                   "--probe-steps (default 0)")
    g.add_argument("--pretrained-lr-scale", type=float, metavar="S", help="learning rate of pre-trained tensors = "
                   "--lr x S (default 1)")
    g.add_argument("--val-fraction", type=float, metavar="F", help="hold this fraction of the labelled cases out "
                   "for validation Dice every --val-every steps; the best step's model is kept (default 0: off)")
    g.add_argument("--val-cases", type=Path, metavar="FILE", help="validation case ids (training cases) instead")
    g.add_argument("--val-every", type=int, metavar="N", help="steps between validation checks (default 50)")
    g.add_argument("--spatial-aug", choices=("none", "monai"), help="monai: random rotation +-15 deg and scale "
                   "+-15%% (MONAI RandAffined, p 0.5) on top of mirroring (default none)")
    g.add_argument("--foreground-prob", type=float, metavar="P", help="share of crops centred on foreground "
                   "(default 0.33; 0: uniform crops as the public MACL code)")


def cmd_finetune(args: argparse.Namespace, log: EventLog, bars: Bars) -> int:
    from macl.settings.config import NetConfig
    from macl.data import PreprocessConfig, read_case_list
    from macl.finetune import FinetuneConfig
    from macl.train import resolve_device
    from macl.workflow import (format_summary, parse_value, patch_size, pretrained_net, run_finetune,
                               saved_finetune_settings)
    from macl.settings.net_args import compact_net
    saved = saved_finetune_settings(args.out)  # a rerun continues with the run's own settings (resume_guard)
    if saved is not None and args.pretrained is None:
        args.pretrained = saved["pretrained"]
    net = compact_net(pretrained_net(args.pretrained)) if args.pretrained else dict(saved["net"]) if saved else {}
    net.pop("in_channels", None)
    for key, flag in (("dims", "dims"), ("base_width", "base_width"), ("depth", "depth"), ("norm", "norm"),
                      ("arch", "net"), ("arch_args", "net_args")):
        if getattr(args, flag) is not None:
            net[key] = getattr(args, flag)
    kw: dict[str, Any] = {"device": str(resolve_device(args.device)), "skip_bad": args.skip_bad}
    for name in ("steps", "batch_size", "lr", "loss", "seed", "test_fraction", "checkpoint_every", "slice_axis",
                 *RECIPE_FLAGS):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.patch_size is not None:
        kw["patch_size"] = args.patch_size
    if args.channels is not None:
        kw["channels"] = args.channels
    if args.labels_fraction is not None:
        kw["labels_fraction"] = args.labels_fraction
    if args.labelled_cases is not None:
        kw["labelled_cases"] = read_case_list(args.labelled_cases)
    if args.test_cases is not None:
        kw["test_cases"] = read_case_list(args.test_cases)
    if args.val_cases is not None:
        kw["val_cases"] = read_case_list(args.val_cases)
    if args.probe:  # a linear probe: frozen encoder + decoder (statistics re-estimated), only the 1x1 head trains
        kw.update(freeze="encoder+decoder", bn_recalibrate=kw.get("bn_recalibrate") or 16)
    pre = _preprocess_overrides(args)
    fields = sorted(k for k in FinetuneConfig.__dataclass_fields__ if k not in ("preprocess", "dims"))
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants KEY=VALUE, net.KEY=VALUE or preprocess.KEY=VALUE, got {item!r}")
        if key.startswith("preprocess."):
            pre[key.split(".", 1)[1]] = parse_value(value)
        elif key.startswith("net."):
            net[key.split(".", 1)[1]] = parse_value(value)
        elif key in fields:
            kw[key] = parse_value(value)
        else:
            raise ValueError(f"unknown --set key {key!r}; known: {fields}, net.*, preprocess.*")
    for section, given, known in (("net", net, NetConfig.__dataclass_fields__),
                                  ("preprocess", pre, PreprocessConfig.__dataclass_fields__)):
        if set(given) - set(known):
            raise ValueError(f"unknown {section} setting(s) {sorted(set(given) - set(known))}; known: {sorted(known)}")
    if saved is not None:  # what is not given explicitly comes from the run folder
        base = {k: v for k, v in saved["finetune"].items() if k not in ("preprocess", "dims")}
        if "labels_fraction" in kw or "labelled_cases" in kw:
            base.pop("labels_fraction", None), base.pop("labelled_cases", None)
        kw, pre = {**base, **kw}, {**saved["finetune"].get("preprocess", {}), **pre}
    net.setdefault("dims", 2)
    NetConfig(**net)  # a bad network setting fails here, named
    kw["dims"] = int(net["dims"])
    kw["patch_size"] = patch_size(kw.get("patch_size"), kw["dims"])
    cfg = FinetuneConfig(preprocess=PreprocessConfig(**pre), **kw)
    log.event("config", net=net, finetune=cfg.to_dict(), pretrained=args.pretrained)
    from macl.parallel import init_from_env, shutdown
    world = init_from_env(cfg.device)  # a process group only under torchrun with WORLD_SIZE > 1
    try:
        out = run_finetune(str(args.data), args.out, cfg, net, pretrained=args.pretrained,
                           progress=_tb(args, args.out, bars("finetune"), "finetune"), evaluate_test=not args.no_evaluate, world=world)
    finally:
        shutdown(world)
    bars.close()
    if not world.is_main:
        return 0
    log.event("done", labelled=out["labelled"], test=out["test"], last_loss=out["last_loss"],
              loaded_pretrained=len(out["loaded_pretrained"]))
    init = f"{len(out['loaded_pretrained'])} pre-trained tensors" if args.pretrained else "from scratch"
    print(f"fine-tuning done ({init}, {len(out['labelled'])} labelled case(s): {', '.join(out['labelled'])}), "
          f"{out['seconds']:.0f} s")
    if out["summary"] is not None:
        print(format_summary(out["summary"]))
        print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace, log: EventLog, bars: Bars) -> int:
    from macl.data import read_case_list
    from macl.data.metrics import write_json_atomic
    from macl.workflow import format_summary, run_evaluate
    cases = read_case_list(args.cases) if args.cases else None
    if args.predictions is not None:   # masks from any tool, scored like a run's own predictions
        from macl.predict import evaluate_predictions
        out = args.summary or Path(args.predictions) / "summary.json"
        summary = evaluate_predictions(args.predictions, str(args.data), cases, run_dir=args.run, out=out,
                                       progress=bars("evaluate"), missing_as_empty=args.missing_as_empty)
        bars.close()
        log.event("done", foreground_mean=summary["foreground_mean"], n_cases=summary["n_cases"],
                  missing_predictions=summary["missing_predictions"])
        print(format_summary(summary))
        if summary["missing_predictions"]:
            print(f"{len(summary['missing_predictions'])} case(s) had no mask and were scored as empty (Dice 0): "
                  f"{', '.join(summary['missing_predictions'])}")
        print(f"summary: {out}")
        return 0
    if args.run is None:
        raise ValueError("give --run RUN (a fine-tuning run) or --predictions DIR (a folder of masks)")
    run = Path(args.run)
    summary = run_evaluate(run, str(args.data), cases, progress=bars("evaluate"))
    bars.close()
    write_json_atomic(run / "evaluate_config.json", {"run": str(run), "data": str(args.data), "cases": cases})
    log.event("done", foreground_mean=summary["foreground_mean"], n_cases=summary["n_cases"])
    print(format_summary(summary))
    print(f"summary: {run / 'summary.json'}")
    return 0


def cmd_predict(args: argparse.Namespace, log: EventLog, bars: Bars) -> int:
    from macl.data import read_case_list
    from macl.predict import predict_run
    cases = read_case_list(args.cases) if args.cases else None
    res = predict_run(args.run, str(args.data), args.out, cases, progress=bars("predict"), skip_bad=args.skip_bad)
    bars.close()
    written, skipped = res["written"], res["skipped"]
    log.event("done", n_masks=len(written), out=str(args.out), skipped=skipped)
    print(f"{len(written)} mask(s) written to {args.out} (each in its image's own space: shape, affine, spacing)")
    if skipped:
        print(f"skipped {len(skipped)} case(s) that could not be read: "
              + "; ".join(f"{s['case_id']} ({s['error']})" for s in skipped))
    return 0


def cmd_train_semi(args: argparse.Namespace, log: EventLog, bars: Bars) -> int:
    from macl.semi.loop import SemiConfig, train_semi
    from macl.workflow import parse_value
    d: dict = {}
    for flag, key in (("sampler", "sampler"), ("labels_fraction", "labels_fraction"), ("steps", "steps"),
                      ("batch_size", "batch_size"), ("dims", "dims"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            d[key] = value
    if args.labelled_cases is not None:
        from macl.data import read_case_list
        d["labelled_cases"] = read_case_list(args.labelled_cases)
    if args.patch_size is not None:
        sizes = list(args.patch_size)
        d["patch_size"] = sizes * (d.get("dims", 2) if len(sizes) == 1 else 1)
    for item in args.set or []:
        if "=" not in item:
            raise ValueError(f"--set wants KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        d[key] = parse_value(value)
    d = _semi_rerun_settings(Path(args.out), d, SemiConfig)
    cfg = SemiConfig.from_dict(d)
    log.event("config", resolved=cfg.to_dict())
    from macl.parallel import init_from_env, shutdown
    world = init_from_env(cfg.device)  # a process group only under torchrun with WORLD_SIZE > 1
    try:
        res = train_semi(str(args.data), args.out, cfg, progress=_tb(args, args.out, bars("train-semi"), "train-semi"), resume=True,
                         evaluate_test=not args.no_evaluate, world=world)
    finally:
        shutdown(world)
    bars.close()
    if not world.is_main:
        return 0
    log.event("done", last=res.last_record)
    print(f"ARCO ({cfg.sampler or 'default'} sampler) done: {res.run_dir}")
    if res.summary is not None:
        from macl.workflow import format_summary
        print(format_summary(res.summary))
    return 0


def _semi_rerun_settings(run: Path, given: dict, config_cls) -> dict:
    """A train-semi rerun of a run with a checkpoint continues with the checkpoint's settings: what is not given
    comes from it, and a given value that differs is refused in one line naming it (the semi-supervised loop
    accepts no change at all: ``macl.run.resume_guard`` with nothing safe)."""
    ckpt_path = run / "checkpoint_latest.pt"
    if not ckpt_path.is_file():
        return given
    from macl.run import folder as runfolder, resume_guard
    ckpt = runfolder.load_checkpoint_safe(ckpt_path)
    saved = dict(ckpt.get("config") or {})
    normalised = config_cls.from_dict(given).to_dict()
    explicit = {k: normalised[k] for k in given if k in normalised}
    resume_guard.resume_changes(run, {k: saved.get(k) for k in explicit}, explicit, safe=(), steps_key="steps",
                                done_step=int(ckpt.get("step", 0) or 0), schedule_fixed=False)
    return {**saved, **given}


def cmd_demo(args: argparse.Namespace, log: EventLog, bars: Bars) -> int:
    from macl.demo.pipeline import DemoConfig, run_demo
    cfg = DemoConfig.quick() if args.quick else DemoConfig.full()
    if args.seed is not None:
        cfg.seed = args.seed
    if args.preset is not None:
        cfg.preset = args.preset
    if args.threads is not None:
        cfg.threads = args.threads
    result = run_demo(args.out, cfg, progress=lambda stage, d, t, info=None: bars(stage)(d, t, info))
    bars.close()
    log.event("done", table=result["table_rows"], verdicts=result["verdicts"], seconds=result["seconds"])
    print(result["table"])
    print(f"figures: {', '.join(result['figures'])}" if result["figures"] else
          'figures: none (matplotlib is not installed; pip install "macl[demo]" for the PNGs)')
    print(f"total time: {result['seconds']:.0f} s")
    return 0


def _repo_with_benchmarks() -> Optional[Path]:
    """The source checkout holding ``benchmarks/sweep.py`` next to ``macl/``: from the package or the cwd."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "sweep.py").is_file() and (root / "macl_kernels").is_dir():
            return root
    return None


def cmd_bench(args: argparse.Namespace, log: EventLog, bars: Bars) -> int:
    root = _repo_with_benchmarks()
    if root is None:
        raise FileNotFoundError("`macl bench` runs benchmarks/sweep.py, which is not installed with the package: "
                                "run it from a source checkout (git clone ...; cd macl; macl bench)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    rest = [a for a in args.sweep_args if a != "--"]
    return subprocess.call([sys.executable, "-m", "benchmarks.sweep", *rest], cwd=str(root), env=env)


def _tb(args: argparse.Namespace, run, progress, tag: str):
    """The progress callback, writing TensorBoard scalars too with --tensorboard (rank 0 only)."""
    from macl.run.tensorboard_log import with_tensorboard
    on = bool(getattr(args, "tensorboard", False)) and os.environ.get("RANK", "0") == "0"
    return with_tensorboard(on, Path(run), progress, tag)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # closed or replaced streams
        return False


# ------------------------------------------------------------------------------------------ parser
def _net_flags(g) -> None:
    from macl.settings.net_args import json_object
    g.add_argument("--net", metavar="unet|monai:NAME", help="network: the built-in U-Net (default) or monai:BasicUNet, "
                   "monai:UNet, monai:DynUNet (docs/monai.md)")
    g.add_argument("--net-args", type=json_object, metavar="JSON", help="the MONAI network's arguments as a JSON "
                   "object, e.g. '{\"filters\": [32, 64, 128, 256]}' (spatial_dims, in_channels, out_channels: set by macl)")


def _common(p: argparse.ArgumentParser, tensorboard: bool = False) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice, one "
                   "per core; 1 is often faster for small networks or on a busy machine)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--verbose", action="store_true", help="show info messages on stderr, not only warnings")
    g.add_argument("--debug", action="store_true", help="on error, print the full traceback")
    if tensorboard:
        g.add_argument("--tensorboard", action="store_true", help="also log training scalars for TensorBoard "
                       "into RUN/tensorboard/ (needs pip install \"macl[tensorboard]\")")


def _preprocess_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pre-processing (applied per volume before sampling; cached with --cache-dir)")
    g.add_argument("--spacing", type=_float_list(3), metavar="X,Y,Z",
                   help="resample to this voxel size in mm (default: keep each volume's own spacing)")
    g.add_argument("--ct-window", type=_float_list(2), metavar="LO,HI",
                   help="clip intensities to this window before the z-score (CT; write it with '=' when LO is "
                   "negative: --ct-window=-160,240)")
    g.add_argument("--orientation", metavar="AXCODES", help="reorient to these axis codes (default RAS; 'none': keep)")
    g.add_argument("--cache-dir", type=Path, metavar="DIR", help="cache pre-processed volumes here (memory-mapped)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable volumes with a warning instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    from macl import __version__
    fmt = argparse.HelpFormatter
    ap = argparse.ArgumentParser(prog="macl", description="MACL: contrastive pre-training and few-label fine-tuning "
                                 "of segmentation U-Nets on folders of NIfTI volumes.",
                                 epilog="Run `macl COMMAND --help` for the flags of each command.")
    ap.add_argument("--version", action="version", version=f"macl {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("pretrain", formatter_class=fmt, help="self-supervised pre-training on all volumes",
                       description="Pre-train a U-Net encoder/decoder (MACL, PCL or SimCLR) on every volume of a data "
                       "set; labels are not used. Writes RUN/resolved_config.json, log.jsonl, events.jsonl, "
                       "checkpoints/ and pretrained_weights.pt. Settings: defaults < --config < flags < --set.")
    p.add_argument("--data", required=True, type=Path, metavar="PATH",
                   help="NIfTI folder, MSD/nnU-Net folder, or datalist .json")
    p.add_argument("--out", required=True, type=Path, metavar="RUN", help="run folder")
    p.add_argument("--method", metavar="macl|pcl|simclr|gcl", help="pre-training objective (default macl; any name "
                   "registered in macl.methods.METHODS works; gcl = GCL-style meta-label contrast, docs/gcl.md)")
    p.add_argument("--meta-csv", type=Path, metavar="FILE", help="gcl: per-volume attributes (CSV with a case_id "
                   "column) usable as meta-labels via --set method.meta_labels=position,volume,COLUMN")
    p.add_argument("--exclude-cases", type=Path, metavar="FILE", help="case ids (JSON list or one per line) not to "
                   "pre-train on, e.g. the test split of a later evaluation (default: every volume of --data)")
    p.add_argument("--preset", choices=("faithful", "robust"), help="faithful: the public MACL code; robust: BatchNorm "
                   "in the image heads and augmentations scaled to the crop (default robust; docs/macl_presets.md)")
    p.add_argument("--dims", type=int, choices=(2, 3), help="2: slices, 3: patches (default 2)")
    p.add_argument("--config", type=Path, metavar="FILE", help="settings file (.toml, .json, or .yaml with "
                   "pip install macl[yaml]) with sections net, method, optim, train, data, preprocess")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set method.threshold=0.05 --set data.crop='centre' (repeatable)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue an interrupted run: 'auto' = RUN's latest "
                   "checkpoint (a fresh run if there is none), or a checkpoint file; uses RUN's saved settings")
    g = p.add_argument_group("data and training (shortcuts for --set)")
    g.add_argument("--patch-size", type=int, nargs="+", metavar="N", help="crop size: one number or one per axis "
                   "(default 64; MACL: 128 at depth 4); MACL needs multiples of 2^(depth+2) and at least "
                   "2^(depth+3) so that its dominant bottleneck is 2 or more per axis")
    g.add_argument("--batch-size", type=int, metavar="N", help="samples per step (default 16)")
    g.add_argument("--steps", type=int, metavar="N", help="optimiser steps (default 1000)")
    g.add_argument("--lr", type=float, metavar="LR", help="initial SGD learning rate (default 0.01)")
    g.add_argument("--base-width", type=int, metavar="N", help="U-Net base width F (default 32)")
    _net_flags(g)
    g.add_argument("--depth", type=int, metavar="N", help="U-Net pooling stages (default 4)")
    g.add_argument("--norm", choices=("batch", "instance", "none"), help="normalisation layers (default batch)")
    g.add_argument("--views", choices=("code", "paper", "zscore"), help="view preset: the public code's (default), "
                   "the paper's, or zscore (the fine-tuning input's intensity scale; macl.data.views)")
    g.add_argument("--slice-axis", type=int, choices=(0, 1, 2), help="axis slices / positions are taken along (default 2)")
    g.add_argument("--channels", type=_channel_list, metavar="C[,C..]", help="image channels the network sees "
                   "(default: all channels of the data; fine-tuning from this run follows the choice)")
    g.add_argument("--patches-per-volume", type=int, metavar="N", help="3D: random patches per volume and epoch (default 8)")
    g.add_argument("--seed", type=int, metavar="N", help="seed of the network, the crops and the views (default 0)")
    g.add_argument("--device", help="auto (default: CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="write a checkpoint every N steps (default 500)")
    _preprocess_flags(p)
    _common(p, tensorboard=True)
    p.set_defaults(func=cmd_pretrain, folder="out")

    p = sub.add_parser("finetune", formatter_class=fmt, help="fine-tune a segmentation U-Net on the labelled few",
                       description="Fine-tune the segmentation U-Net on a label budget, from pre-trained weights or "
                       "from scratch, then evaluate it on held-out test cases (summary.json). Rerunning with the "
                       "same --out continues an interrupted run from its last checkpoint.")
    p.add_argument("--data", required=True, type=Path, metavar="PATH", help="data set with labels (MSD/nnU-Net folder, NIfTI folder "
                   "with a labels/ sub-folder, or datalist .json)")
    p.add_argument("--out", required=True, type=Path, metavar="RUN", help="run folder")
    p.add_argument("--pretrained", metavar="RUN_OR_FILE", help="a `macl pretrain` run folder, its "
                   "pretrained_weights.pt, or a checkpoint; the network settings are read from it")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--labels-fraction", type=float, metavar="F", help="use the labels of this fraction of the "
                        "training cases, chosen by --seed (default: all)")
    budget.add_argument("--labelled-cases", type=Path, metavar="FILE", help="use the labels of exactly these cases "
                        "(JSON list or one case id per line)")
    g = p.add_argument_group("split and training")
    g.add_argument("--test-fraction", type=float, metavar="F", help="fraction of labelled cases held out for testing "
                   "(default 0.2; unused when the data declare a split: a datalist's 'validation' list or an "
                   "nnU-Net splits_final.json, fold --set split_fold=N)")
    g.add_argument("--test-cases", type=Path, metavar="FILE", help="explicit test case ids instead of --test-fraction")
    g.add_argument("--dims", type=int, choices=(2, 3), help="2D slices or 3D patches (default: the pre-trained net's, else 2)")
    g.add_argument("--patch-size", type=int, nargs="+", metavar="N", help="training / sliding-window size (default 64)")
    g.add_argument("--steps", type=int, metavar="N", help="optimiser steps (default 1000)")
    g.add_argument("--batch-size", type=int, metavar="N", help="samples per step (default 10)")
    g.add_argument("--lr", type=float, metavar="LR", help="initial Adam learning rate (default 5e-4)")
    g.add_argument("--loss", choices=("dice_ce", "ce"), help="Dice + cross-entropy (default) or cross-entropy")
    g.add_argument("--slice-axis", type=int, choices=(0, 1, 2), help="2D: axis slices are taken along (default 2)")
    g.add_argument("--channels", type=_channel_list, metavar="C[,C..]", help="image channels to use (default: "
                   "the pre-training run's choice, else all channels of the data)")
    g.add_argument("--seed", type=int, metavar="N", help="seed of the split, the label selection and training (default 0)")
    g.add_argument("--base-width", type=int, metavar="N", help="U-Net base width F (default: the pre-trained net's, else 32)")
    _net_flags(g)
    g.add_argument("--depth", type=int, metavar="N", help="U-Net pooling stages (default: the pre-trained net's, else 4)")
    g.add_argument("--norm", choices=("batch", "instance", "none"), help="normalisation (default: pre-trained net's)")
    g.add_argument("--device", default="auto", help="auto (default: CUDA when available, else CPU), cpu, cuda, ...")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps (default 200)")
    g.add_argument("--no-evaluate", action="store_true", help="do not evaluate on the test cases at the end")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="any FinetuneConfig field, e.g. "
                   "--set foreground_prob=0.5, or preprocess.KEY=VALUE (repeatable)")
    _recipe_flags(p)
    _preprocess_flags(p)
    _common(p, tensorboard=True)
    p.set_defaults(func=cmd_finetune, folder="out")

    p = sub.add_parser("evaluate", formatter_class=fmt, help="score a fine-tuned run: Dice and HD95 -> summary.json",
                       description="Predict the test cases of a fine-tuning run (or --cases) with its final model "
                       "and write RUN/summary.json (per case and class: Dice, HD95 in mm; means).")
    p.add_argument("--run", type=Path, help="a `macl finetune` run folder (with --predictions: take its test cases, "
                   "pre-processing and class names)")
    p.add_argument("--data", required=True, type=Path, metavar="PATH", help="the data set the run was fine-tuned on")
    p.add_argument("--cases", type=Path, metavar="FILE", help="evaluate these labelled cases instead of the run's test split")
    p.add_argument("--predictions", type=Path, metavar="DIR", help="score the masks in DIR instead (<case_id>.nii.gz "
                   "from any tool, in each image's own space) -> DIR/summary.json")
    p.add_argument("--summary", type=Path, metavar="FILE", help="with --predictions: where to write the summary")
    p.add_argument("--missing-as-empty", action="store_true", help="with --predictions: score a case without a "
                   "mask as an empty mask (Dice 0) and list it, instead of stopping with an error naming it")
    _common(p)
    p.set_defaults(func=cmd_evaluate, folder="run")

    p = sub.add_parser("predict", formatter_class=fmt, help="segment volumes with a fine-tuned run -> NIfTI masks",
                       description="Segment every case of --data (or --cases) with a fine-tuning run's final model "
                       "and write OUT/<case_id>.nii.gz, each in its image's own space (shape, affine, spacing and "
                       "header of the input file).")
    p.add_argument("--run", required=True, type=Path, help="a `macl finetune` run folder")
    p.add_argument("--data", required=True, type=Path, metavar="PATH", help="NIfTI folder, MSD/nnU-Net folder, or "
                   "datalist .json")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the masks")
    p.add_argument("--cases", type=Path, metavar="FILE", help="only these case ids (JSON list or one per line)")
    p.add_argument("--skip-bad", action="store_true", help="skip a case whose image cannot be read (truncated, "
                   "NaN, ...) with a warning and a summary line, instead of stopping at it")
    _common(p)
    p.set_defaults(func=cmd_predict, folder=None)

    p = sub.add_parser("train-semi", formatter_class=fmt, help="semi-supervised segmentation (ARCO)",
                       description="ARCO (mean teacher, variance-reduced pixel contrast): train a segmentation U-Net "
                       "on the labelled fraction and the unlabelled rest of a data set, then evaluate on held-out "
                       "cases. Rerunning the same command continues from RUN's checkpoint.")
    p.add_argument("--data", required=True, type=Path, metavar="PATH", help="NIfTI folder, MSD/nnU-Net folder, or datalist .json")
    p.add_argument("--out", required=True, type=Path, metavar="RUN", help="run folder")
    p.add_argument("--method", choices=("arco",), default="arco", help="the semi-supervised method (arco)")
    p.add_argument("--sampler", choices=("sg", "sag", "ns", "index_sg", "index_sag", "all"),
                   help="anchor/negative sampling: stratified (sg), stratified antithetic (sag), naive (ns), the public "
                   "code's index grid (index_*), or all anchors against the whole bank (default: sg in 2D, sag in 3D)")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--labels-fraction", type=float, metavar="F", help="fraction of training cases whose labels are used")
    lab.add_argument("--labelled-cases", type=Path, metavar="FILE", help="case ids (one per line) whose labels are used")
    p.add_argument("--dims", type=int, choices=(2, 3), help="2D slices or 3D patches (default 2)")
    p.add_argument("--patch-size", type=int, nargs="+", metavar="N", help="crop size, one number or one per axis")
    p.add_argument("--steps", type=int, metavar="N", help="optimiser steps (default 1000)")
    p.add_argument("--batch-size", type=int, metavar="N", help="labelled images per step (default 4)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of split and training (default 0)")
    p.add_argument("--no-evaluate", action="store_true", help="do not evaluate on the test cases at the end")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any SemiConfig field (macl/semi/loop.py), "
                   "e.g. --set lambda_contrast=0.1 (repeatable)")
    _common(p, tensorboard=True)
    p.set_defaults(func=cmd_train_semi, folder="out")

    p = sub.add_parser("demo", formatter_class=fmt, help="the built-in demo on generated phantom data (no download)",
                       description="Generate phantom volumes with labels, pre-train MACL on the training volumes "
                       "(test volumes held out, labels unused), fine-tune a 2D U-Net with the labels of the same few "
                       "volumes from the pre-trained weights and from scratch, evaluate both on the test volumes, "
                       "print a Dice table and write PNGs (loss curves, Dice per class, a prediction overlay) into "
                       "--out, with mean +- std over 5 seeds, wins, paired p-values and a verdict per pre-training loss term. "
                       "About 8 minutes on 2 idle CPU cores, much longer on a busy machine (--quick: 1-2); runs on one "
                       "CPU thread unless --threads says otherwise. Rerunning into the same --out reuses what is "
                       "finished.")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: macl_demo, or macl_demo_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a smaller, shorter version (a smoke test, not a fair comparison)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of data, split and training (default 0)")
    p.add_argument("--preset", choices=("faithful", "robust"), help="MACL preset for pre-training (default robust; "
                   "faithful: the public code, whose L_g collapses at the demo's size)")
    _common(p)
    p.set_defaults(func=cmd_demo, folder="out")

    if _repo_with_benchmarks() is None:   # an installed copy: no benchmarks/, no `bench` (main() says why)
        return ap
    p = sub.add_parser("bench", help="the benchmark sweep (source checkout only)", add_help=True,
                       description="Runs `python -m benchmarks.sweep` of the source checkout with the remaining "
                       "arguments, e.g. `macl bench --preset quick`. See `python -m benchmarks.sweep --help`.")
    p.add_argument("sweep_args", nargs=argparse.REMAINDER, help="arguments for benchmarks.sweep")
    p.set_defaults(func=cmd_bench, folder=None, no_progress=True, verbose=False, debug=False, threads=None)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from macl.extras import command_problem
    problem = command_problem(argv[0]) if argv else None
    wants_help = bool(set(argv[1:]) & {"-h", "--help"})
    if problem and not wants_help:   # a workflow command without its extra: one line
        print(f"macl: error: {problem}", file=sys.stderr)
        return EXIT_ERROR
    if problem:   # the help needs no extra; it ends saying what the command needs to run
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            print(f"\nnote: {problem}")
            return int(e.code or 0)
    parser = build_parser()
    if argv[:1] == ["bench"] and (not set(argv[1:2]) & {"-h", "--help"} or _repo_with_benchmarks() is None):
        args = argparse.Namespace(command="bench", func=cmd_bench, folder=None, no_progress=True, verbose=False,
                                  debug="--debug" in argv, sweep_args=argv[1:])
    else:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, usage errors: argparse printed the message
            return int(e.code or 0)
    if args.command == "demo" and args.out is None:
        args.out = Path("macl_demo_quick" if args.quick else "macl_demo")
    folder = getattr(args, args.folder) if args.folder else None
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes events and draws bars
    log = EventLog(Path(folder) if folder is not None and main_rank else None, args.command)
    console = TqdmHandler(logging.INFO if args.verbose else logging.WARNING if main_rank else logging.ERROR)
    pkg = logging.getLogger("macl")
    old_level = pkg.level
    pkg.setLevel(logging.INFO)
    pkg.addHandler(log)
    pkg.addHandler(console)
    # bars only into a terminal: redirected stderr (a log file, CI) gets the event lines, not carriage returns
    bars = Bars(enabled=not args.no_progress and main_rank and _isatty(sys.stderr), on_update=log.sync)  # lines wait until the run folder exists
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            print(f"macl: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return EXIT_ERROR
        import torch
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lock = None
    try:
        if folder is not None and main_rank:  # one writer per run folder; stale temporary files go first
            from macl.run import folder as runfolder
            lock = runfolder.RunLock(Path(folder), args.command, create=args.command != "evaluate").acquire()
            runfolder.clean_temp(folder)
            runfolder.repair_tail(Path(folder) / "events.jsonl")
        log.event("start", argv=argv, cwd=os.getcwd())
        from macl.run.signals import sigterm_as_interrupt
        with sigterm_as_interrupt():  # SIGTERM ends the command like Ctrl-C: an "interrupted" event, not silence
            status = args.func(args, log, bars)
        log.event("end", status=status, seconds=round(time.perf_counter() - t0, 3))
        return status
    except KeyboardInterrupt as e:
        bars.close()
        import signal as _signal
        signum = int(getattr(e, "signum", _signal.SIGINT))
        where = {k: getattr(e, k) for k in ("step", "checkpoint") if getattr(e, k, None) is not None}
        _quiet_event(log, "interrupted", signal=_signal.Signals(signum).name,
                     seconds=round(time.perf_counter() - t0, 3), **where)
        saved = f" after step {where['step']}; checkpoint {where['checkpoint']}" if "step" in where else ""
        print(f"macl: interrupted by {_signal.Signals(signum).name}{saved}", file=sys.stderr)
        return EXIT_INTERRUPTED if signum == _signal.SIGINT else 128 + signum
    except Exception as e:  # every failure ends in one line (the traceback only with --debug)
        bars.close()
        from macl.run.folder import error_message
        known = any(c.__name__ in KNOWN_ERRORS for c in type(e).__mro__)
        message = error_message(e) or (_one_line(e) if known else f"{type(e).__name__}: {_one_line(e)}")
        _quiet_event(log, "error", type=type(e).__name__, message=message, traceback=traceback.format_exc())
        if args.debug:
            traceback.print_exc()
        print(f"macl: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if lock is not None:
            lock.release()
        pkg.removeHandler(log)
        pkg.removeHandler(console)
        pkg.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
