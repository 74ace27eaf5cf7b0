"""The TA-DFKD paper's teacher-agnostic robustness study, in one command.

Shin & Choi, "Teacher as a Lenient Expert: Teacher-Agnostic Data-Free Knowledge Distillation", AAAI 2024
(arXiv:2402.12406), Experiments: several teachers of one architecture with similar test accuracy, every method
distilled from each of them over repeated runs. The paper reports
  Table 3        acc_last[k] mean +- std over the repeated runs, and acc_max, per method and teacher;
  Fig. 7 / A3    teacher accuracy - student acc_max, per teacher; robustness = a short box across teachers;
  Fig. 8 / A4    acc_max - acc_last[k]; stability = a small drop at the end of training.
Its claim: TA-DFKD has the smallest gap spread across teachers and the smallest end-of-training drop.

What this script does
  1. Teachers: the paths given with --teachers, or made with train_teacher.py (one run per --teacher-seeds entry,
     plus a snapshot teacher per --snapshot-epochs entry, as the paper drew its five teachers from one long run);
     teachers below --min-teacher-acc are dropped (the paper kept CIFAR-10 teachers >= 91 %, CIFAR-100 >= 75 %).
  2. Runs every method x teacher x seed as `python METHOD.py ...` in its own process (methods stay independent),
     --jobs at a time; with GPUs, run i gets CUDA_VISIBLE_DEVICES = GPU (slot mod #GPUs). On the CPU each run gets
     OMP_NUM_THREADS = cores / jobs unless the variable is already set.
  3. Resumable: a run with summary.json is done and skipped; a run with checkpoint.pt is continued with --resume; a
     run that died before its first checkpoint is started again. Re-running the same command continues the study.
  4. Writes results.md, results.csv (one row per method x teacher), runs.csv (one row per run) and methods.csv (one
     row per method: spreads across teachers) into --out, and the figures results.md links: fig1_curves.svg (every
     run's accuracy curve), fig7_gap.svg (teacher - student acc_max), fig8_drop.svg (acc_max - acc_last[k]).

Conventions (stated in results.md too)
  +- is the SAMPLE standard deviation over seeds (n-1 denominator); the paper does not say which it used. With one
  seed it is undefined (n/a). acc_max of a method x teacher is the maximum over its runs of each run's peak test
  accuracy ("peak accuracy ... over all the repeated runs"; Table A3 = teacher - this value, Table A4 = this value -
  the mean acc_last[k], which reproduces the paper's numbers, e.g. DAFL CIFAR-10 T3: 88.08 - 68.87 = 19.21). acc_max is
  TEST-SELECTED (DFKD has no validation data); acc_last[k] and final_acc are the honest numbers. The spread of the gap
  across teachers is given as range (max - min, the length of Fig. 7's whisker-to-whisker box) and sample std.

Run
  python robustness.py --jobs 2                          # digits, 6 methods, 3 teachers (seeds 0,1,2) x 2 seeds:
                                                         #   40.9 min on 2 CPU cores without pre_dfkd (README)
  python robustness.py --jobs 2 --teacher-seeds 0,1 --seeds 0   # a smaller study: 2 teachers x 1 seed
  python robustness.py --methods dafl,dfad --seeds 0 --method-args "dfad:--lr-student 0.05"
  python robustness.py --dataset cifar10 --teachers t1.pt t2.pt t3.pt t4.pt t5.pt --seeds 0,1,2,3   # Table 3 scale
  python robustness.py --dataset cifar10 --teacher-seeds 0 --snapshot-epochs 300,400,450 --min-teacher-acc 91
  python robustness.py --dataset folder --data-root DIR --teacher-seeds 0,1 --snapshot-epochs 60 \
      --teacher-args "--epochs 80 --milestones 40,60" --min-teacher-acc 85 --epochs 40   # unzipped CIFAR-10 JPEGs
  python robustness.py --print-commands > todo.txt       # one line per pending run (SLURM array, GNU parallel)
  python robustness.py --collect runs/ --out report/     # tables from run directories made anywhere
"""
import argparse
import csv
import glob
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from common import COLORS, DATASETS, DEFAULT_TEACHER_ARCH, fail, load_teacher, svg_panel, write_svg, one_line_errors

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = ("dafl", "dfad", "cmi", "fast", "pre_dfkd", "ssd_kd", "ta_dfkd")  # the paper's order; Fast, SSD-KD not in it
DEFAULT_METHODS = ("dafl", "dfad", "cmi", "pre_dfkd", "ssd_kd", "ta_dfkd")  # README study; fast.py on request
# Accuracy floor for made or given teachers. cifar10/100: the TA appendix ("not below 91% for CIFAR-10 and 75% for
# CIFAR-100"). digits/mnist: ours (our digits recipe reaches ~99 %; the TA MNIST teachers were 98.9 and 99.2 %).
# tinyimagenet/folder: no floor (TA fine-tuned ImageNet models to ~75 %; our from-scratch recipe gets less).
TEACHER_FLOOR = {"digits": 97.0, "mnist": 98.0, "cifar10": 91.0, "cifar100": 75.0, "tinyimagenet": 0.0, "folder": 0.0}
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "config.json")


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-root", default="data", help="passed to train_teacher.py and every method")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method scripts (default: "
                   "the six of the README study; also accepted: fast)")
    p.add_argument("--teachers", nargs="+", default=None, help="teacher files to use instead of making them")
    p.add_argument("--teacher-seeds", default="0,1,2", help="made teachers: one train_teacher.py run per seed")
    p.add_argument("--snapshot-epochs", default="", help="made teachers: also keep a snapshot teacher at these "
                   "epochs of each run (train_teacher.py --snapshot-epochs)")
    p.add_argument("--teacher-arch", default=None, help="made teachers: architecture (default: the dataset's)")
    p.add_argument("--teacher-args", default="", help="extra arguments for train_teacher.py, e.g. \"--epochs 100\"")
    p.add_argument("--min-teacher-acc", type=float, default=None, help="drop teachers below this test accuracy "
                   "(default per dataset: " + ", ".join(f"{k} {v:g}" for k, v in TEACHER_FLOOR.items()) + ")")
    p.add_argument("--seeds", default="0,1", help="distillation seeds per method x teacher (the paper ran 4)")
    p.add_argument("--epochs", type=int, default=None, help="--epochs for every method (default: each method's)")
    p.add_argument("--run-args", default="", help="extra arguments for every method, e.g. "
                   "\"--device cuda --amp bf16\" (a single flag: --run-args=--channels-last)")
    p.add_argument("--method-args", action="append", default=[], metavar="METHOD:ARGS",
                   help="extra arguments for one method, repeatable: --method-args \"dfad:--epochs 2\"")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: #GPUs, else 1)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread runs over (default: "
                   "CUDA_VISIBLE_DEVICES, else all visible GPUs; 'none' for none)")
    p.add_argument("--out", default=None, help="study directory: teachers/, runs/, results.* (default "
                   "runs/robustness-<dataset>; with --collect, the collected directory)")
    p.add_argument("--print-commands", action="store_true", help="print one command line per pending run and exit")
    p.add_argument("--collect", default=None, metavar="DIR", help="only build the tables from every run directory "
                   "(summary.json + config.json) under DIR")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs (default: this one)")
    args = p.parse_args(argv)

    def ints(flag, text):
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            fail(f"{flag} must be comma-separated integers, got {text!r}; e.g. {flag} 0,1,2")
    args.seeds = ints("--seeds", args.seeds)
    args.teacher_seeds = ints("--teacher-seeds", args.teacher_seeds)
    args.snapshot_epochs = ints("--snapshot-epochs", args.snapshot_epochs)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.out = args.out or args.collect or os.path.join("runs", f"robustness-{args.dataset}")
    if args.min_teacher_acc is None:
        args.min_teacher_acc = TEACHER_FLOOR[args.dataset]
    if args.collect is not None:
        if not os.path.isdir(args.collect):
            fail(f"--collect {args.collect} is not a directory; pass the folder holding the run directories")
        return args
    for m in args.methods:
        if m not in METHODS:
            fail(f"unknown method {m!r} in --methods; choose from {','.join(METHODS)}")
        if not os.path.isfile(os.path.join(ROOT, m + ".py")):
            fail(f"{m}.py not found in {ROOT}; drop {m} from --methods")
    if not args.methods or not args.seeds:
        fail("--methods and --seeds must not be empty; e.g. --methods dafl,dfad --seeds 0,1")
    if args.teachers is None and not args.teacher_seeds:
        fail("no teachers: pass --teachers PATH ... or --teacher-seeds 0,1,2 to make them")
    if args.epochs is not None and args.epochs < 1:
        fail("--epochs must be >= 1; drop it to use each method's default")
    per_method = {}
    for spec in args.method_args:
        method, sep, extra = spec.partition(":")
        if not sep or method.strip() not in args.methods:
            fail(f"--method-args {spec!r} must read METHOD:ARGS with METHOD one of {','.join(args.methods)}; "
                 f"e.g. --method-args \"dfad:--epochs 2\"")
        per_method.setdefault(method.strip(), []).extend(shlex.split(extra))
    args.per_method = per_method
    args.run_args, args.teacher_args = shlex.split(args.run_args), shlex.split(args.teacher_args)
    args.gpus = find_gpus(args.gpus)
    args.jobs = args.jobs or max(1, len(args.gpus))
    if args.jobs < 1:
        fail("--jobs must be >= 1")
    return args


