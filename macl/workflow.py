"""The researcher's workflow as three calls: pre-train on a data folder, fine-tune, evaluate.

What the ``macl`` command line runs (``macl.cli`` adds argument parsing, progress bars, logs and
error messages on top; ``macl.demo`` chains the three). Library code: progress is reported through
callables ``progress(done, total, info)``, diagnostics through :mod:`logging`, nothing is printed.

Run folders:

- pre-training (``run_pretrain``): ``resolved_config.json`` (the data settings, the pre-processing and
  the ``PretrainConfig``), plus what :func:`macl.train.pretrain` writes (``config.json``, ``log.jsonl``,
  ``checkpoints/``) and ``pretrained_weights.pt`` (the exported encoder/decoder) at the end.
- fine-tuning (``run_finetune``): ``resolved_config.json`` (the network, the ``FinetuneConfig``, the
  pre-trained source), plus what :func:`macl.finetune.finetune` writes (``finetune_config.json``,
  ``split.json``, ``labelled_cases.json``, ``finetune_log.jsonl``, checkpoints, ``model_final.pt``,
  ``summary.json``).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from macl.run import folder as runfolder
from macl.run import resume_guard
from macl.run.rerun_checks import check_finetune_rerun, resume_point
from macl.settings.config import NetConfig, PretrainConfig, apply_overrides, from_dict, to_dict
from macl.settings.fields import coerce, require_yaml
from macl.data import (DataError, PreprocessConfig, PretrainDataConfig, PretrainDataset, ViewConfig,
                       batches_from_step, batches_per_epoch, load_volumes, open_dataset)
from macl.data.metrics import write_json_atomic
from macl.settings.geometry import min_patch, require_valid_geometry
from macl.parallel import SINGLE, World
from macl.settings.presets import check_reference_size, resolve_reference_size, stored_config

logger = logging.getLogger(__name__)
Progress = Callable[[int, int, dict], None]
RESOLVED = "resolved_config.json"
WEIGHTS = "pretrained_weights.pt"
DATA_KEYS = ("batch_size", "patch_size", "slice_axis", "crop", "channel", "patches_per_volume",
             "position_axes", "views", "seed", "meta_csv",  # meta_csv: GCL per-volume attributes
             "exclude_cases",  # case ids (or a case-list file) pre-training must not read, e.g. a benchmark's test split
             "reference_size")  # augmentation magnitudes' image size: None (the preset's), "crop" or pixels (512)


def parse_value(text: str) -> Any:
    """A ``--set`` value: a Python literal where possible ("3", "(64, 64)", "none", "true"), else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_config_file(path: str | os.PathLike) -> dict:
    """Nested dict from a .toml, .json or .yaml/.yml file.

    Raises:
        FileNotFoundError: no such file. ValueError: another extension or unparsable content.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    ext = p.suffix.lower()
    if ext in (".yaml", ".yml"):
        require_yaml(p)  # the optional extra macl[yaml]: a one-line error when it is missing
    try:
        if ext == ".toml":
            from macl.settings.toml_compat import loads  # tomllib, or tomli on Python < 3.11
            data = loads(p.read_text())
        elif ext == ".json":
            data = json.loads(p.read_text())
        elif ext in (".yaml", ".yml"):
            import yaml  # optional dependency
            data = yaml.safe_load(p.read_text()) or {}
        else:
            raise ValueError(f"config file must end in .toml, .json, .yaml or .yml, got {p}")
    except (ValueError, SyntaxError) as e:  # TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"{p}: cannot parse config ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{p}: config must be a mapping of sections")
    return data


def _check_keys(section: str, values: Mapping[str, Any], known: Sequence[str]) -> None:
    bad = sorted(set(values) - set(known))
    if bad:
        raise ValueError(f"unknown key(s) {bad} in section {section!r}; known: {sorted(known)}")


# -------------------------------------------------------------------------------------- pre-training
@dataclass
class PretrainSpec:
    """Everything a pre-training run needs: the data, how to sample it, and the ``PretrainConfig``.

    ``data``: the data set path. ``sampling``: :class:`PretrainDataConfig` fields except ``dims`` (taken
    from ``config.net.dims``) and ``views`` (here a preset name, "code" or "paper"); ``batch_size``;
    ``preprocess``: :class:`PreprocessConfig` fields; ``skip_bad``: skip unreadable volumes.
    """

    data: str
    config: PretrainConfig = field(default_factory=PretrainConfig)
    sampling: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    skip_bad: bool = False

    def __post_init__(self) -> None:
        self.sampling = {"batch_size": 16, "patch_size": None, "views": "code", "meta_csv": None,
                         "reference_size": None, "exclude_cases": None, **dict(self.sampling)}
        _check_keys("data", self.sampling, DATA_KEYS)
        self.sampling["batch_size"] = coerce(self.sampling["batch_size"], int, "data.batch_size")
        check_reference_size(self.sampling["reference_size"])
        _check_keys("preprocess", self.preprocess, [f.name for f in dataclasses.fields(PreprocessConfig)])
        if int(self.sampling["batch_size"]) < 2:
            raise ValueError(f"data.batch_size must be >= 2 (contrastive losses need negatives), "
                             f"got {self.sampling['batch_size']}")

    def data_config(self) -> PretrainDataConfig:
        """The sampling settings as a :class:`PretrainDataConfig` (patch size defaulted by dims)."""
        dims = self.config.net.dims
        kw = {k: v for k, v in self.sampling.items() if k not in ("batch_size", "views", "meta_csv", "reference_size",
                                                                    "exclude_cases")}
        kw["patch_size"] = patch_size(kw.get("patch_size"), dims, self.default_patch())
        views = ViewConfig.from_preset(self.sampling["views"])
        views.spatial.reference_size = resolve_reference_size(self.sampling["reference_size"],
                                                              self.config.method.preset)
        return PretrainDataConfig(dims=dims, views=views, **kw)

    def default_patch(self) -> int:
        """The patch side used when none is given: 64, or for MACL the smallest non-degenerate side when that is
        larger (128 at depth 4: 64 would leave a 1x1 dominant bottleneck, see :mod:`macl.settings.geometry`)."""
        m, net = self.config.method, self.config.net
        if m.name != "macl":
            return 64
        return max(64, min_patch(net.depth, m.decoder_blocks, m.lambda_er > 0, m.lambda_d > 0))

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(**self.preprocess)

    def to_dict(self) -> dict:
        """Plain JSON: {"data": {...every sampling setting...}, "preprocess": {...}, "pretrain": {...}}."""
        dcfg = self.data_config()
        sampling = {f.name: getattr(dcfg, f.name) for f in dataclasses.fields(dcfg) if f.name != "views"}
        data = {"path": str(self.data), "skip_bad": self.skip_bad, "batch_size": self.sampling["batch_size"],
                "views": self.sampling["views"], "meta_csv": self.sampling.get("meta_csv"),
                "exclude_cases": self.sampling.get("exclude_cases"),
                "reference_size": self.sampling["reference_size"], **sampling}
        return json.loads(json.dumps({"data": data, "preprocess": dataclasses.asdict(self.preprocess_config()),
                                      "pretrain": to_dict(self.config)}))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], data: Optional[str] = None) -> "PretrainSpec":
        """Inverse of :meth:`to_dict` (``data`` replaces the stored path when given)."""
        sampling = dict(d.get("data") or {})
        path = sampling.pop("path", None)
        skip = bool(sampling.pop("skip_bad", False))
        sampling.pop("dims", None)
        pretrain = stored_config(dict(d.get("pretrain") or {}))  # a run from before the presets: faithful
        return cls(data or path, from_dict(pretrain), sampling, dict(d.get("preprocess") or {}), skip)

    def updated(self, file_sections: Optional[Mapping[str, Any]] = None, overrides: Sequence[str] = ()) -> "PretrainSpec":
        """A copy with a config file's sections (net, method, optim, train, data, preprocess) merged in,
        then ``section.key=value`` overrides applied.

        Raises:
            ValueError: unknown section or key (named), malformed override, bad value.
        """
        d = self.to_dict()
        for section, values in (file_sections or {}).items():
            if section not in ("data", "preprocess", "net", "method", "optim", "train"):
                raise ValueError(f"unknown config section {section!r}; expected net, method, optim, train, data, "
                                 f"preprocess")
            target = d["pretrain"][section] if section in d["pretrain"] else d[section]
            target.update(dict(values or {}))
        rest = []
        for item in overrides:
            if "=" not in item or item.split("=", 1)[0].count(".") != 1:
                raise ValueError(f"--set wants section.key=value, got {item!r}")
            dotted, value = item.split("=", 1)
            section, key = dotted.split(".")
            if section in ("data", "preprocess"):
                d[section][key] = parse_value(value)
            else:
                rest.append(item)
        spec = PretrainSpec.from_dict(d)
        if rest:
            spec.config = apply_overrides(spec.config, rest)
        return spec


def patch_size(value: Any, dims: int, default: int = 64) -> tuple[int, ...]:
    """Patch size for ``dims``: None -> ``default`` per axis; one number -> repeated; else exactly ``dims`` numbers."""
    if value is None:
        return (int(default),) * dims
    sizes = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(sizes) == 1:
        sizes = sizes * dims
    if len(sizes) != dims or min(sizes) < 1:
        raise ValueError(f"patch size must be 1 or {dims} positive numbers for dims={dims}, got {value}")
    return tuple(sizes)


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` already holds a pre-training checkpoint (``checkpoints/latest.pt``)."""
    return (Path(run_dir) / "checkpoints" / "latest.pt").is_file()


