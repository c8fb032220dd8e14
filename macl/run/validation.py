"""Validation during fine-tuning: the validation cases, the Dice curve, the best checkpoint kept.

``FinetuneConfig.val_fraction`` F takes ``max(1, round(F * n))`` of the ``n`` labelled cases (a seeded choice;
at least one labelled case stays for training) out of training for validation; ``val_cases`` names them
instead (any training cases, labelled or not; a labelled one is then not trained on). Every ``val_every`` steps
and after the last one the network predicts the validation volumes (the same sliding-window inference as the
test evaluation) and their mean foreground Dice is appended to ``val_log.jsonl`` ({"step", "dice", "seconds"}).
The state with the highest Dice (the earliest on ties) is kept in ``model_best.pt``; at the end it becomes
``model_final.pt`` (the last state goes to ``model_last.pt``) and ``summary.json`` names it under
``"kept"``: {"step": s, "val_dice": d, "rule": "best validation Dice", "curve": [[step, dice], ...]}.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from macl.run import folder as runfolder

VAL_LOG, BEST = "val_log.jsonl", "model_best.pt"


def check_val(fraction: float, cases: Sequence[str] | None, every: int) -> None:
    """ValueError naming a bad ``val_fraction`` / ``val_cases`` / ``val_every``."""
    if not 0 <= float(fraction) < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    if fraction and cases is not None:
        raise ValueError("give val_fraction or val_cases, not both")
    if int(every) < 1:
        raise ValueError(f"val_every must be >= 1, got {every}")


def split_validation(split: dict, fraction: float, cases: Sequence[str] | None, seed: int) -> dict:
    """``split`` with ``"val"`` added and the validation cases removed from ``"labelled"`` (unchanged when
    validation is off). Raises ValueError: unknown / test cases named, or no labelled case left to train on."""
    if not fraction and cases is None:
        return split
    if cases is not None:
        val = sorted(set(cases))
        bad = sorted(set(val) - set(split["train"]))
        if bad:
            raise ValueError(f"validation cases must be training cases (not test, known): {bad[:10]}")
    else:
        lab = list(split["labelled"])
        k = max(1, int(round(float(fraction) * len(lab))))
        if k >= len(lab):
            raise ValueError(f"val_fraction={fraction} of {len(lab)} labelled case(s) leaves none to train on; "
                             f"label more cases or name validation cases (val_cases)")
        order = np.random.default_rng([int(seed), 7]).permutation(len(lab))
        val = sorted(lab[i] for i in order[:k])
    labelled = [c for c in split["labelled"] if c not in set(val)]
    if not labelled:
        raise ValueError(f"every labelled case is a validation case ({val}): none left to train on")
    return {**split, "labelled": labelled, "val": val}


def mean_foreground_dice(summary: Mapping[str, Any]) -> float:
    """The summary's foreground-mean Dice (NaN when undefined)."""
    return float(summary["foreground_mean"]["Dice"])


class Validator:
    """Scores the network on the validation volumes every ``every`` steps and keeps the best state.

    Args:
        run: the run folder; score: ``score(model) -> float`` (mean foreground Dice); every: steps between checks;
        steps: the last step (always checked); state: :meth:`state` as stored in the checkpoint a run resumes
        from (the curve and the best state up to that step; later checks are dropped from ``val_log.jsonl``).
    """

    def __init__(self, run: Path, score: Callable[[nn.Module], float], every: int, steps: int,
                 state: Mapping[str, Any] | None = None) -> None:
        self.run, self.score, self.every, self.steps = Path(run), score, int(every), int(steps)
        self.log = self.run / VAL_LOG
        self.curve: list[list[float]] = [list(c) for c in (state or {}).get("curve", [])]
        self.best_state = (state or {}).get("best_state")
        runfolder.atomic_write(self.log, "".join(json.dumps({"step": s, "dice": d}) + "\n" for s, d in self.curve))
        if self.best_state is not None:
            runfolder.save_torch_atomic(self.best_state, self.run / BEST)
        self.t0 = time.perf_counter()

    def state(self) -> dict:
        """What a checkpoint stores to resume validation: the curve and the best state (CPU tensors)."""
        return {"curve": [list(c) for c in self.curve], "best_state": self.best_state}

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, dice) of the best check so far (earliest on ties; NaN counts as worst)."""
        best = None
        for s, d in self.curve:
            if math.isfinite(d) and (best is None or d > best[1]):
                best = (int(s), float(d))
        return best

    def maybe_check(self, model: nn.Module, step: int) -> float | None:
        """Score at ``step`` when it is due; save ``model_best.pt`` when it is the best. Returns the Dice."""
        if step % self.every and step != self.steps:
            return None
        before = self.best
        dice = float(self.score(model))
        self.curve.append([int(step), dice])
        runfolder.append_text(self.log, json.dumps({"step": int(step), "dice": dice,
                                                    "seconds": round(time.perf_counter() - self.t0, 3)}) + "\n")
        if math.isfinite(dice) and (before is None or dice > before[1]):
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            runfolder.save_torch_atomic(self.best_state, self.run / BEST)
        return dice

    def kept(self) -> dict:
        """What ``summary.json`` records under "kept" (module docstring)."""
        best = self.best
        return {"step": None if best is None else best[0], "val_dice": None if best is None else best[1],
                "rule": "best validation Dice (earliest on ties)", "curve": self.curve}
