"""Settings that contradict what a run folder already holds fail before anything in it is rewritten.

- :func:`resume_checkpoint`: the checkpoint a pre-training resume will load (``latest.pt``, else ``final.pt``,
  else the newest loadable ``step_*.pt``), checked against the new net / method settings.
- :func:`check_finetune_rerun`: a fine-tuning folder with a checkpoint or final model continues only with its
  own network settings.

Both raise ValueError naming the differing settings (``net.base_width 4 -> 8``), so a failed command leaves the
run's saved settings (``resolved_config.json``) usable.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from macl.run import folder as runfolder
from macl.settings.config import PretrainConfig, from_dict


def resume_checkpoint(config: PretrainConfig, run: Path, resume: Optional[str]) -> Optional[str]:
    """The checkpoint a resume will load (``latest.pt``, ``final.pt``, else the newest loadable ``step_*.pt``),
    checked against the new settings before the run folder is touched (see :func:`resume_point`)."""
    point = resume_point(config, run, resume)
    return None if point is None else point[0]


def resume_point(config: PretrainConfig, run: Path, resume: Optional[str]) -> Optional[tuple[str, int]]:
    """(path, step) of the checkpoint a resume will load, or None for a fresh start; see :func:`resume_checkpoint`.

    Raises:
        ValueError: no loadable checkpoint among existing ones, or net / method settings that differ from the
        checkpoint's (named), which would otherwise overwrite the run's saved settings with unusable ones.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = runfolder.find_resume_checkpoint(run / "checkpoints")
        if found is None:
            return None
        path, ckpt = str(found[0]), found[1]
    else:
        path, ckpt = str(resume), runfolder.load_checkpoint_safe(resume)
    saved = from_dict(ckpt.get("config") or {})
    for part in ("net", "method"):
        old, new = dataclasses.asdict(getattr(saved, part)), dataclasses.asdict(getattr(config, part))
        diff = [f"{part}.{k} {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new.get(k)]
        if diff:
            raise ValueError(f"cannot resume {path} with other settings ({', '.join(diff)}); drop those flags to "
                             f"continue the run, or choose a new --out")
    return path, int(ckpt.get("step", 0) or 0)


def check_finetune_rerun(run: Path, resolved: Mapping[str, Any], resolved_name: str) -> None:
    """A fine-tuning run folder that holds a checkpoint or a final model continues only with its own network.

    Raises:
        ValueError: the saved network settings differ (named), before anything in ``run`` is rewritten.
    """
    if not ((run / "checkpoint_latest.pt").is_file() or (run / "model_final.pt").is_file()):
        return
    try:
        saved = json.loads((run / resolved_name).read_text())
    except (OSError, ValueError):
        return
    old, new = dict(saved.get("net") or {}), dict(resolved["net"])
    diff = [f"net.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"{run} holds a fine-tuning run with other network settings ({', '.join(diff)}); rerun "
                         f"it with its own settings, or choose a new --out")


__all__ = ["resume_checkpoint", "resume_point", "check_finetune_rerun"]