def _dry_run(spec: PretrainSpec, ds: PretrainDataset) -> None:
    """One forward pass on two samples (eval mode, no grad): a patch size the network cannot take, or another
    setting the method rejects, fails here, before the run folder is written."""
    from macl.methods import Batch, build_method
    method = build_method(spec.config.net, spec.config.method).eval()
    with torch.no_grad():
        method(Batch.from_any(ds.get_batch([0, min(1, len(ds) - 1)])))


#: pre-training settings a resume may change (resolved_config.json keys; see macl.run.resume_guard)
PRETRAIN_SAFE = ("pretrain.train.log_every", "pretrain.train.checkpoint_every", "pretrain.train.device",
                 "data.skip_bad", "preprocess.cache_dir")


def _pretrain_resume_history(spec: PretrainSpec, run: Path, point: Optional[tuple[str, int]]) -> list:
    """The ``resumes`` list of resolved_config.json after this resume, with its accepted (safe) changes logged.

    Raises:
        ValueError: a trajectory setting differs from the run's (see :func:`macl.run.resume_guard.resume_changes`).
    """
    if point is None or not (run / RESOLVED).is_file():
        return []
    raw = json.loads((run / RESOLVED).read_text())
    optim = spec.config.optim
    return resume_guard.resume_history(  # saved: normalised like the new settings (stored presets, defaults)
        run, raw, PretrainSpec.from_dict(raw).to_dict(), spec.to_dict(), done_step=point[1], checkpoint=point[0],
        safe=PRETRAIN_SAFE, steps_key="pretrain.train.steps", schedule_fixed=optim.min_lr == optim.lr,
        paths=("data.path", "data.meta_csv"), strip="pretrain.")