def find_gpus(spec):
    """GPU ids to hand out through CUDA_VISIBLE_DEVICES: --gpus, else the inherited CUDA_VISIBLE_DEVICES, else all."""
    if spec is not None:
        return [] if spec.strip().lower() in ("", "none") else [g.strip() for g in spec.split(",") if g.strip()]
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [g.strip() for g in inherited.split(",") if g.strip() and g.strip() != "-1"]
    import torch  # device_count() asks NVML; no CUDA context is created in this process
    return [str(i) for i in range(torch.cuda.device_count())]


# ------------------------------------------------------------------------------------------------------------------
# Planning: which teachers and runs exist, which are pending (pure file checks, nothing is written)
# ------------------------------------------------------------------------------------------------------------------


def teacher_jobs(args):
    """Made teachers -> (expected teacher paths, jobs for the train_teacher.py runs whose final file is missing)."""
    arch = args.teacher_arch or DEFAULT_TEACHER_ARCH[args.dataset]
    paths, jobs = [], []
    for seed in args.teacher_seeds:
        final = os.path.join(args.out, "teachers", f"{args.dataset}_{arch}_s{seed}.pt")
        stem = os.path.splitext(final)[0]
        paths += [f"{stem}_e{e}.pt" for e in args.snapshot_epochs] + [final]
        if os.path.exists(final):
            continue  # finished; train_teacher.py would keep it anyway
        cmd = [args.python, os.path.join(ROOT, "train_teacher.py"), "--dataset", args.dataset, "--data-root",
               args.data_root, "--arch", arch, "--seed", str(seed), "--out", final]
        if args.snapshot_epochs:
            cmd += ["--snapshot-epochs", ",".join(map(str, args.snapshot_epochs))]
        if os.path.exists(stem + ".state.pt"):
            cmd.append("--resume")  # interrupted teacher run
        jobs.append(dict(name=os.path.basename(stem), cmd=cmd + args.teacher_args, log=stem + ".log"))
    return paths, jobs


