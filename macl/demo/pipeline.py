"""The built-in demo: does MACL pre-training help a U-Net that sees only a few labelled phantoms?

``run_demo(out_dir, DemoConfig.full())`` (what ``macl demo`` runs):

1. generate procedural phantom volumes with labels (:mod:`macl.data.phantom`) in ``out_dir/data``;
2. split them into training and test cases (seeded); pre-train MACL on the training volumes only (their
   labels unused; the list is ``out_dir/pretrain_datalist.json``) -> ``out_dir/pretrain``;
3. for each fine-tuning seed, fine-tune the segmentation U-Net twice on the same few labelled training
   cases, with the same seed, steps and schedule: from the pre-trained encoder/decoder
   (``out_dir/finetune_pretrained_seed<S>``) and from a random initialisation
   (``out_dir/finetune_scratch_seed<S>``);
4. evaluate every run on the test cases (Dice, HD95; ``summary.json`` in each run folder); the table
   averages over test volumes and seeds, counts the seeds where pre-training won, gives paired p-values over
   the seeds (t-test and Wilcoxon, :mod:`macl.demo.stats`), and ends with the pre-training's per-term verdicts
   (:mod:`macl.diagnostics`: did L_g, L_d learn or collapse);
5. write ``results.json``, ``table.txt`` and three PNGs: ``loss_curves.png``, ``dice_per_class.png``,
   ``prediction_overlay.png``.

Rerunning into the same folder reuses the finished steps. Library code: progress goes to a callable
``progress(stage, done, total, info)``; the table is returned, not printed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from macl.data.metrics import write_json_atomic

logger = logging.getLogger(__name__)
StageProgress = Callable[[str, int, int, Optional[dict]], None]


@dataclass
class DemoConfig:
    """Sizes and lengths of the demo (see :meth:`full` and :meth:`quick`).

    n_subjects / shape: the phantom data set; test_fraction: held-out test cases; labelled: how many
    training cases fine-tuning may use the labels of; base_width / depth: the 2D U-Net; pretrain_*:
    MACL's steps, batch and learning rate; preset: MACL's preset (:mod:`macl.settings.presets`: "robust", the
    package default, or "faithful", the public code); finetune_*: fine-tuning steps, batch, learning rate, and
    the seeds (each seed fine-tunes both rows once: different initialisation of the layers not pre-trained,
    different batches); seed: data, split, label selection and pre-training; threads: torch CPU threads
    (1 is fastest for these small networks on 2 cores, and robust on a busy machine).

    Geometry: 64² crops at depth 3 give MACL a 2x2 dominant bottleneck and an 8x8 L_d grid, the smallest sizes at
    which every term is non-degenerate (:mod:`macl.settings.geometry`; 64² at depth 4 is refused).
    """

    name: str = "full"
    n_subjects: int = 20
    shape: tuple = (64, 64, 32)
    test_fraction: float = 0.25
    labelled: int = 2
    base_width: int = 16
    depth: int = 3
    patch: int = 64
    pretrain_steps: int = 600
    pretrain_batch: int = 16
    pretrain_lr: float = 0.01
    preset: str = "robust"
    finetune_steps: int = 200
    finetune_batch: int = 8
    finetune_lr: float = 1e-3
    finetune_seeds: tuple = (0, 1, 2, 3, 4)
    seed: int = 0
    threads: int = 1

    @classmethod
    def full(cls) -> "DemoConfig":
        """20 volumes, 600 pre-training steps, 5 fine-tuning seeds per column: about 8 minutes on 2 idle CPU cores
        (estimated: the quick demo takes 14% less CPU time than the depth-4 demo that took 8.7 minutes)."""
        return cls()

    @classmethod
    def quick(cls) -> "DemoConfig":
        """12 volumes, 150 pre-training steps, one fine-tuning seed: 75 s of CPU time (1-2 minutes on an idle
        machine); a smoke test of the pipeline, too short and too small for a fair comparison."""
        return cls(name="quick", n_subjects=12, pretrain_steps=150, finetune_steps=120, finetune_seeds=(0,))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _ids_and_split(data: Path, cfg: DemoConfig) -> tuple[Any, list, list]:
    """(the data set's index, training case ids, test case ids): the split every step of the demo uses."""
    from macl.data import open_dataset, split_cases
    index = open_dataset(data)
    ids = [c.case_id for c in index.labelled()]
    train, test = split_cases(ids, cfg.test_fraction, cfg.seed)
    return index, train, test


def _pretrain_datalist(index, train: list, path: Path) -> Path:
    """A MONAI datalist of the training cases' images (no labels, paths relative to it): what pre-training sees."""
    keep = set(train)
    rows = [{"image": [os.path.relpath(p, path.parent) for p in c.images]} for c in index.cases if c.case_id in keep]
    write_json_atomic(path, {"description": "MACL demo: pre-training volumes (test cases held out)",
                             "training": rows})
    return path


def _saved_verdicts(run: Path) -> list:
    """The verdicts a finished pre-training run saved in diagnostics.json ([] when there are none)."""
    path = run / "diagnostics.json"
    return json.loads(path.read_text()).get("verdicts", []) if path.is_file() else []


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_demo(out_dir: str | Path, cfg: Optional[DemoConfig] = None,
             progress: Optional[StageProgress] = None) -> dict[str, Any]:
    """Run the whole demo into ``out_dir`` (see module docstring).

    Returns:
        {"table": str, "table_rows": [...], "figures": [paths], "seconds": float, "timings": {...},
         "labelled": [...], "train": [...], "test": [...], "out_dir": str, ...} (all but "table" also in
        ``out_dir/results.json``).

    Raises:
        ValueError: ``out_dir`` holds a demo run made with other settings.
    """
    import torch
    cfg = cfg or DemoConfig.full()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    try:
        return _run(Path(out_dir), cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, cfg: DemoConfig, progress: Optional[StageProgress]) -> dict[str, Any]:
    from macl.settings.config import MethodConfig, NetConfig, OptimConfig, PretrainConfig, TrainConfig
    from macl.data import PhantomConfig, select_labelled, write_phantom_dataset
    from macl.finetune import FinetuneConfig
    from macl.workflow import PretrainSpec, run_finetune, run_pretrain

    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[int, int, Optional[dict]], None]:
        return lambda done, total, info=None: progress(name, done, total, info) if progress else None

    saved = out / "demo_config.json"
    if saved.is_file() and json.loads(saved.read_text()) != cfg.to_dict():
        raise ValueError(f"{out} holds a demo run made with other settings ({saved}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, cfg.to_dict())

    t = time.perf_counter()
    data = write_phantom_dataset(out / "data", PhantomConfig(n_subjects=cfg.n_subjects, shape=tuple(cfg.shape),
                                                              seed=cfg.seed), progress=stage("phantoms"))
    index, train, test = _ids_and_split(data, cfg)
    datalist = _pretrain_datalist(index, train, out / "pretrain_datalist.json")
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    net = NetConfig(dims=2, base_width=cfg.base_width, depth=cfg.depth)
    pcfg = PretrainConfig(net=net, method=MethodConfig(name="macl", preset=cfg.preset),
                          optim=OptimConfig(lr=cfg.pretrain_lr),
                          train=TrainConfig(steps=cfg.pretrain_steps, seed=cfg.seed, device="cpu",
                                            checkpoint_every=max(50, cfg.pretrain_steps // 4), log_every=1))
    spec = PretrainSpec(str(datalist), pcfg, {"batch_size": cfg.pretrain_batch, "patch_size": [cfg.patch] * 2,
                                              "seed": cfg.seed})
    pre = run_pretrain(spec, out / "pretrain", resume="auto", progress=stage("pretrain"))
    verdicts = pre["verdicts"] or _saved_verdicts(out / "pretrain")  # a finished run reused: its saved verdicts
    timings["pretrain"] = time.perf_counter() - t

    labelled = select_labelled(train, fraction=cfg.labelled / len(train), seed=cfg.seed)
    net_dict = {k: v for k, v in dataclasses.asdict(net).items() if k != "in_channels"}
    runs: dict[str, dict[int, dict]] = {"pretrained": {}, "scratch": {}}
    for seed in cfg.finetune_seeds:
        for kind, source in (("pretrained", pre["weights"]), ("scratch", None)):
            t = time.perf_counter()
            fcfg = FinetuneConfig(dims=2, patch_size=(cfg.patch, cfg.patch), steps=cfg.finetune_steps,
                                  batch_size=cfg.finetune_batch, lr=cfg.finetune_lr, labelled_cases=labelled,
                                  test_cases=test, seed=seed, checkpoint_every=max(50, cfg.finetune_steps // 2),
                                  log_every=5, device="cpu")
            runs[kind][seed] = run_finetune(str(data), out / f"finetune_{kind}_seed{seed}", fcfg, net_dict,
                                            pretrained=source, progress=stage(f"finetune ({kind}, seed {seed})"))
            timings[f"finetune_{kind}_seed{seed}"] = time.perf_counter() - t
            if runs[kind][seed]["labelled"] != labelled:  # pragma: no cover - by construction
                raise RuntimeError("a fine-tuning run used other labelled cases than the demo chose")

    t = time.perf_counter()
    rows = table_rows(runs)
    table = format_table(cfg, rows, labelled, train, test, pre["step"], verdicts)
    from macl.extras import missing
    if missing("demo"):  # plots are optional: the table, results.json and the run folders need no matplotlib
        logger.warning("no figures: matplotlib is not installed (pip install \"macl[demo]\" for the PNGs)")
        figures = []
    else:
        figures = write_figures(out, data, runs, test[0])
    timings["figures"] = time.perf_counter() - t
    seconds = time.perf_counter() - t_start
    result = {"config": cfg.to_dict(), "table_rows": rows, "labelled": labelled, "test": test, "train": train,
              "pretrain_steps": pre["step"], "verdicts": verdicts, "timings": timings, "seconds": seconds, "figures": figures,
              "out_dir": str(out)}
    write_json_atomic(out / "results.json", result)
    (out / "table.txt").write_text(table + "\n")
    return {**result, "table": table}


def _per_seed_dice(summary: dict, key: str) -> float:
    """Mean Dice over the test volumes of one class ``key``, or of the mean over classes (``"mean"``)."""
    if key == "mean":
        return float(np.nanmean([np.nanmean([m["Dice"] for m in c["metrics"].values()])
                                 for c in summary["metric_per_case"]]))
    return float(np.nanmean([c["metrics"][key]["Dice"] for c in summary["metric_per_case"]]))


def table_rows(runs: dict) -> list[dict]:
    """Per foreground class, then "mean": Dice averaged over test volumes and fine-tuning seeds for both rows.

    Each row: class, scratch, pretrained (means), scratch_std / pretrained_std (std over seeds of the per-seed
    mean), difference (pretrained - scratch), wins (seeds where pre-trained scored higher), seeds, the
    two-sided p-values of a paired t-test (p_t) and a Wilcoxon signed-rank test (p_wilcoxon) over the seeds
    (:func:`macl.demo.stats.paired_tests`; NaN with one seed), and per_seed (the per-seed means of both columns).
    """
    from macl.demo.stats import paired_tests
    seeds = sorted(runs["scratch"])
    names = runs["scratch"][seeds[0]]["summary"]["class_names"]
    rows = []
    for key in [k for k in sorted(names, key=int) if k != "0"] + ["mean"]:
        per = {kind: np.array([_per_seed_dice(runs[kind][s]["summary"], key) for s in seeds]) for kind in runs}
        test = paired_tests(per["scratch"], per["pretrained"])
        rows.append({"class": names.get(key, key), "scratch": float(per["scratch"].mean()),
                     "pretrained": float(per["pretrained"].mean()), "scratch_std": float(per["scratch"].std()),
                     "pretrained_std": float(per["pretrained"].std()),
                     "difference": float(per["pretrained"].mean() - per["scratch"].mean()),
                     "wins": int((per["pretrained"] > per["scratch"]).sum()), "seeds": len(seeds),
                     "p_t": test["p_t"], "p_wilcoxon": test["p_wilcoxon"],
                     "per_seed": {k: [float(v) for v in per[k]] for k in per}})
    return rows


def format_table(cfg: DemoConfig, rows: list[dict], labelled: list, train: list, test: list, pre_steps: int,
                 verdicts: Optional[list] = None) -> str:
    """The printed Dice table, headed by what produced it, then the pre-training's per-term verdicts."""
    from macl.demo.stats import format_p
    n = rows[0]["seeds"]
    lines = [
        f"MACL demo ({cfg.name}): {cfg.n_subjects} phantom volumes {tuple(cfg.shape)}, {len(train)} for training, "
        f"{len(test)} held out for testing (data seed {cfg.seed})",
        f"  pre-training: MACL ({cfg.preset} preset), {pre_steps} steps x {cfg.pretrain_batch} {cfg.patch}x{cfg.patch} "
        f"slices of the {len(train)} training volumes (no labels); 2D U-Net F={cfg.base_width}, depth {cfg.depth}",
        f"  fine-tuning: labels of {len(labelled)} training volume(s) ({', '.join(labelled)}); {cfg.finetune_steps} "
        f"steps x {cfg.finetune_batch} slices, Dice+CE, Adam lr {cfg.finetune_lr:g}; identical for both columns; "
        f"{n} seed(s)",
    ]
    if n > 1:
        lines += [f"Dice on the {len(test)} test volumes (mean over volumes and seeds; +- std over seeds; p: paired "
                  f"over the {n} seeds, two-sided):",
                  f"  {'class':<10}{'from scratch':>16}{'MACL pre-trained':>20}{'difference':>12}{'better in':>14}"
                  f"{'p (t-test)':>12}{'p (Wilcoxon)':>14}"]
        for r in rows:
            lines.append(f"  {r['class']:<10}{r['scratch']:>9.3f} +- {r['scratch_std']:.3f}{r['pretrained']:>13.3f} +- "
                         f"{r['pretrained_std']:.3f}{r['difference']:>+12.3f}{r['wins']:>6d} of {n} seeds"
                         f"{format_p(r.get('p_t', float('nan'))):>12}{format_p(r.get('p_wilcoxon', float('nan'))):>14}")
    else:
        lines += [f"Dice on the {len(test)} test volumes (mean over volumes):",
                  f"  {'class':<10}{'from scratch':>14}{'MACL pre-trained':>18}{'difference':>12}"]
        for r in rows:
            lines.append(f"  {r['class']:<10}{r['scratch']:>14.3f}{r['pretrained']:>18.3f}{r['difference']:>+12.3f}")
    if verdicts:
        lines.append("MACL pre-training, per loss term (macl.diagnostics):")
        lines += [f"  {v['line']}" for v in verdicts]
    if cfg.name == "quick":
        lines.append("  (--quick: a smoke test of the pipeline; too short for a fair comparison)")
    return "\n".join(lines)


def write_figures(out: Path, data: Path, runs: dict, case: str) -> list[str]:
    """loss_curves.png, dice_per_class.png and prediction_overlay.png in ``out`` (matplotlib, Agg)."""
    from macl.extras import import_module
    # a Figure without pyplot renders with Agg: no display, no global state
    Figure = import_module("matplotlib.figure", "demo", "the demo's plots").Figure

    seeds = sorted(runs["scratch"])
    colors = {"scratch": "tab:blue", "pretrained": "tab:orange"}
    labels = {"scratch": "from scratch", "pretrained": "MACL pre-trained"}
    paths = []
    # 1. loss curves
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    log = [r for r in _read_jsonl(out / "pretrain" / "log.jsonl") if "loss" in r]
    for term in ("loss", "L_g", "L_d", "L_ER"):
        pts = [(r["step"], r[term]) for r in log if term in r]
        if pts:
            steps, vals = zip(*pts)
            ax1.plot(steps, _smooth(np.asarray(vals, dtype=float)), label="L (total)" if term == "loss" else term)
    ax1.set(title="MACL pre-training loss (moving average of 10)", xlabel="step", ylabel="loss")
    ax1.legend()
    for kind in ("scratch", "pretrained"):
        for i, seed in enumerate(seeds):
            flog = _read_jsonl(out / f"finetune_{kind}_seed{seed}" / "finetune_log.jsonl")
            ax2.plot([r["step"] for r in flog], [r["loss"] for r in flog], color=colors[kind], alpha=0.8,
                     label=labels[kind] if i == 0 else None)
    ax2.set(title=f"fine-tuning loss (Dice + CE), {len(seeds)} seed(s) each", xlabel="step", ylabel="loss")
    ax2.legend()
    paths.append(_save(fig, out / "loss_curves.png"))

    # 2. Dice per class
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    first = runs["scratch"][seeds[0]]["summary"]
    keys = [k for k in sorted(first["class_names"], key=int) if k != "0"]
    x = np.arange(len(keys))
    for off, kind in zip((-0.2, 0.2), ("scratch", "pretrained")):
        per = np.array([[_per_seed_dice(runs[kind][s]["summary"], k) for k in keys] for s in seeds])
        bars = ax.bar(x + off, per.mean(0), width=0.4, label=labels[kind], color=colors[kind])
        for s in range(len(seeds)):
            ax.plot(x + off, per[s], "k.", ms=5)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, [first["class_names"][k] for k in keys])
    ax.set(ylim=(0, 1.05), ylabel="Dice", title=f"Dice per class, {first['n_cases']} test volumes (dots: seeds)")
    ax.legend(loc="lower right")
    paths.append(_save(fig, out / "dice_per_class.png"))

    # 3. one prediction overlay
    paths.append(_overlay(out, data, {k: runs[k][seeds[0]] for k in runs}, seeds[0], case, Figure))
    return paths


def _smooth(v: np.ndarray, k: int = 10) -> np.ndarray:
    if len(v) < k:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100)
    return str(path)


def _overlay(out: Path, data: Path, runs: dict, seed: int, case: str, Figure) -> str:
    from matplotlib.colors import ListedColormap

    from macl.data import load_volumes, open_dataset
    from macl.data.metrics import dice_score
    from macl.finetune import FinetuneConfig, predict_volume
    index = open_dataset(data)
    saved = json.loads((out / f"finetune_scratch_seed{seed}" / "finetune_config.json").read_text())
    fcfg = FinetuneConfig(**saved["config"])
    vol = load_volumes(index, fcfg.preprocess, cases=[index.by_id(case)])[0]
    label = np.asarray(vol.label)
    z = int(np.argmax([(label[..., i] > 0).sum() for i in range(label.shape[2])]))
    preds = {kind: predict_volume(runs[kind]["model"], np.asarray(vol.image), fcfg) for kind in ("scratch", "pretrained")}
    colours = [(0, 0, 0, 0), "tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:cyan"]
    k = len(saved["class_names"])
    cmap = ListedColormap(colours[:max(2, min(k, len(colours)))])
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, 4)
    panels = [("image", None), ("ground truth", label), ("from scratch", preds["scratch"]),
              ("MACL pre-trained", preds["pretrained"])]
    for ax, (title, lab) in zip(axes, panels):
        ax.imshow(vol.image[0][..., z].T, cmap="gray", origin="lower")
        if lab is not None:
            ax.imshow(np.ma.masked_equal(lab[..., z].T, 0), cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=0.55,
                      origin="lower", interpolation="nearest")
        if title in ("from scratch", "MACL pre-trained"):
            fg = np.nanmean([dice_score(lab == c, label == c) for c in range(1, k)])
            title = f"{title} (volume Dice {fg:.2f})"
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    names = saved["class_names"]
    legend = ", ".join(f"{names[str(c)]} {str(colours[c]).replace('tab:', '')}" for c in range(1, min(k, len(colours))))
    fig.suptitle(f"test volume {case}, slice {z} (seed {seed}): {legend}")
    return _save(fig, out / "prediction_overlay.png")


__all__ = ["DemoConfig", "run_demo", "table_rows", "format_table", "write_figures"]
