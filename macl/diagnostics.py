"""Collapse diagnostics of every pre-training run: is each contrastive term learning, or sitting at the value
it takes when every embedding is the same?

For a contrastive term whose anchors each see K keys in their denominator (K = 2B − 1 for SupCon / NT-Xent over
2B projections) and whose loss is scaled by c (τ/0.07 with the public code's rescale), the loss of a constant
embedding is C = c·log(K) (4.906 for B = 16): every logit is equal, whatever the positives. A term that stays
there learns nothing, however long it runs.

Per logged step, for each term t that its method probes (`Method.probes`, filled by the forward pass itself):
    {t}_const   C = c·log(K)
    {t}_std     the std over the batch of the L2-normalised embeddings, averaged over features (and groups)
    {t}_cos     their mean pairwise cosine (1 when every embedding is the same)
    {t}_spread  sqrt(Σ_d var_n z_nd) = sqrt(1 − |mean z|²) ∈ [0, 1]: 0 at collapse, ≈ 1 for spread-out embeddings
and every `grad_every` steps, for every term (probed or not), the norm of its weighted gradient on the encoder
parameters ({t}_grad) and its share of the sum of those norms ({t}_grad_share); this costs one extra backward
pass per term on that step, and is skipped under torchrun.

A term is *near constant* on a step when |L_t − C| < rel_tol·C, or when its last measured spread is below
`spread_threshold`. When it has been near constant for `window` consecutive steps, a warning is logged
(logger "macl.diagnostics": stderr and events.jsonl under the CLI) and kept as an event (the trainer writes the
events and verdicts to run_dir/diagnostics.json). At the end, `verdicts()` gives one line per term, e.g. "L_g learned: 3.87 vs 4.91 at a constant
embedding" or "L_g collapsed at step 21: 4.905 vs 4.906 at a constant embedding (spread 0.03)".
After a resume the diagnostics start afresh from the resumed step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch

log = logging.getLogger(__name__)


@dataclass
class DiagnosticsConfig:
    """Settings of the collapse diagnostics.

    window: consecutive near-constant steps that count as a collapse (100).
    rel_tol: "near constant" = within this fraction of the constant-embedding value (0.01).
    spread_threshold: "near constant" also when the embeddings' spread is below this (0.05; see module docstring).
    grad_every: measure each term's share of the encoder gradient every this many steps (0: never).
    tail: the verdict's value is the mean of the last this many steps' losses.
    """

    window: int = 100
    rel_tol: float = 0.01
    spread_threshold: float = 0.05
    grad_every: int = 100
    tail: int = 20

    def __post_init__(self) -> None:
        if int(self.window) < 1:
            raise ValueError(f"diagnostics window must be >= 1, got {self.window!r}")
        if not 0 < self.rel_tol < 1:
            raise ValueError(f"diagnostics rel_tol must be in (0, 1), got {self.rel_tol!r}")
        if int(self.grad_every) < 0:
            raise ValueError(f"diagnostics grad_every must be >= 0, got {self.grad_every!r}")


def embedding_spread(rows: torch.Tensor) -> Dict[str, float]:
    """Spread statistics of (G, N, D) embeddings (normalised over D here), averaged over the G groups.

    Returns {"std": mean over d of std_n z_nd (biased), "cos": mean pairwise cosine over n ≠ n',
    "spread": sqrt(Σ_d var_n z_nd)}. O(G·N·D).
    """
    z = torch.nn.functional.normalize(rows.detach().float(), dim=-1)
    n = z.shape[1]
    mean = z.mean(1)  # (G, D)
    var = (z - mean.unsqueeze(1)).pow(2).mean(1)  # (G, D)
    sq = mean.pow(2).sum(-1)  # |mean z|² = (n + n(n−1)·cos) / n²
    cos = (n * sq - 1) / max(n - 1, 1)
    return {"std": float(var.sqrt().mean()), "cos": float(cos.mean()), "spread": float(var.sum(-1).sqrt().mean())}


class _Term:
    """The running state of one term."""

    def __init__(self, name: str):
        self.name = name
        self.const: Optional[float] = None
        self.spread: Optional[float] = None
        self.near_since: Optional[int] = None  # first step of the current near-constant streak
        self.collapsed_at: Optional[int] = None  # start of the streak that raised the warning
        self.episodes: List[tuple] = []  # (start, end) of near-constant streaks of >= window steps that ended
        self.first: Optional[float] = None
        self.recent: List[float] = []


class Diagnostics:
    """Per-run collapse diagnostics; `macl.train.pretrain` drives it (see the module docstring).

    observe(step, method, values, logged) → the fields to add to the step's log record;
    grad_shares(method, terms, scale) → per-term encoder-gradient norms and shares (call before backward);
    verdicts() → one dict per term with "line" (the one-line verdict).
    """

    def __init__(self, cfg: Optional[DiagnosticsConfig] = None, log_warnings: bool = True):
        self.cfg = cfg or DiagnosticsConfig()
        self.terms: Dict[str, _Term] = {}
        self.log_warnings = log_warnings  # False on the ranks other than 0 under torchrun
        self.events: List[Dict[str, Any]] = []  # {"event": "collapse", "step", "term", ...} records
        self.last_step = 0

    def due_grad(self, step: int, world_size: int = 1) -> bool:
        """Whether the 1-based `step` measures gradient shares."""
        g = int(self.cfg.grad_every)
        return g > 0 and world_size == 1 and (step == 1 or step % g == 0)

    def grad_shares(self, method, terms: Mapping[str, torch.Tensor], scale: float = 1.0) -> Dict[str, float]:
        """{t}_grad = ‖∂(w_t·L_t)/∂θ_encoder‖ and {t}_grad_share = its fraction of the sum over terms.

        `terms` still carry their graphs (call before the main backward); `scale` is the AMP loss scale (the
        gradients are taken of scale·w_t·L_t, then divided by it). Returns {} for a method without `model.encoder`.
        """
        encoder = getattr(getattr(method, "model", None), "encoder", None)
        if encoder is None or not terms:
            return {}
        params = [p for p in encoder.parameters() if p.requires_grad]
        norms = {}
        for name, value in terms.items():
            w = float(method.weights.get(name, 1.0))
            if w == 0 or not value.requires_grad:
                norms[name] = 0.0
                continue
            grads = torch.autograd.grad(value * (w * scale), params, retain_graph=True, allow_unused=True)
            sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
            norms[name] = math.sqrt(sq) / scale
        total = sum(norms.values())
        out = {}
        for name, v in norms.items():
            out[f"{name}_grad"] = v
            out[f"{name}_grad_share"] = v / total if total > 0 else float("nan")
        return out

    def observe(self, step: int, method, values: Mapping[str, float], logged: bool) -> Dict[str, Any]:
        """Update every probed term with the 1-based `step`'s loss values; measure spreads when `logged`.

        Returns the fields for the step's log record ({} when not logged).
        """
        self.last_step = step
        fields: Dict[str, Any] = {}
        probes = getattr(method, "probes", {}) or {}
        for name, value in values.items():
            if name in ("loss", "grad_norm") or name.endswith(("_grad", "_grad_share")):
                continue
            t = self.terms.setdefault(name, _Term(name))
            t.first = value if t.first is None else t.first
            t.recent = (t.recent + [value])[-int(self.cfg.tail):]
            probe = probes.get(name)
            if probe is None:
                continue
            t.const = probe.scale * math.log(max(int(probe.keys_per_anchor), 1))
            if logged:
                stats = embedding_spread(probe.rows())
                t.spread = stats["spread"]
                fields.update({f"{name}_const": t.const, **{f"{name}_{k}": v for k, v in stats.items()}})
            near = (t.const > 0 and abs(value - t.const) < self.cfg.rel_tol * t.const) or \
                   (t.spread is not None and t.spread < self.cfg.spread_threshold)
            self._update(t, step, near, value)
        return fields

    def _update(self, t: _Term, step: int, near: bool, value: float) -> None:
        if not near:
            if t.near_since is not None and t.collapsed_at is not None:
                t.episodes.append((t.collapsed_at, step - 1))
                t.collapsed_at = None
            t.near_since = None
            return
        if t.near_since is None:
            t.near_since = step
        if t.collapsed_at is None and step - t.near_since + 1 >= int(self.cfg.window):
            t.collapsed_at = t.near_since
            spread = "" if t.spread is None else f", spread {t.spread:.3f}"
            msg = (f"{t.name} collapsed at step {t.near_since}: {value:.4f} has stayed within "
                   f"{100 * self.cfg.rel_tol:g}% of its constant-embedding value {t.const:.4f} (or its spread below "
                   f"{self.cfg.spread_threshold:g}) for {self.cfg.window} steps{spread}; this term is learning "
                   f"nothing (docs/macl_presets.md: try --preset robust)")
            if self.log_warnings:
                log.warning(msg)
            self.events.append({"step": step, "event": "collapse", "term": t.name, "since": t.near_since,
                                "value": value, "constant": t.const, "spread": t.spread, "message": msg})

    def verdicts(self) -> List[Dict[str, Any]]:
        """One dict per term: term, status ("learned" | "collapsed" | "undecided" | "above constant" | "no constant"),
        value (mean of
        the last `tail` losses), constant, since (collapse step or None), spread, line."""
        out = []
        for t in self.terms.values():
            value = sum(t.recent) / len(t.recent) if t.recent else float("nan")
            rec = {"term": t.name, "value": value, "constant": t.const, "spread": t.spread, "since": None,
                   "steps": self.last_step}
            if t.const is None:
                rec["status"] = "no constant"
                rec["line"] = (f"{t.name}: {t.first:.4g} -> {value:.4g} (not a contrastive term: no constant-embedding "
                               f"value to compare with)")
            elif t.collapsed_at is not None:
                rec.update(status="collapsed", since=t.collapsed_at)
                spread = "" if t.spread is None else f", spread {t.spread:.3f}"
                rec["line"] = (f"{t.name} collapsed at step {t.collapsed_at}: {value:.3f} vs {t.const:.3f} at a constant "
                               f"embedding{spread}")
            elif t.near_since is not None:
                rec["status"] = "undecided"
                rec["line"] = (f"{t.name} undecided: {value:.3f} vs {t.const:.3f} at a constant embedding, near it for the "
                               f"last {self.last_step - t.near_since + 1} steps (a collapse needs {self.cfg.window})")
            else:
                learned = value < (1 - self.cfg.rel_tol) * t.const
                rec["status"] = "learned" if learned else "above constant"
                spread = "" if t.spread is None else f", spread {t.spread:.2f}"
                what = "learned" if learned else "not below its constant-embedding value"
                rec["line"] = f"{t.name} {what}: {value:.2f} vs {t.const:.2f} at a constant embedding{spread}"
            if t.episodes:
                rec["episodes"] = list(t.episodes)
                rec["line"] += "; near-constant during steps " + ", ".join(f"{a}-{b}" for a, b in t.episodes)
            out.append(rec)
        return out


__all__ = ["Diagnostics", "DiagnosticsConfig", "embedding_spread"]