def select_teachers(paths, floor, dataset):
    """Teachers at or above the floor, in the given order, with their test accuracy (None when the file has none)."""
    kept = []
    for path in paths:
        _, meta = load_teacher(path, dataset, quiet=True)  # stdout stays the command list (--print-commands)
        acc = meta.get("test_acc")
        if acc is not None and acc < floor:
            print(f"teacher {path}: test acc {acc:.2f}% < floor {floor:g}%; dropped", file=sys.stderr, flush=True)
            continue
        print(f"teacher {path}: test acc " + (f"{acc:.2f}%" if acc is not None else "unknown (kept)"), file=sys.stderr,
              flush=True)
        kept.append(path)
    stems = [teacher_label(p) for p in kept]
    if len(set(stems)) != len(stems):
        fail(f"teacher file names must differ (runs are named by them): {', '.join(kept)}; rename or copy them")
    if not kept:
        fail(f"no teacher reaches --min-teacher-acc {floor:g}; lower the floor or train longer (--teacher-args)")
    return kept


def teacher_label(path):
    return os.path.splitext(os.path.basename(str(path)))[0]


def run_jobs_for(args, teachers):
    """Every method x teacher x seed -> (jobs to run, all run dirs). Done runs are skipped, interrupted ones resumed."""
    jobs, planned = [], []
    for method in args.methods:
        for teacher in teachers:
            for seed in args.seeds:
                out = os.path.join(args.out, "runs", f"{method}-{teacher_label(teacher)}-s{seed}")
                planned.append(out)
                if os.path.exists(os.path.join(out, "summary.json")):
                    continue
                cmd = [args.python, os.path.join(ROOT, method + ".py"), "--dataset", args.dataset, "--data-root",
                       args.data_root, "--teacher", teacher, "--seed", str(seed), "--out", out]
                if args.epochs is not None:
                    cmd += ["--epochs", str(args.epochs)]
                cmd += args.run_args + args.per_method.get(method, [])  # later flags win in argparse
                resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
                stale = not resume and any(os.path.exists(os.path.join(out, f)) for f in RUN_FILES)
                jobs.append(dict(name=os.path.basename(out), cmd=cmd + (["--resume"] if resume else []),
                                 log=os.path.join(out, "log.txt"), out=out, stale=stale))
    return jobs, planned


