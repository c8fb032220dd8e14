"""Resume that cannot mix settings: a resumed run keeps every setting that shaped its trajectory.

A run folder's ``resolved_config.json`` records the settings its checkpoints were trained with. On a resume
(``macl pretrain --resume``, a ``macl finetune`` rerun) the command's settings are compared with the saved
ones, key by key (``section.key``, the names ``--set`` takes):

- a setting that changes the run's trajectory (batch size, patch size, lr and schedule, augmentation, seed,
  data, channels, preset, network, pre-processing, ...: everything not listed as safe) that differs is refused
  with one line naming each such setting, both values and how to start a new run;
- a safe setting (logging, ``checkpoint_every``, the device, the cache folder, ``skip_bad``) is accepted and
  returned, so the caller records it (event log, ``resolved_config.json``'s ``resumes``);
- the step count is safe only when the learning-rate schedule does not depend on it (a constant lr after the
  warm-up: ``min_lr == lr``) and it does not fall below the step already reached; with a cosine decay over the
  run's length, the steps already done followed another schedule, so a change is refused.

Unknown keys count as trajectory settings: a new setting is protected until someone decides it is safe.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable, Mapping, Optional

logger = logging.getLogger(__name__)

#: the command-line flag of a setting, for the hint in the refusal
FLAGS = {"data.batch_size": "--batch-size", "data.patch_size": "--patch-size", "optim.lr": "--lr",
         "train.steps": "--steps", "train.seed": "--seed", "data.seed": "--seed", "data.views": "--views",
         "method.preset": "--preset", "method.name": "--method", "data.channel": "--channels",
         "data.slice_axis": "--slice-axis", "data.patches_per_volume": "--patches-per-volume",
         "data.path": "--data", "preprocess.spacing": "--spacing", "preprocess.ct_window": "--ct-window",
         "preprocess.orientation": "--orientation", "net.base_width": "--base-width", "net.depth": "--depth",
         "net.norm": "--norm", "net.dims": "--dims", "data.meta_csv": "--meta-csv",
         "batch_size": "--batch-size", "patch_size": "--patch-size", "lr": "--lr", "steps": "--steps",
         "seed": "--seed", "channels": "--channels", "slice_axis": "--slice-axis", "loss": "--loss",
         "labels_fraction": "--labels-fraction", "labelled_cases": "--labelled-cases",
         "test_fraction": "--test-fraction", "test_cases": "--test-cases", "data": "--data",
         "pretrained": "--pretrained"}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one ``{"a.b.c": value}`` dict (lists and other values are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def same_path(a: Any, b: Any) -> bool:
    """Whether two path settings name the same file (``runs/x`` and ``./runs/x`` do)."""
    if a is None or b is None:
        return a is b
    return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


def _norm(v: Any) -> Any:
    """Tuples and lists compare alike (JSON has only lists)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def resume_changes(run: Any, saved: Mapping[str, Any], new: Mapping[str, Any], *, safe: Iterable[str],
                   steps_key: str, done_step: int, schedule_fixed: bool, paths: Iterable[str] = (),
                   strip: str = "") -> list[dict[str, Any]]:
    """Compare a resume's settings ``new`` with the run's ``saved`` ones (nested dicts, same layout).

    Args:
        run: the run folder (for the message).
        safe: flattened keys that may change on a resume.
        steps_key: the flattened key of the step count; accepted when ``schedule_fixed`` (the lr schedule does
            not depend on it) and the new value is at least ``done_step``.
        paths: flattened keys holding paths, compared as real paths.
        strip: a prefix dropped from the names shown (``"pretrain."`` -> ``train.steps``).

    Returns:
        The accepted changes: ``[{"setting", "old", "new"}]`` (empty when nothing changed).

    Raises:
        ValueError: one line naming every refused setting with both values, and how to start a new run.
    """
    old_flat, new_flat = flatten(saved), flatten(new)
    safe, paths = set(safe), set(paths)
    accepted, refused = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = _norm(old_flat.get(key)), _norm(new_flat.get(key))
        if key in paths and same_path(old, value):
            continue
        if old == value:
            continue
        name = key[len(strip):] if strip and key.startswith(strip) else key
        change = {"setting": name, "old": old, "new": value}
        if key == steps_key:
            why = _steps_problem(value, done_step, schedule_fixed)
            if why is None:
                accepted.append(change)
            else:
                refused.append(f"{name} {value!r} differs from the run's {old!r} ({why})")
        elif key in safe:
            accepted.append(change)
        else:
            flag = FLAGS.get(name)
            refused.append(f"{name} {value!r}{f' ({flag})' if flag else ''} differs from the run's {old!r}")
    if refused:
        raise ValueError(f"cannot resume {run}: {'; '.join(refused)}; these settings change the run's "
                         f"trajectory, so a resume takes them from the run folder: drop them to continue the run, "
                         f"or start a new run with them under another --out")
    return accepted


def _steps_problem(value: Any, done: int, schedule_fixed: bool) -> Optional[str]:
    if not schedule_fixed:
        return "the learning rate decays over the run's length, so the steps already done followed another schedule"
    if value is None or int(value) < int(done):
        return f"the run has already done {done} steps"
    return None


def resume_history(run: Any, saved_raw: Mapping[str, Any], saved: Mapping[str, Any], new: Mapping[str, Any], *,
                   done_step: int, checkpoint: Optional[str] = None, **rules: Any) -> list[dict[str, Any]]:
    """The run's ``resumes`` list (from ``saved_raw``, its resolved_config.json) plus this resume, after
    :func:`resume_changes` (``rules``: its keyword arguments but ``done_step``) accepted it; the accepted
    changes are logged (the command line's event log records them).

    Raises:
        ValueError: see :func:`resume_changes`.
    """
    changes = resume_changes(run, saved, new, done_step=done_step, **rules)
    if changes:
        logger.info("resuming %s at step %d with changed settings: %s", run, done_step, describe(changes))
    entry = {"step": int(done_step), "changes": changes, "time": round(time.time(), 3)}
    if checkpoint is not None:
        entry["checkpoint"] = str(checkpoint)
    return list(saved_raw.get("resumes") or []) + [entry]


def describe(changes: Iterable[Mapping[str, Any]]) -> str:
    """``train.steps 2 -> 4, train.log_every 1 -> 5`` (for the event log)."""
    return ", ".join(f"{c['setting']} {c['old']!r} -> {c['new']!r}" for c in changes)


__all__ = ["resume_changes", "resume_history", "flatten", "same_path", "describe", "FLAGS"]