def run_pretrain(spec: PretrainSpec, run_dir: str | os.PathLike, resume: Optional[str] = None,
                 progress: Optional[Progress] = None, load_progress: Optional[Progress] = None,
                 world: Optional[World] = None) -> dict:
    """Load the data, pre-train, export the weights.

    The data are read and checked before anything is written to ``run_dir``. ``resume``: None (a fresh run;
    refused when ``run_dir`` holds checkpoints), "auto" or a checkpoint path (see :func:`macl.train.pretrain`).
    ``world``: under torchrun (:func:`macl.parallel.init_from_env`), every rank calls this; ``data.batch_size``
    is the global batch, each rank trains on its share, and only rank 0 writes into ``run_dir``.

    Returns:
        {"step", "checkpoint", "weights", "record", "resumed_from", "seconds"}.

    Raises:
        DataError: bad data (named file). ValueError: bad settings, or a fresh run into a folder with
        checkpoints. FileNotFoundError: a resume checkpoint that does not exist. NonFiniteLossError.
    """
    from macl.train import export_weights, pretrain, resolve_device
    world = world or SINGLE
    t0 = time.perf_counter()
    run = Path(run_dir)
    resolve_device(spec.config.train.device)  # an unavailable device fails before anything is read or written
    if resume is None and has_checkpoint(run):
        raise ValueError(f"{run} already holds checkpoints; pass --resume auto to continue it or choose a new --out")
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise FileNotFoundError(f"checkpoint to resume not found: {resume}")
    dcfg = spec.data_config()
    require_valid_geometry(spec.config.net, spec.config.method, dcfg.patch_size)  # before reading any volume
    index = open_dataset(spec.data)
    unlabelled = dataclasses.replace(index, cases=[dataclasses.replace(c, label=None) for c in index.cases])
    volumes = load_volumes(unlabelled, spec.preprocess_config(), skip_bad=spec.skip_bad,  # labels are not used,
                           progress=load_progress,                                        # nor read or checked
                           cases=_kept_cases(unlabelled, spec.sampling.get("exclude_cases")))
    if spec.config.method.name == "gcl":  # GCL's positives come from meta-labels the batches must carry
        from macl.data.metalabels import MetaLabelDataset, read_attributes_csv
        meta_csv = spec.sampling.get("meta_csv")
        ds = MetaLabelDataset(volumes, dcfg, spec.config.method.meta_labels,
                              read_attributes_csv(meta_csv) if meta_csv else None)
    else:
        ds = PretrainDataset(volumes, dcfg)
    bs = int(spec.sampling["batch_size"])
    if batches_per_epoch(ds, bs) < 1:
        raise ValueError(f"batch size {bs} is larger than the {len(ds)} samples per epoch of {index.root}")
    world.shard(bs)  # a global batch that does not split evenly over the ranks fails here, on every rank
    from macl.data.channels import count as channel_count
    channels = channel_count(dcfg.channel, volumes[0].image.shape[0])  # default: every channel of the data
    if spec.config.net.in_channels != channels:
        logger.info("net.in_channels set to %d to match the data", channels)
        spec.config.net = dataclasses.replace(spec.config.net, in_channels=channels)
    _dry_run(spec, ds)
    point = resume_point(spec.config, run, resume)  # net / method settings that contradict the checkpoint fail here
    resumed_from = None if point is None else point[0]
    history = _pretrain_resume_history(spec, run, point)  # and so does any other trajectory setting
    world.barrier()  # every rank has checked run_dir before rank 0 writes into it
    if world.is_main:
        run.mkdir(parents=True, exist_ok=True)
        resolved = spec.to_dict()
        if history:
            resolved["resumes"] = history
        resolved["data_summary"] = {"source": index.source, "root": str(index.root), "n_volumes": len(volumes),
                                    "n_cases_listed": len(index.cases), "samples_per_epoch": len(ds),
                                    "batches_per_epoch": batches_per_epoch(ds, bs),
                                    "views": json.loads(json.dumps(dataclasses.asdict(dcfg.views)))}
        resolved["world_size"] = world.size
        write_json_atomic(run / RESOLVED, resolved)
    result = pretrain(spec.config, functools.partial(batches_from_step, ds, bs, world=world), str(run),
                      resume=resumed_from, progress=progress, world=world)  # pretrain drops progress off rank 0
    weights = run / WEIGHTS
    if world.is_main:
        export_weights(result.checkpoint, str(weights))
    return {"step": result.step, "checkpoint": result.checkpoint, "weights": str(weights), "record": result.record,
            "resumed_from": resumed_from, "seconds": time.perf_counter() - t0, "verdicts": result.verdicts}