def command_line(job):
    line = shlex.join(job["cmd"])
    if job.get("stale"):  # died before its first checkpoint: clear the partial outputs, start again
        line = shlex.join(["rm", "-f"] + [os.path.join(job["out"], f) for f in RUN_FILES]) + " && " + line
    return line


# ------------------------------------------------------------------------------------------------------------------
# Execution: a pool of --jobs slots; each run is its own process with its own log
# ------------------------------------------------------------------------------------------------------------------


def run_jobs(jobs, n_jobs, gpus):
    """Run the jobs, n_jobs at a time; returns {name: exit code}. Slot i gets GPU gpus[i % len(gpus)]."""
    slots, lock, results, t0 = list(range(n_jobs)), threading.Lock(), {}, time.time()
    threads = str(max(1, (os.cpu_count() or 1) // n_jobs))

    def work(job):
        with lock:
            slot = slots.pop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        env.setdefault("OMP_NUM_THREADS", threads)  # n_jobs processes share the cores instead of oversubscribing
        if job.get("stale"):
            for f in RUN_FILES:
                if os.path.exists(os.path.join(job["out"], f)):
                    os.remove(os.path.join(job["out"], f))
        os.makedirs(os.path.dirname(job["log"]) or ".", exist_ok=True)
        start = time.time()
        with open(job["log"], "a") as log:
            log.write(f"$ {shlex.join(job['cmd'])}\n")
            log.flush()
            rc = subprocess.call(job["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env)
        with lock:
            slots.append(slot)
            results[job["name"]] = rc
            state = "done" if rc == 0 else f"FAILED (exit {rc}; see {job['log']})"
            print(f"[{len(results)}/{len(jobs)}] {job['name']} {state} in {time.time() - start:.0f} s "
                  f"(study {time.time() - t0:.0f} s)", flush=True)

    pool = ThreadPoolExecutor(max_workers=n_jobs)
    try:
        for future in [pool.submit(work, job) for job in jobs]:
            future.result()
    except BaseException:  # Ctrl-C (the runs got it too) or an error: start nothing more; checkpoints stay
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


# ------------------------------------------------------------------------------------------------------------------
# Tables: records (one per finished run) -> aggregates -> results.md / results.csv / runs.csv / methods.csv
# ------------------------------------------------------------------------------------------------------------------


def read_run(run_dir):
    """One finished run -> record. The teacher is named by its file stem (summary.json or config.json), else by its
    accuracy. A summary.json or config.json that cannot be read is one line naming it, exit 2."""
    try:
        return _read_run(run_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"{run_dir}: summary.json or config.json is not a readable run record ({type(e).__name__}: "
             f"{str(e)[:80]}); re-run that run, or move its directory out of the collected folder")


def _read_run(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    cfg = {}
    if os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
    t_acc = None if s.get("teacher_acc") is None else float(s["teacher_acc"])  # None: an official file without meta
    path = s.get("teacher") or cfg.get("teacher")
    teacher = teacher_label(path) if path else f"teacher@{fmt(t_acc)}"
    return dict(method=s["method"], dataset=s["dataset"], teacher=teacher, teacher_acc=t_acc,
                seed=s["seed"], acc_last_k=float(s["acc_last_k"]), acc_max=float(s["acc_max"]),
                final_acc=float(s["final_acc"]), k=s["k"], epochs=s["epochs"], wall_s=float(s["wall_s"]), dir=run_dir)


def collect(root):
    return [read_run(os.path.dirname(p)) for p in
            sorted(glob.glob(os.path.join(glob.escape(root), "**", "summary.json"), recursive=True))]


def sample_std(values):
    """Sample standard deviation (n-1 denominator); None for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def aggregate(records):
    """-> (cells: one dict per method x teacher, methods: one dict per method with spreads across teachers, order)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    methods += sorted({r["method"] for r in records} - set(methods))
    teachers = list(dict.fromkeys(r["teacher"] for r in records))
    cells, per_method = [], []
    for m in methods:
        rows = []
        for t in teachers:
            runs = sorted((r for r in records if r["method"] == m and r["teacher"] == t), key=lambda r: r["seed"])
            if not runs:
                continue
            last = [r["acc_last_k"] for r in runs]
            acc_max = max(r["acc_max"] for r in runs)  # peak over all repeated runs (Table 3)
            last_mean = statistics.fmean(last)
            rows.append(dict(
                method=m, teacher=t, teacher_acc=runs[0]["teacher_acc"], n=len(runs),
                seeds=" ".join(str(r["seed"]) for r in runs), k=runs[0]["k"], epochs=runs[0]["epochs"],
                acc_last_k_mean=last_mean, acc_last_k_std=sample_std(last), acc_max=acc_max,
                acc_max_run_mean=statistics.fmean(r["acc_max"] for r in runs),
                final_acc_mean=statistics.fmean(r["final_acc"] for r in runs),
                gap=None if runs[0]["teacher_acc"] is None else runs[0]["teacher_acc"] - acc_max,  # Table A3 / Fig. 7
                drop=acc_max - last_mean,                                               # Table A4 / Fig. 8
                drop_run_mean=statistics.fmean(r["acc_max"] - r["acc_last_k"] for r in runs),
                wall_s_mean=statistics.fmean(r["wall_s"] for r in runs)))
        cells += rows
        gaps, drops = [r["gap"] for r in rows if r["gap"] is not None], [r["drop"] for r in rows]
        per_method.append(dict(method=m, teachers=len(rows), gap_mean=statistics.fmean(gaps) if gaps else None,
                               gap_std=sample_std(gaps), gap_range=max(gaps) - min(gaps) if gaps else None,
                               drop_mean=statistics.fmean(drops), drop_max=max(drops),
                               drop_run_mean=statistics.fmean(r["drop_run_mean"] for r in rows)))
    return cells, per_method, methods, teachers


def fmt(v, nd=2):
    return "n/a" if v is None else f"{v:.{nd}f}"


def write_csv(path, rows, fields):
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(path + ".tmp", path)


def write_figures(out, records, cells, methods, teachers, names):
    """The paper's figures as SVG beside results.md -> [(title, file)]: Fig. 1-style accuracy curves of every run, one
    panel per method, one colour per teacher; Fig. 7-style gap per teacher (bars, grouped by method); Fig. 8-style
    acc_max - acc_last[k] per teacher, one line per method."""
    tcolor = {t: COLORS[i % len(COLORS)] for i, t in enumerate(teachers)}
    tlabel = {t: f"{names[t]} ({fmt(next(c['teacher_acc'] for c in cells if c['teacher'] == t))}%)" for t in teachers}
    cols, pw, ph = min(2, len(methods)), 480, 300
    panels = []
    for i, m in enumerate(methods):
        series = []
        runs = [r for r in records if r["method"] == m]
        for r in sorted(runs, key=lambda r: (teachers.index(r["teacher"]), r["seed"])):
            path, hist = os.path.join(r["dir"], "metrics.jsonl"), []
            if os.path.exists(path):  # runs collected without their metrics.jsonl get an empty curve
                with open(path) as f:
                    hist = [json.loads(line) for line in f if line.strip()]
            series.append({"x": [h["epoch"] for h in hist], "y": [h["acc"] for h in hist],
                           "label": tlabel[r["teacher"]], "color": tcolor[r["teacher"]],
                           "id": f"{m}/{r['teacher']}/s{r['seed']}"})
        panels.append(svg_panel(i % cols * pw, i // cols * ph, pw, ph, series, m, "epoch", "student test accuracy (%)",
                                ylim=(0, 100)))
    rows = (len(methods) + cols - 1) // cols
    write_svg(os.path.join(out, "fig1_curves.svg"), panels, cols * pw, rows * ph)
    cell = {(c["method"], c["teacher"]): c for c in cells}
    gaps = [{"y": [cell[(m, t)]["gap"] if (m, t) in cell else None for m in methods], "label": tlabel[t],
             "color": tcolor[t], "id": t} for t in teachers]
    write_svg(os.path.join(out, "fig7_gap.svg"), [svg_panel(
        0, 0, 640, 340, title="Fig. 7: teacher acc - student acc_max", xlabel="method", ylabel="gap (points)",
        bars=(methods, gaps))], 640, 340)
    drops = [{"x": list(range(1, len(teachers) + 1)), "y": [cell.get((m, t), {}).get("drop") for t in teachers],
              "label": m, "color": COLORS[i % len(COLORS)], "id": m, "markers": True} for i, m in enumerate(methods)]
    write_svg(os.path.join(out, "fig8_drop.svg"), [svg_panel(
        0, 0, 640, 340, drops, "Fig. 8: acc_max - acc_last[k]", "teacher", "drop (points)",
        xlim=(0.5, len(teachers) + 0.5), xticks=[(i + 1, names[t]) for i, t in enumerate(teachers)])], 640, 340)
    return [("Fig. 1-style accuracy curves", "fig1_curves.svg"), ("Fig. 7-style gap", "fig7_gap.svg"),
            ("Fig. 8-style drop", "fig8_drop.svg")]


def write_results(out, records, header_lines, failed=()):
    """results.md (the paper's tables), results.csv (method x teacher), methods.csv (per method), runs.csv (per run)."""
    os.makedirs(out, exist_ok=True)
    if not records:
        print("no finished runs to tabulate", flush=True)
        return None
    cells, per_method, methods, teachers = aggregate(records)
    write_csv(os.path.join(out, "runs.csv"), records, ["method", "teacher", "teacher_acc", "seed", "acc_last_k",
                                                       "acc_max", "final_acc", "k", "epochs", "wall_s", "dir"])
    write_csv(os.path.join(out, "results.csv"), cells, list(cells[0]))
    write_csv(os.path.join(out, "methods.csv"), per_method, list(per_method[0]))
    cell = {(c["method"], c["teacher"]): c for c in cells}
    tacc = {c["teacher"]: c["teacher_acc"] for c in cells}
    names = {t: f"T{i + 1}" for i, t in enumerate(teachers)}
    max_n = max(c["n"] for c in cells)
    ks = ", ".join(f"{m} {'/'.join(sorted({str(c['k']) for c in cells if c['method'] == m}))}" for m in methods)
    md = ["# Teacher-agnostic robustness study (TA-DFKD paper: Table 3, Fig. 7 / Table A3, Fig. 8 / Table A4)", ""]
    md += header_lines + [
        "", "Conventions: `+-` is the **sample** standard deviation over seeds (n-1 denominator; the paper does not "
        "state its convention), n/a with one seed. `acc_last[k]` = mean test accuracy over a run's last k evaluations "
        f"(k: {ks}), averaged over seeds. `acc_max` = the highest test accuracy any seed reached: **test-selected** "
        "(DFKD has no validation data), so `acc_last[k]` and final accuracy are the honest numbers.",
        "", "| teacher | file | test acc |", "|---|---|---|"]
    md += [f"| {names[t]} | {t} | {fmt(tacc[t])} |" for t in teachers]
    figures = write_figures(out, records, cells, methods, teachers, names)
    md += ["", "Figures: " + ", ".join(f"[{title}]({name})" for title, name in figures) + "."]
    md += ["", "## Table 3: acc_last[k] mean +- std over seeds, and acc_max (test-selected)", ""]
    md.append("| method | " + " | ".join(f"{names[t]} ({fmt(tacc[t])}%) acc_last[k] | {names[t]} acc_max"
                                         for t in teachers) + " |")
    md.append("|---" * (1 + 2 * len(teachers)) + "|")
    for m in methods:
        parts = []
        for t in teachers:
            c = cell.get((m, t))
            if c is None:
                parts += ["-", "-"]
                continue
            n_note = f" (n={c['n']})" if c["n"] < max_n else ""
            parts += [f"{c['acc_last_k_mean']:.2f} +- {fmt(c['acc_last_k_std'])}{n_note}", f"{c['acc_max']:.2f}"]
        md.append(f"| {m} | " + " | ".join(parts) + " |")
    for title, key, extra in (
            ("Fig. 7 / Table A3: teacher acc - student acc_max (gap; robustness = small spread across teachers)", "gap",
             [("mean", "gap_mean"), ("std across teachers", "gap_std"), ("range (max-min)", "gap_range")]),
            ("Fig. 8 / Table A4: acc_max - acc_last[k] (end-of-training drop; stability = small)", "drop",
             [("mean", "drop_mean"), ("max", "drop_max"), ("per-run drop, mean", "drop_run_mean")])):
        md += ["", f"## {title}", ""]
        md.append("| method | " + " | ".join(names[t] for t in teachers) + " | "
                  + " | ".join(label for label, _ in extra) + " |")
        md.append("|---" * (1 + len(teachers) + len(extra)) + "|")
        for pm in per_method:
            m = pm["method"]
            vals = [fmt(cell[(m, t)][key]) if (m, t) in cell else "-" for t in teachers]
            md.append(f"| {m} | " + " | ".join(vals + [fmt(pm[k]) for _, k in extra]) + " |")
    md += ["", "Per-run drop = the mean over seeds of (that run's acc_max - its acc_last[k]); the paper's A4 value "
           "above uses the best seed's peak, so a seed-to-seed spread also raises it."]
    complete = [pm for pm in per_method if pm["teachers"] == len(teachers) and pm["gap_range"] is not None]
    if len(teachers) > 1 and len(complete) > 1:
        # Ties count: accuracies are multiples of 100/N test images, so equal ranges can differ by float rounding.
        def smallest(key):
            best = min(pm[key] for pm in complete)
            return [pm["method"] for pm in complete if pm[key] <= best + 1e-6], best

        def winners(names, best):
            return ", ".join(f"**{m}**" for m in names) + f" ({best:.2f}" + (", a tie)" if len(names) > 1 else ")")
        spread, spread_best = smallest("gap_range")
        drop, drop_best = smallest("drop_mean")
        md += ["", "## The paper's claim on this study",
               "", f"- smallest gap spread across teachers (range): {winners(spread, spread_best)}",
               f"- smallest mean end-of-training drop: {winners(drop, drop_best)}",
               "- the paper claims ta_dfkd for both; here it holds for "
               + {2: "both", 1: "one", 0: "neither"}[("ta_dfkd" in spread) + ("ta_dfkd" in drop)]
               + " (among methods run on every teacher; a tie counts as holding)."]
    if failed:
        md += ["", "## Unfinished runs (no summary.json; not in the tables)", ""] + [f"- {f}" for f in failed]
    with open(os.path.join(out, "results.md.tmp"), "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(os.path.join(out, "results.md.tmp"), os.path.join(out, "results.md"))
    print("\n".join(md), flush=True)
    print(f"\nwrote {out}/results.md, results.csv, methods.csv, runs.csv, "
          + ", ".join(name for _, name in figures), flush=True)
    return cells, per_method


def machine_line():
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.platform()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def last_line(path):
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1] if lines else "(empty log)"
    except OSError:
        return "(no log)"


def main(argv=None):
    args = parse_args(argv)
    if args.collect is not None:
        records = collect(args.collect)
        write_results(args.out, records, [f"Collected from `{args.collect}`: {len(records)} finished runs; summed run "
                                          f"time {sum(r['wall_s'] for r in records) / 60:.1f} min."])
        return records
    t0 = time.time()
    if args.teachers is not None:
        paths, t_jobs = list(args.teachers), []
    else:
        paths, t_jobs = teacher_jobs(args)
    if args.print_commands and t_jobs:
        print("\n".join(command_line(j) for j in t_jobs))
        print(f"# {len(t_jobs)} teacher runs pending: run them, then --print-commands again for the distillation runs "
              f"(the accuracy floor needs the finished teachers)", file=sys.stderr)
        return t_jobs
    if t_jobs:
        print(f"making {len(t_jobs)} teachers with train_teacher.py ({args.jobs} at a time)", flush=True)
        rcs = run_jobs(t_jobs, args.jobs, args.gpus)
        bad = [j["log"] for j in t_jobs if rcs[j["name"]] != 0]
        if bad:
            fail(f"teacher training failed, see {', '.join(bad)}; fix it and run the same command again")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:  # a given path, or a snapshot asked for after its teacher run had finished
        fail(f"teacher file(s) not found: {', '.join(missing)}; fix --teachers, or delete the finished teacher to "
             f"retrain it with the new --snapshot-epochs")
    teachers = select_teachers(paths, args.min_teacher_acc, args.dataset)
    jobs, planned = run_jobs_for(args, teachers)
    if args.print_commands:
        print("\n".join(command_line(j) for j in jobs))
        return jobs
    done = len(planned) - len(jobs)
    print(f"{len(planned)} runs = {len(args.methods)} methods x {len(teachers)} teachers x {len(args.seeds)} seeds: "
          f"{done} done, {sum('--resume' in j['cmd'] for j in jobs)} to resume, "
          f"{sum('--resume' not in j['cmd'] for j in jobs)} to start; {args.jobs} at a time"
          + (f" on GPUs {','.join(args.gpus)}" if args.gpus else ""), flush=True)
    rcs = run_jobs(jobs, args.jobs, args.gpus) if jobs else {}
    failed = [f"{j['name']}: " + (f"exit {rcs[j['name']]}: {last_line(j['log'])}" if rcs[j["name"]] else
                                  "stopped before its last epoch (no summary.json); it resumes on the next invocation")
              for j in jobs if not os.path.exists(os.path.join(j["out"], "summary.json"))]
    records = [read_run(d) for d in planned if os.path.exists(os.path.join(d, "summary.json"))]
    header = [f"Command: `{shlex.join(['python', 'robustness.py'] + list(sys.argv[1:] if argv is None else argv))}`",
              f"Dataset {args.dataset}; methods {', '.join(args.methods)}; {len(teachers)} teachers; seeds "
              f"{','.join(map(str, args.seeds))}; {len(records)}/{len(planned)} runs finished.",
              f"Machine: {machine_line()}; --jobs {args.jobs}; this invocation took {(time.time() - t0) / 60:.1f} min "
              f"({len(jobs)} runs executed, {done} already done); summed run time "
              f"{sum(r['wall_s'] for r in records) / 60:.1f} min."]
    write_results(args.out, records, header, failed)
    if failed:
        print(f"{len(failed)} runs did not finish; run the same command again to continue them (finished runs are "
              f"kept, interrupted ones resume from their checkpoint)",
              file=sys.stderr, flush=True)
        sys.exit(1)
    return records


if __name__ == "__main__":
    main()