def _kept_cases(index, exclude: Any) -> Optional[list]:
    """The cases of ``index`` minus ``exclude`` (case ids, or a case-list file: macl.data.read_case_list); None:
    all. Raises ValueError naming excluded ids the data set does not have, or when nothing is left."""
    if not exclude:
        return None
    from macl.data import read_case_list
    ids = read_case_list(exclude) if isinstance(exclude, (str, os.PathLike)) else [str(c) for c in exclude]
    known = {c.case_id for c in index.cases}
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"data.exclude_cases names cases {index.root} does not have: {unknown[:10]}")
    kept = [c for c in index.cases if c.case_id not in set(ids)]
    if not kept:
        raise ValueError(f"data.exclude_cases leaves no case of {index.root} to pre-train on")
    logger.info("pre-training on %d of %d cases (%d excluded)", len(kept), len(index.cases), len(ids))
    return kept


# -------------------------------------------------------------------------------------- fine-tuning
def pretrained_net(source: str | os.PathLike) -> dict:
    """The backbone description (NetConfig dict) of a pre-training run folder, exported weights or checkpoint.

    Raises:
        FileNotFoundError: nothing usable at ``source``. ValueError: a file without a network description.
    """
    p = Path(source)
    if p.is_dir():
        if (p / "config.json").is_file():
            return dict(json.loads((p / "config.json").read_text())["config"]["net"])
        if (p / WEIGHTS).is_file():
            p = p / WEIGHTS
        else:
            raise FileNotFoundError(f"{p} is not a pre-training run folder (no config.json or {WEIGHTS})")
    if not p.is_file():
        raise FileNotFoundError(f"pre-trained weights not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable / not a torch file
        raise ValueError(f"{p}: cannot read pre-trained weights ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("net"), Mapping) and obj["net"]:
        return dict(obj["net"])
    from macl.nets.api import sidecar_net  # a MONAI / user network's weights: a plain state dict, .json beside it
    if sidecar_net(p) is not None:
        return sidecar_net(p)
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and "net" in obj["config"]:
        return dict(obj["config"]["net"])
    raise ValueError(f"{p} holds no network description ('net'); pass --base-width/--depth/--norm/--dims yourself")


def pretrained_source(source: str | os.PathLike) -> Path:
    """The file to load pre-trained weights from: a run folder's exported weights (or its checkpoint)."""
    p = Path(source)
    if p.is_dir():
        if (p / WEIGHTS).is_file():
            return p / WEIGHTS
        ckpt = p / "checkpoints" / "final.pt"
        if not ckpt.is_file():
            ckpt = p / "checkpoints" / "latest.pt"
            if ckpt.is_file():
                logger.warning("%s: pre-training is unfinished; using its latest checkpoint %s", p, ckpt)
        if not ckpt.is_file():
            raise FileNotFoundError(f"{p} holds neither {WEIGHTS} nor a checkpoint")
        return ckpt
    if not p.is_file():
        raise FileNotFoundError(f"pre-trained weights not found: {p}")
    return p


def model_factory(net: Mapping[str, Any]) -> Callable[[int, int], torch.nn.Module]:
    """``factory(in_channels, num_classes)`` building the fine-tuning U-Net of backbone ``net``."""
    from macl.nets import build_finetune_net
    base = {k: v for k, v in dict(net).items() if k != "in_channels"}
    NetConfig(**base)  # validate now

    def factory(in_channels: int, num_classes: int) -> torch.nn.Module:
        return build_finetune_net(NetConfig(in_channels=in_channels, **base), num_classes)
    return factory


#: fine-tuning settings a rerun of a started run may change (resolved_config.json keys; macl.run.resume_guard)
FINETUNE_SAFE = ("finetune.log_every", "finetune.checkpoint_every", "finetune.device", "finetune.skip_bad",
                 "finetune.preprocess.cache_dir")


def saved_finetune_settings(run_dir: str | os.PathLike) -> Optional[dict]:
    """The saved settings (resolved_config.json) of a fine-tuning run that has trained (a checkpoint or a final
    model), which a rerun continues; None for a folder without one (a fresh start takes any settings)."""
    run = Path(run_dir)
    if not ((run / "checkpoint_latest.pt").is_file() or (run / "model_final.pt").is_file()):
        return None
    try:
        saved = json.loads((run / RESOLVED).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "finetune" in saved and "net" in saved else None


def _finetune_resume_history(run: Path, resolved: dict, cfg) -> list:
    """The ``resumes`` list of a fine-tuning rerun's resolved_config.json, its accepted changes logged.

    Raises:
        ValueError: a trajectory setting differs from the run's (:func:`macl.run.resume_guard.resume_changes`).
    """
    saved = saved_finetune_settings(run)
    if saved is None:
        return []
    done = int(saved["finetune"].get("steps", 0))
    if (run / "checkpoint_latest.pt").is_file():
        done = int(runfolder.load_checkpoint_safe(run / "checkpoint_latest.pt").get("step", done))
    keys = [k for k in resolved if k != "resumes"]
    return resume_guard.resume_history(run, saved, {k: saved.get(k) for k in keys}, {k: resolved[k] for k in keys},
                                       done_step=done, safe=FINETUNE_SAFE, steps_key="finetune.steps",
                                       schedule_fixed=cfg.min_lr == cfg.lr, paths=("data", "pretrained"),
                                       strip="finetune.")


def run_finetune(data: str, run_dir: str | os.PathLike, cfg, net: Mapping[str, Any],
                 pretrained: Optional[str] = None, progress: Optional[Progress] = None,
                 evaluate_test: bool = True, world: Optional[World] = None) -> dict:
    """Fine-tune (resuming ``run_dir`` when it holds a checkpoint) and evaluate on the test cases.

    ``cfg``: a :class:`macl.finetune.FinetuneConfig`; ``net``: backbone settings (NetConfig fields; in_channels
    comes from the data). When bad data stop the run before its first step, a ``run_dir`` this call created
    is removed again. ``world``: under torchrun, every rank calls this; only rank 0 writes (see
    :func:`macl.finetune.finetune`).

    Returns:
        {"labelled", "train", "test", "loaded_pretrained", "last_loss", "summary" (dict or None), "seconds"}.
    """
    from macl.finetune import finetune
    world = world or SINGLE
    t0 = time.perf_counter()
    run = Path(run_dir)
    existed = run.exists() and not runfolder.created_by_this_process(run)  # a lock may have just made it
    factory = model_factory(net)
    if cfg.dims != int(net.get("dims", 2)):
        raise ValueError(f"fine-tuning dims={cfg.dims} but the network is {net.get('dims')}D")
    source = str(pretrained_source(pretrained)) if pretrained is not None else None
    if not (run / "checkpoint_latest.pt").is_file():
        # check the data set before the run folder exists
        open_dataset(data)
    resolved = {"data": str(data), "pretrained": source,
                "net": {k: v for k, v in dict(net).items() if k != "in_channels"}, "finetune": cfg.to_dict()}
    check_finetune_rerun(run, resolved, RESOLVED)
    history = _finetune_resume_history(run, resolved, cfg)  # any other trajectory setting that differs fails here
    if history:
        resolved["resumes"] = history
    started = []

    def write_resolved() -> None:  # once the run has started: a failed start leaves the old settings in place
        if world.is_main and not started:
            write_json_atomic(run / RESOLVED, resolved)

    def on_step(step: int, total: int, info: dict) -> None:
        write_resolved()
        started.append(step)
        if progress is not None:
            progress(step, total, info)
    world.barrier()  # every rank has looked at run_dir before rank 0 writes into it
    if world.is_main:
        run.mkdir(parents=True, exist_ok=True)
    try:
        res = finetune(data, run, factory, cfg, pretrained=source, progress=on_step, evaluate_test=evaluate_test,
                       world=world)
    except Exception:
        if world.is_main and not existed and not started and not (run / "checkpoint_latest.pt").is_file():
            shutil.rmtree(run, ignore_errors=True)
        raise
    if not started:  # a finished run re-run: no step was left to do
        write_resolved()
    summary = None
    if (run / "summary.json").is_file() and evaluate_test and world.is_main:
        summary = json.loads((run / "summary.json").read_text())
    return {"labelled": res.labelled, "train": res.train, "test": res.test, "loaded_pretrained": res.loaded_pretrained,
            "last_loss": res.last_loss, "summary": summary, "class_names": res.class_names, "model": res.model,
            "seconds": time.perf_counter() - t0}


def run_evaluate(run_dir: str | os.PathLike, data: str, cases: Optional[Sequence[str]] = None,
                 progress: Optional[Progress] = None) -> dict:
    """Evaluate a fine-tuning run's final model on its test cases (or ``cases``): writes ``summary.json``.

    Raises:
        FileNotFoundError: the run folder or one of its files is missing (named).
    """
    from macl.finetune import evaluate_run
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    if not (run / RESOLVED).is_file():
        raise FileNotFoundError(f"{run / RESOLVED} not found: is {run} a fine-tuning run made by `macl finetune`?")
    saved = json.loads((run / RESOLVED).read_text())
    if "net" not in saved:
        raise ValueError(f"{run / RESOLVED} is not a fine-tuning run's config (no 'net')")
    return evaluate_run(run, data, model_factory(saved["net"]), progress=progress, cases=cases)


def _float(x: Any) -> float:
    """A summary value as a float: None (JSON's null for an undefined metric) becomes NaN."""
    return float("nan") if x is None else float(x)


def dice_table(summary: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(class name, mean Dice, mean HD95) per foreground class, then ("mean", ...) from a summary dict.
    An undefined mean (a class absent from every test case's reference and prediction) is NaN."""
    names = summary.get("class_names", {})
    rows = [(names.get(k, k), _float(v["Dice"]), _float(v["HD95"])) for k, v in summary["mean"].items()]
    fg = summary["foreground_mean"]
    return rows + [("mean", _float(fg["Dice"]), _float(fg["HD95"]))]


def _num(x: Optional[float], fmt: str) -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def format_summary(summary: Mapping[str, Any]) -> str:
    """A small text table of a summary.json: Dice and HD95 (mm) per class and their mean; a class absent from
    every test case's reference (summary "not_evaluable"), or with no defined Dice, is shown as "not evaluable"."""
    lines = [f"{'class':<14}{'Dice':>8}{'HD95 mm':>10}"]
    absent = set(dict(summary.get("not_evaluable") or {}).values())
    for name, d, h in dice_table(summary):
        if name != "mean" and (name in absent or d != d):
            lines.append(f"{name:<14}  not evaluable (absent from every test case's reference)")
        else:
            lines.append(f"{name:<14}{_num(d, '.3f'):>8}{_num(h, '.2f'):>10}")
    return "\n".join(lines) + f"\n({summary.get('n_cases', '?')} test case(s))"


__all__ = ["PretrainSpec", "run_pretrain", "run_finetune", "run_evaluate", "pretrained_net", "pretrained_source",
           "model_factory", "patch_size", "read_config_file", "parse_value", "dice_table", "format_summary",
           "has_checkpoint", "DataError", "RESOLVED", "WEIGHTS", "saved_finetune_settings"]
