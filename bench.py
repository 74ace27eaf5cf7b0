"""bench.py: speed, FLOPs and MFU of every method's OWN training steps at paper settings (issue 14).

For each method it imports the method file, builds the paper's networks for the chosen dataset and pair (random
weights; the teacher's BN running statistics are the cumulative batch statistics of two batches of noise images, so
the BN losses are non-trivial), and calls the method's own step functions (no copied loop). No dataset or teacher
file is needed. Every step function of an iteration is timed on its own (warm-up calls, then --iters timed calls,
device-synchronised), and an iteration is composed from them exactly as the method's loop does:

  ms per iteration   = sum over steps of (calls per iteration x median ms per call); range = same with min / max
  FLOPs per iteration = sum of (calls x FLOPs of one call), each call counted once by torch.utils.flop_counter
                       .FlopCounterMode (forward + backward; matmuls and convolutions, 2 FLOPs per MAC)
  TFLOP/s            = FLOPs per iteration / time per iteration;  MFU = TFLOP/s / dense peak of the dtype
                       (measured here: the faster of a large torch.mm and a dense 3x3 conv, fp32 and bf16;
                       --peak-tflops overrides)
  synthesised img/s  = images out of every generator forward (counted by a forward hook), per second
  distilled img/s    = images in the student's KD update steps (teacher training: its training images), per second
  projected schedule = sum over steps of (calls in the full paper schedule x median time per call); where every
                       iteration is alike this is exactly iterations x time per iteration

Evaluation, checkpoints and logging are not part of an iteration. Outputs: a table on stdout, bench.md and bench.json
in --out. With no flags on a CPU it cuts the batch to 8 and times 2 calls per step (every reduction is listed in the
report); on a GPU it runs the full paper batch. `--gpu-check DIR` is the prepared device check (teacher training on
the CIFAR-10 JPEG folder, the full-batch table fp32 vs bf16 + channels_last, and bf16-vs-fp32 loss agreement);
`--dry-run` runs it on the CPU at tiny sizes.

Run
  python bench.py                                   # CPU: every method, 4 variants (fp32 only where bf16 is
                                                    # emulated), reduced batch, < 10 min
  python bench.py --dataset digits --amp off,bf16 --channels-last 0
  python bench.py --device cuda                     # GPU: full paper batch
  python bench.py --gpu-check /tmp/cifar10-jpeg     # one H200 call, < 8 min, writes gpu_check.md/.json
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import (DEFAULT_TEACHER_ARCH, NORMALIZATION, Normalize, build_model, cpu_bf16_native, fail, pick_device,
                    one_line_errors)

# classes, channels, image size, training-set size (teacher epochs) per dataset
SHAPES = {"cifar10": (10, 3, 32, 50000), "cifar100": (100, 3, 32, 50000), "tinyimagenet": (200, 3, 64, 100000),
          "mnist": (10, 1, 32, 60000), "digits": (10, 1, 16, 1257), "folder": (10, 3, 32, 30000)}
# The only published wall times: SSD-KD paper (Liu et al., CVPR 2024) Tables 1 and 2, total hours per run, "on 1 NVIDIA
# V100 GPU using 12 cores of Intel Xeon Gold 6240R CPU". Keyed (dataset, teacher, student) -> {method label: hours}.
PAPER_HW = "1x V100 + 12-core Xeon Gold 6240R (SSD-KD paper Tab. 1/2)"
PAPER_HOURS = {
    ("cifar10", "resnet34", "resnet18"): {"SSD-KD T1": 1.11, "SSD-KD T2": 4.20, "Fast2": 3.92, "Fast5": 4.34,
                                          "Fast10": 4.72, "CMI": 15.49, "DAFL": 303.50, "DeepInv": 25.62},
    ("cifar10", "wrn40_2", "wrn16_1"): {"SSD-KD T1": 0.77, "SSD-KD T2": 1.48, "Fast2": 1.46, "Fast5": 1.61,
                                        "Fast10": 1.72, "CMI": 9.87, "DAFL": 96.57, "DeepInv": 10.62},
    ("cifar100", "resnet34", "resnet18"): {"SSD-KD T1": 1.12, "SSD-KD T2": 4.22, "Fast2": 4.02, "Fast5": 4.35,
                                           "Fast10": 4.50, "CMI": 15.42, "DAFL": 303.54, "DeepInv": 25.88},
    ("cifar100", "wrn40_2", "wrn16_1"): {"SSD-KD T1": 0.77, "SSD-KD T2": 1.52, "Fast2": 1.44, "Fast5": 1.56,
                                         "Fast10": 1.65, "CMI": 10.01, "DAFL": 96.62, "DeepInv": 10.62},
}
PAPER_LABELS = {"ssd_kd": ("SSD-KD T1",), "fast": ("Fast2", "Fast5", "Fast10"), "cmi": ("CMI",), "dafl": ("DAFL",)}
CPU_BATCH = 8  # the CPU default batch (every method): all methods x 4 variants aimed at < 10 min on 2 idle cores
ALL_METHODS = ("teacher", "ta_dfkd", "ssd_kd", "dafl", "dfad", "cmi", "fast", "pre_dfkd")


# ---------------------------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()  # SYNC: timing boundaries only


class Phase:
    """One step function of a method: fn() runs one call and returns {name: scalar loss tensor}; per_iter calls make
    one iteration, per_schedule calls the full paper schedule; distilled = student-update images per call."""

    def __init__(self, name, fn, per_iter, per_schedule, distilled, enter=None):
        self.name, self.fn, self.per_iter, self.per_schedule = name, fn, per_iter, per_schedule
        self.distilled, self.enter = distilled, enter


class SynthCounter:
    """Counts images leaving generator forwards. The hook is a plain closure, so deep copies of a hooked generator
    (SSD-KD's and Fast's inner-loop clones) share it and count into the same total."""

    def __init__(self, modules):
        self.box = [0]
        box = self.box

        def hook(module, inputs, output):
            box[0] += output.shape[0]
        self.handles = [m.register_forward_hook(hook) for m in modules]

    @property
    def n(self):
        return self.box[0]

    @n.setter
    def n(self, value):
        self.box[0] = value

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def calibrate_bn(model, channels, size, device, batch=8, batches=2):
    """Non-trivial BN running statistics: cumulative batch statistics of `batches` noise batches (U(0,1) images,
    roughly normalised), then eval mode and frozen, as load_teacher returns a teacher."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(batches):
        model((torch.rand(batch, channels, size, size, device=device) - 0.45) / 0.25)
    for m in bns:
        m.momentum = 0.1
    return model.eval().requires_grad_(False)


class _Global:
    """Stand-in for FlopCounterMode's per-module tracker: its autograd hooks break torch.autograd.grad on leaf
    tensors (PRE-DFKD's z-step), and only the global total is used here."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(fn):
    """FLOPs of one call of fn (forward and backward), as torch.utils.flop_counter.FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _Global()
    with counter:
        fn()
    return counter.get_total_flops()


def measure_peak(device, dtype, n=None, reps=None):
    """Dense peak in TFLOP/s for dtype: the best of `reps` n x n torch.mm calls (2 n^3 FLOPs each) and of a dense
    3x3 convolution (256 -> 256 channels, 16x16). Both are measured because on CPUs the conv library can beat the
    BLAS that torch.mm uses (fp32 here: mm 0.19, conv 0.38 TFLOP/s on 2 cores), and a "peak" below what the
    method's own convolutions reach would report an MFU over 100 %."""
    n = n or (8192 if device.type == "cuda" else 2048)
    reps = reps or (20 if device.type == "cuda" else 4)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(32 if device.type == "cuda" else 8, 256, 16, 16, device=device, dtype=dtype)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype)
    conv_flops = 2 * x.shape[0] * 256 * 256 * 9 * 16 * 16
    best = 0.0
    for fn, flops in ((lambda: torch.mm(a, b), 2 * n ** 3), (lambda: F.conv2d(x, w, padding=1), conv_flops)):
        with torch.no_grad():
            for _ in range(2):
                fn()
            for _ in range(reps):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                best = max(best, flops / (time.perf_counter() - t0) / 1e12)
    return best


def summarize(phases, peak_tflops=None):
    """Compose one iteration from per-call statistics (dicts with per_iter, per_schedule, median_s, min_s, max_s,
    flops, synth, distilled): time, range, FLOPs, TFLOP/s, MFU, img/s and the projected full-schedule time."""
    t = sum(p["per_iter"] * p["median_s"] for p in phases)
    flops = sum(p["per_iter"] * p["flops"] for p in phases)
    tflops = flops / t / 1e12
    return {"ms_median": 1e3 * t, "ms_min": 1e3 * sum(p["per_iter"] * p["min_s"] for p in phases),
            "ms_max": 1e3 * sum(p["per_iter"] * p["max_s"] for p in phases), "gflop_per_iter": flops / 1e9,
            "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
            "synth_img_s": sum(p["per_iter"] * p["synth"] for p in phases) / t,
            "distilled_img_s": sum(p["per_iter"] * p["distilled"] for p in phases) / t,
            "projected_h": sum(p["per_schedule"] * p["median_s"] for p in phases) / 3600}


def available_methods():
    here = os.path.dirname(os.path.abspath(__file__))
    return [m for m in ALL_METHODS if m == "teacher" or os.path.isfile(os.path.join(here, f"{m}.py"))]


# ---------------------------------------------------------------------------------------------- adapters
# Each adapter builds what the method's train() builds, at the paper settings its own parse_args() gives for the
# dataset, and returns a spec whose phases call the method's step functions.

def method_args(mod, cfg, extra=()):
    argv = ["--dataset", cfg.dataset, "--amp", cfg.amp, "--out", os.path.join(cfg.tmp, "run"), *extra]
    args = mod.parse_args(argv + (["--channels-last"] if cfg.cl else []))
    args.device = str(cfg.device)
    for k, v in cfg.overrides.items():
        if hasattr(args, k):
            setattr(args, k, v)
    return args


def pair(cfg, mod, default_teacher):
    teacher_arch = cfg.teacher_arch or default_teacher
    student = cfg.student or getattr(mod, "DEFAULT_STUDENT", {}).get(teacher_arch)
    return teacher_arch, student


def make_teacher(cfg, arch):
    k, c, s, _ = SHAPES[cfg.dataset]
    t = build_model(arch, k, c).to(cfg.device)
    t = calibrate_bn(t, c, s, cfg.device)
    return t.to(memory_format=torch.channels_last) if cfg.cl else t


def fake_data(cfg):
    k, c, s, _ = SHAPES[cfg.dataset]
    mean, std = NORMALIZATION.get(cfg.dataset, ((0.5,) * c, (0.25,) * c))
    return types.SimpleNamespace(num_classes=k, in_channels=c, image_size=s, mean=mean, std=std)


def set_batch(args, cfg, *names):
    for n in names:
        if cfg.batch:
            setattr(args, n, cfg.batch)


def adapt_teacher(cfg):
    import train_teacher as m
    k, c, s, n_train = SHAPES[cfg.dataset]
    arch = cfg.teacher_arch or DEFAULT_TEACHER_ARCH[cfg.dataset]
    r = m.RECIPES[cfg.dataset]
    b = cfg.batch or r["batch_size"]
    model = build_model(arch, k, c).to(cfg.device)
    model = model.to(memory_format=torch.channels_last) if cfg.cl else model
    opt = (torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=0.9, weight_decay=r["weight_decay"])
           if r["optimizer"] == "sgd" else torch.optim.Adam(model.parameters(), lr=r["lr"]))
    d = fake_data(cfg)
    normalize = Normalize(d.mean, d.std).to(cfg.device)
    x, y = torch.rand(b, c, s, s, device=cfg.device), torch.randint(k, (b,), device=cfg.device)
    model.train()
    steps = r["epochs"] * math.ceil(n_train / r["batch_size"])

    def step():
        return {"ce": m.train_step(model, opt, normalize, x, y, r["padding"], r["flip"], cfg.amp, cfg.cl)}
    return dict(iteration="1 SGD step on a real batch (crop + flip on the device)", pair=arch, batch=b,
                paper_batch=r["batch_size"], generators=[], schedule=f"{r['epochs']} epochs x "
                f"{math.ceil(n_train / r['batch_size'])} steps", schedule_iters=steps,
                phases=[Phase("train_step", step, 1, steps, b)])


def adapt_ta_dfkd(cfg):
    import ta_dfkd as m
    args = method_args(m, cfg)
    paper_b = args.batch_size
    set_batch(args, cfg, "batch_size")
    t_arch, _ = pair(cfg, m, DEFAULT_TEACHER_ARCH[cfg.dataset])
    args.student = cfg.student or args.student
    d, dev = fake_data(cfg), cfg.device
    fmt = torch.channels_last if cfg.cl else torch.contiguous_format
    teacher = make_teacher(cfg, t_arch)
    normalize = Normalize(d.mean, d.std).to(dev)
    student = build_model(args.student, d.num_classes, d.in_channels).to(dev, memory_format=fmt).train()
    generator = m.TAGenerator(args.nz, args.ngf, d.image_size, d.in_channels).to(dev, memory_format=fmt).train()
    opt_s = torch.optim.SGD(student.parameters(), lr=args.lr_s, momentum=0.9, weight_decay=args.weight_decay)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    keys = ("loss/kd", "loss/g", "loss/adv", "loss/bns", "loss/tv", "loss/l2", "sel/kept_frac")

    def fresh():
        acc = {k: torch.zeros((), device=dev) for k in keys}
        acc.update({"n_s": 0, "n_g": 0, "n_sel": 0, "sel/rounds": 0})
        return acc

    def s_step():
        acc = fresh()
        m.student_step(student, generator, teacher, normalize, opt_s, scaler, args, dev, acc)
        return {"kd": acc["loss/kd"]}

    def g_step():
        acc = fresh()
        m.generator_step(generator, student, teacher, normalize, opt_g, scaler, args, dev, acc)
        return {k[5:]: acc[k] for k in keys if k.startswith("loss/") and k != "loss/kd"}
    n_it = args.epochs * args.iters
    return dict(iteration=f"{args.student_steps} student steps + 1 generator step", pair=f"{t_arch}->{args.student}",
                batch=args.batch_size, paper_batch=paper_b, generators=[generator], schedule_iters=n_it,
                schedule=f"{args.epochs} epochs x {args.iters} iterations",
                phases=[Phase("generator_step", g_step, 1, n_it, 0),
                        Phase("student_step", s_step, args.student_steps, n_it * args.student_steps, args.batch_size)])


def _dafl_like(cfg, m, gen_eps):
    args = method_args(m, cfg)
    paper_b = args.batch_size
    set_batch(args, cfg, "batch_size")
    t_arch, _ = pair(cfg, m, DEFAULT_TEACHER_ARCH[cfg.dataset])
    args.student = cfg.student or args.student
    d, dev = fake_data(cfg), cfg.device
    teacher = make_teacher(cfg, t_arch)
    student = build_model(args.student, d.num_classes, d.in_channels).to(dev).train()
    generator = m.DAFLGenerator(args.nz, args.ngf, d.image_size, d.in_channels,
                                bn_eps=getattr(args, "bn_eps", gen_eps)).to(dev).train()
    if cfg.cl:
        for mod in (teacher, student, generator):
            mod.to(memory_format=torch.channels_last)
    return args, paper_b, t_arch, teacher, student, generator


def adapt_dafl(cfg):
    import dafl as m
    args, paper_b, t_arch, teacher, student, generator = _dafl_like(cfg, m, 0.8)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_generator)
    opt_s = (torch.optim.Adam(student.parameters(), lr=args.lr_student, weight_decay=args.weight_decay)
             if args.student_optimizer == "adam" else
             torch.optim.SGD(student.parameters(), lr=args.lr_student, momentum=args.momentum,
                             weight_decay=args.weight_decay))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    w, dev, b = (args.oh, args.ie, args.a), cfg.device, args.batch_size

    def step():
        out, _, _ = m.joint_step(teacher, student, generator, opt_g, opt_s, scaler,
                                 torch.randn(b, args.nz, device=dev), w, cfg.amp, cfg.cl)
        return {"generator": out["loss/generator"], "kd": out["loss/kd"]}
    n_it = args.epochs * args.iters_per_epoch
    return dict(iteration="1 joint step (G and S updated from one backward)", pair=f"{t_arch}->{args.student}",
                batch=b, paper_batch=paper_b, generators=[generator], schedule_iters=n_it,
                schedule=f"{args.epochs} epochs x {args.iters_per_epoch} iterations",
                phases=[Phase("joint_step", step, 1, n_it, b)])


def adapt_dfad(cfg):
    import dfad as m
    args, paper_b, t_arch, teacher, student, generator = _dafl_like(cfg, m, 1e-5)
    opt_s = torch.optim.SGD(student.parameters(), lr=args.lr_student, momentum=args.momentum,
                            weight_decay=args.weight_decay)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_generator, betas=tuple(args.generator_betas))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    dev, b, log = cfg.device, args.batch_size, args.generator_loss == "neg_log_mae"

    def s_step():
        z = torch.randn(b, args.nz, 1, 1, device=dev)
        return {"student": m.student_step(teacher, student, generator, opt_s, scaler, z, cfg.amp, cfg.cl)[
            "loss/student"]}

    def g_step():
        z = torch.randn(b, args.nz, 1, 1, device=dev)
        return {"generator": m.generator_step(teacher, student, generator, opt_g, scaler, z, cfg.amp, cfg.cl,
                                              log)["loss/generator"]}
    n_it, k = args.epochs * args.iters_per_epoch, args.student_steps
    return dict(iteration=f"{k} student steps + 1 generator step", pair=f"{t_arch}->{args.student}", batch=b,
                paper_batch=paper_b, generators=[generator], schedule_iters=n_it,
                schedule=f"{args.epochs} epochs x {args.iters_per_epoch} iterations",
                phases=[Phase("generator_step", g_step, 1, n_it, 0),
                        Phase("student_step", s_step, k, n_it * k, b)])


def _replay_ctx(cfg, m, default_teacher):
    """SSD-KD / Fast: the method's own build(), with the student pair and loss weights main() would resolve."""
    args = method_args(m, cfg)
    paper_b = args.batch_size
    set_batch(args, cfg, "batch_size", "synthesis_batch_size")
    t_arch, student = pair(cfg, m, default_teacher)
    args.student = student
    if hasattr(m, "pair_weights"):
        adv, bn, oh = m.pair_weights(t_arch, student)
        args.adv, args.bn, args.oh = (args.adv if args.adv is not None else adv,
                                      args.bn if args.bn is not None else bn, args.oh if args.oh is not None else oh)
    teacher = make_teacher(cfg, t_arch)
    return args, paper_b, t_arch, teacher


def adapt_ssd_kd(cfg):
    import ssd_kd as m
    args, paper_b, t_arch, teacher = _replay_ctx(cfg, m, DEFAULT_TEACHER_ARCH[cfg.dataset])
    d, dev = fake_data(cfg), cfg.device
    ctx = m.build(args, teacher, d, dev)
    buf, n = ctx["buffer"], args.data_scale  # steady state: a full buffer of random images and priorities
    buf.add(torch.rand(n, d.in_channels, d.image_size, d.image_size, device=dev),
            torch.randint(d.num_classes, (n,), device=dev), torch.rand(n, device=dev), 0)
    call = args.warmup + 1  # adversarial term on, no reset_l0: a steady-state KD epoch

    def synth():
        x, terms = m.synthesize(ctx, call)
        m.insert_batch(ctx, x, call)
        return {k[5:]: v for k, v in terms.items() if k.startswith("loss/")}

    def kd():
        return {"kd": m.student_step(ctx, 0.5 * (args.beta + args.beta_end))}
    kd_epochs = args.epochs - args.warmup
    return dict(iteration=f"1 epoch: synthesis ({args.g_steps} generator steps + meta step) + insert, "
                f"{args.kd_steps} KD steps", pair=f"{t_arch}->{args.student}", batch=args.batch_size,
                paper_batch=paper_b, generators=[ctx["generator"]], schedule_iters=args.epochs,
                schedule=f"{args.epochs} epochs ({args.warmup} warm-up epochs without KD), |B| = {n}",
                phases=[Phase("synthesize+insert", synth, 1, args.epochs, 0),
                        Phase("student_step", kd, args.kd_steps, kd_epochs * args.kd_steps, args.batch_size)])


def adapt_fast(cfg):
    import fast as m
    args, paper_b, t_arch, teacher = _replay_ctx(cfg, m, DEFAULT_TEACHER_ARCH[cfg.dataset])
    d, dev = fake_data(cfg), cfg.device
    ctx = m.build(args, teacher, d, dev)
    pool = ctx["pool"]
    pool.add(torch.rand(max(args.batch_size, args.synthesis_batch_size), d.in_channels, d.image_size,
                        d.image_size, device=dev))
    call = args.warmup + 1

    def synth():
        out = m.synthesize(ctx, call)
        x, terms = out[0], out[-1]
        pool.add(x)
        return {k[5:]: v for k, v in terms.items() if k.startswith("loss/")} if isinstance(terms, dict) else {}

    def kd():
        idx = torch.randint(pool.n, (args.batch_size,), device=dev)
        return {"kd": m.student_step(ctx, idx)}
    kd_epochs = args.epochs - args.warmup
    return dict(iteration=f"1 epoch: synthesis ({args.g_steps} generator steps + meta step), {args.kd_steps} KD "
                "steps", pair=f"{t_arch}->{args.student}", batch=args.batch_size, paper_batch=paper_b,
                generators=[ctx["generator"]], schedule_iters=args.epochs,
                schedule=f"{args.epochs} epochs ({args.warmup} warm-up epochs without KD)",
                phases=[Phase("synthesize", synth, 1, args.epochs, 0),
                        Phase("student_step", kd, args.kd_steps, kd_epochs * args.kd_steps, args.batch_size)])


def adapt_cmi(cfg):
    import cmi as m
    default_t = "wrn40_2" if cfg.dataset in ("cifar10", "cifar100") else DEFAULT_TEACHER_ARCH[cfg.dataset]
    args = method_args(m, cfg)
    paper_b = args.batch_size
    set_batch(args, cfg, "batch_size", "synthesis_batch_size")
    if cfg.batch:
        args.bank_size = max(args.bank_size // args.synthesis_batch_size, 1) * args.synthesis_batch_size
        args.n_neg = min(args.n_neg, args.bank_size)
    t_arch, args.student = pair(cfg, m, default_t)
    d, dev = fake_data(cfg), cfg.device
    ctx = m.build(args, make_teacher(cfg, t_arch), {"arch": t_arch}, d, dev)
    bank, b = ctx["bank"], args.synthesis_batch_size  # steady state: n_neg cached negatives in the bank
    bank.data[:args.n_neg] = torch.randn(args.n_neg, bank.data.shape[1], device=dev)
    bank.n_updates, bank.ptr = args.n_neg, args.n_neg % bank.size
    z = torch.randn(b, args.nz, device=dev).requires_grad_(True)
    targets = torch.randint(d.num_classes, (b,), device=dev).sort()[0]
    opt_g = torch.optim.Adam([{"params": ctx["generator"].parameters()}, {"params": [z]}], lr=args.lr_g,
                             betas=(0.5, 0.999))
    x_u8 = torch.randint(0, 256, (args.batch_size, d.in_channels, d.image_size, d.image_size), dtype=torch.uint8,
                         device=dev)

    def enter_synthesis():  # as cmi.synthesize() sets up a round
        ctx["student"].eval().requires_grad_(False)
        ctx["bn_hooks"] = m.register_bn_hooks(ctx["teacher"])
        ctx["feat_hooks"] = m.register_feature_hooks(ctx["teacher"], t_arch)
        ctx["generator"].train()

    def enter_kd():  # as cmi.synthesize() ends a round
        for h in ctx.get("bn_hooks", []) + ctx.get("feat_hooks", []):
            h.handle.remove()
        ctx["bn_hooks"], ctx["feat_hooks"] = [], []
        ctx["student"].train().requires_grad_(True)

    def g_step():
        return {k[5:]: v for k, v in m.generator_step(ctx, z, targets, opt_g)[3].items()}

    def kd():
        return {"kd": m.student_step(ctx, x_u8, ctx["opt_s"])}
    return dict(iteration=f"1 round: {args.g_steps} generator steps on {b} images + {args.kd_steps} KD steps",
                pair=f"{t_arch}->{args.student}", batch=args.batch_size, paper_batch=paper_b,
                generators=[ctx["generator"]], schedule_iters=args.epochs, schedule=f"{args.epochs} rounds",
                phases=[Phase("generator_step", g_step, args.g_steps, args.epochs * args.g_steps, 0, enter_synthesis),
                        Phase("student_step", kd, args.kd_steps, args.epochs * args.kd_steps, args.batch_size,
                              enter_kd)])


def adapt_pre_dfkd(cfg):
    import pre_dfkd as m
    args = method_args(m, cfg)
    paper_b = args.batch_size
    if cfg.batch:  # keep the official ratios B_M = B / 8 (>= 2: L_z needs a variance), B_V = B / 2
        args.batch_size, args.mem_batch_size, args.vae_novel = cfg.batch, max(2, cfg.batch // 8), max(1, cfg.batch // 2)
    t_arch, _ = pair(cfg, m, DEFAULT_TEACHER_ARCH[cfg.dataset])
    args.student = cfg.student or args.student
    d, dev = fake_data(cfg), cfg.device
    fmt = torch.channels_last if cfg.cl else torch.contiguous_format
    teacher = make_teacher(cfg, t_arch)
    shape = (args.nz, args.ngf, d.image_size, d.in_channels)
    student = build_model(args.student, d.num_classes, d.in_channels).to(dev, memory_format=fmt).train()
    generator, memory, encoder = (net(*shape).to(dev, memory_format=fmt)
                                  for net in (m.novel_generator, m.memory_generator, m.Encoder))
    generator.train()
    opt_s = (torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
             if args.student_optimizer == "adam" else
             torch.optim.SGD(student.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g)
    opt_m, opt_e = (torch.optim.Adam(net.parameters(), lr=args.lr_vae) for net in (memory, encoder))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    keys = ("loss/oh", "loss/ie", "loss/a", "loss/adv", "loss/g", "loss/kd", "loss/z", "loss/vae", "loss/vae_pix",
            "loss/vae_logit", "loss/vae_kld", "new/class_entropy", "replay/class_entropy")

    def fresh():
        return {**{k: torch.zeros((), device=dev) for k in keys}, "n_g": 0, "n_s": 0, "n_v": 0}
    with torch.no_grad():
        x_new = m.cl(generator(torch.randn(args.batch_size, args.nz, device=dev)), args)

    def g_step():
        acc = fresh()
        m.generator_step(generator, student, teacher, opt_g, scaler, args, dev, acc)
        return {"g": acc["loss/g"]}

    def s_step():
        acc = fresh()
        m.student_step(student, generator, memory, teacher, opt_s, scaler, args, dev, acc)
        return {"kd": acc["loss/kd"]}

    def v_step():
        acc = fresh()
        m.vae_step(memory, encoder, teacher, opt_m, opt_e, scaler, x_new, False, args, dev, acc)
        return {"vae": acc["loss/vae"]}
    n_it = args.epochs * args.iters_per_epoch
    gi, ki, vi = args.g_iters, args.kd_iters, args.vae_iters
    return dict(iteration=f"{gi} generator + {ki} student + {vi} VAE steps", pair=f"{t_arch}->{args.student}",
                batch=args.batch_size, paper_batch=paper_b, generators=[generator, memory], schedule_iters=n_it,
                schedule=f"{args.epochs} epochs x {args.iters_per_epoch} iterations",
                phases=[Phase("generator_step", g_step, gi, n_it * gi, 0),
                        Phase("student_step", s_step, ki, n_it * ki, args.batch_size + args.mem_batch_size),
                        Phase("vae_step", v_step, vi, n_it * vi, 0)])


ADAPTERS = {"teacher": adapt_teacher, "ta_dfkd": adapt_ta_dfkd, "ssd_kd": adapt_ssd_kd, "dafl": adapt_dafl,
            "dfad": adapt_dfad, "cmi": adapt_cmi, "fast": adapt_fast, "pre_dfkd": adapt_pre_dfkd}


def make_cfg(dataset, device, amp, cl, batch=None, seed=0, teacher_arch=None, student=None, overrides=None,
             tmp="/tmp"):
    return types.SimpleNamespace(dataset=dataset, device=torch.device(device), amp=amp, cl=bool(cl), batch=batch,
                                 seed=seed, teacher_arch=teacher_arch, student=student, overrides=overrides or {},
                                 tmp=tmp)


def build_spec(method, cfg):
    torch.manual_seed(cfg.seed)
    return ADAPTERS[method](cfg)


# ---------------------------------------------------------------------------------------------- measuring
def bench_one(method, cfg, warmup, iters, peaks):
    """One table row: time every phase of `method` under cfg, count its FLOPs, compose the iteration."""
    dev = cfg.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    spec = build_spec(method, cfg)
    counter = SynthCounter(spec["generators"])
    stats = []
    for ph in spec["phases"]:
        if ph.enter:
            ph.enter()
        flops = count_flops(ph.fn)  # the first call, untimed: also the first warm-up call
        for _ in range(warmup - 1):
            ph.fn()
        times, synth = [], []
        for _ in range(iters):
            counter.n = 0
            sync(dev)
            t0 = time.perf_counter()
            ph.fn()
            sync(dev)
            times.append(time.perf_counter() - t0)
            synth.append(counter.n)
        stats.append({"name": ph.name, "per_iter": ph.per_iter, "per_schedule": ph.per_schedule,
                      "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "calls": iters,
                      "synth": sum(synth) / len(synth), "distilled": ph.distilled, "flops": flops})
    counter.remove()
    peak = peaks.get("bf16" if cfg.amp == "bf16" else "fp32")
    row = {"method": method, "amp": cfg.amp, "channels_last": int(cfg.cl), "iteration": spec["iteration"],
           "pair": spec["pair"], "batch": spec["batch"], "paper_batch": spec["paper_batch"],
           "schedule": spec["schedule"], "schedule_iters": spec["schedule_iters"], "phases": stats,
           "peak_tflops": peak, **summarize(stats, peak),
           "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None}
    t_arch, _, s_arch = spec["pair"].partition("->")
    hours = PAPER_HOURS.get((cfg.dataset, t_arch, s_arch), {})
    row["paper_hours"] = {k: hours[k] for k in PAPER_LABELS.get(method, ()) if k in hours}
    del spec, counter
    return row


def amp_agreement(method, dataset, device, seed=0, batch=None, overrides=None):
    """From identical weights and inputs, one call of every step function of `method` in fp32 and under bf16
    autocast: {phase: {loss: (fp32, bf16)}}. Each phase starts from a fresh build (same seed, same RNG). g_steps = 1,
    so SSD-KD's / Fast's synthesis phase is one generator step (plus the meta step) rather than five."""
    out, overrides = {}, {"g_steps": 1, **(overrides or {})}
    n_phases = len(build_spec(method, make_cfg(dataset, device, "off", False, batch, seed,
                                               overrides=overrides))["phases"])
    for i in range(n_phases):
        res = {}
        for amp in ("off", "bf16"):
            spec = build_spec(method, make_cfg(dataset, device, amp, False, batch, seed, overrides=overrides))
            ph = spec["phases"][i]
            if ph.enter:
                ph.enter()
            torch.manual_seed(seed + 1)
            res[amp] = {k: float(v) for k, v in ph.fn().items()}
        out[ph.name] = {k: (res["off"][k], res["bf16"][k]) for k in res["off"]}
    return out


# ---------------------------------------------------------------------------------------------- reporting
def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def table(rows):
    head = ("method", "amp", "CL", "pair", "batch", "ms/iter median [min-max]", "synth img/s", "distilled img/s",
            "GFLOP/iter", "TFLOP/s", "MFU %", "peak GiB", "schedule", "projected h", "paper h (hardware)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['amp']} | {r['channels_last']} | {r['error']} |" + " |" * 11)
            continue
        paper = ", ".join(f"{k} {v} h" for k, v in r["paper_hours"].items()) or "-"
        batch = f"{r['batch']}" + ("" if r["batch"] == r["paper_batch"] else f" (paper {r['paper_batch']})")
        lines.append("| " + " | ".join([
            r["method"], r["amp"], str(r["channels_last"]), r["pair"], batch,
            f"{r['ms_median']:.1f} [{r['ms_min']:.1f}-{r['ms_max']:.1f}]", f"{r['synth_img_s']:.0f}",
            f"{r['distilled_img_s']:.0f}", f"{r['gflop_per_iter']:.1f}", f"{r['tflops']:.3f}",
            fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f"), fmt(r["peak_mem_gib"], ".2f"),
            f"{r['schedule_iters']} it", f"{r['projected_h']:.2f}", paper]) + " |")
    return "\n".join(lines)


def write_report(out, meta, rows, name="bench"):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json.tmp"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    os.replace(os.path.join(out, f"{name}.json.tmp"), os.path.join(out, f"{name}.json"))
    defs = sorted({(r["method"], r["iteration"], r.get("schedule", "")) for r in rows if "error" not in r})
    md = [f"# bench.py: {meta['dataset']} on {meta['device_name']}", "",
          f"torch {meta['torch']}, {meta['threads']} threads, {meta['when']}. Measured peaks (best of a dense "
          "torch.mm and 3x3 conv): "
          + ", ".join(f"{k} {v:.3g} TFLOP/s" if v else f"{k} none (emulated on this CPU, so no MFU)"
                    for k, v in meta["peaks"].items()) + ".", "",
          table(rows), "", "One iteration and the full schedule per method:", ""]
    md += [f"- {m}: {it}; schedule {sch}" for m, it, sch in defs]
    md += ["", "Definitions: ms/iter = sum over step functions of calls per iteration x median ms per call "
           "(range: min / max per call); synthesised = images out of every generator forward; distilled = images in "
           "the student's update steps (teacher: training images); FLOPs by torch.utils.flop_counter.FlopCounterMode "
           "(forward + backward, 2 per MAC); MFU against the measured dense peak (mm or conv) of the variant's dtype; "
           "projected h = sum of (calls in the paper schedule x median time per call), evaluation excluded. Paper "
           f"hours: {PAPER_HW}.", "", "Reductions and notes:", ""] + [f"- {n}" for n in meta["notes"]]
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return "\n".join(md)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_bench(methods, cfg_kw, variants, warmup, iters, peaks, notes, out, name="bench", dataset="cifar10"):
    """Variant by variant (so an interrupted run still compares methods), rewriting the report after every row."""
    dev = cfg_kw["device"]
    meta = {"dataset": dataset, "device": str(dev), "device_name": device_name(torch.device(dev)),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "peaks": peaks, "warmup": warmup,
            "iters": iters, "notes": notes, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows, md = [], ""
    for amp, cl in variants:
        for method in methods:
            cfg = make_cfg(dataset, amp=amp, cl=cl, **cfg_kw)
            t0 = time.time()
            try:
                row = bench_one(method, cfg, warmup, iters, peaks)
            except Exception as e:  # one failing method must not cost the whole table (the GPU check is one call)
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                print(f"error: {method} amp={amp} cl={int(cl)} failed ({msg})", file=sys.stderr, flush=True)
                row = {"method": method, "amp": amp, "channels_last": int(cl), "error": msg}
            rows.append(row)
            done = f"{row['ms_median']:.1f} ms/iter" if "error" not in row else row["error"]
            print(f"{method:9s} amp={amp:4s} cl={int(cl)}: {done} ({time.time() - t0:.0f} s)", flush=True)
            rows.sort(key=lambda r: (methods.index(r["method"]), variants.index((r["amp"], bool(r["channels_last"])))))
            md = write_report(out, meta, rows, name)
    return rows, md


def parse_peaks(text, device, dtypes=("fp32", "bf16")):
    """{dtype: dense peak TFLOP/s}: from --peak-tflops where given, else measured, for the dtypes that are timed."""
    peaks = {}
    if text:
        for part in text.split(","):
            key, _, val = part.rpartition("=")
            for k in ([key] if key else ["fp32", "bf16"]):
                peaks[k] = float(val)
    for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if k not in peaks and k in dtypes:
            # emulated bf16 has no dense peak: its big mm and conv ran at 0.5-0.65 GFLOP/s on an AVX2 EPYC while the
            # methods' small convs reached 2-5, an "MFU" of 250-550 %; such rows get no MFU
            emulated = k == "bf16" and device.type == "cpu" and not cpu_bf16_native()
            peaks[k] = None if emulated else measure_peak(device, dt)
    return peaks


# ---------------------------------------------------------------------------------------------- device check
def gpu_check(folder, out, dry_run=False, budget_s=460):
    """(b) bench table at the full paper batch, fp32 vs bf16 + channels_last; (c) bf16-vs-fp32 loss agreement from
    identical weights; (a) a ResNet-34 teacher trained on the folder data for the epochs that fit (bf16, channels_
    last), with its accuracy and epoch time. One report: gpu_check.md / gpu_check.json. dry_run: CPU, tiny sizes."""
    import train_teacher
    t_start = time.time()
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(folder, split)):
            fail(f"{folder}/{split} not found; unzip ../shared/data/cifar10-jpeg/{split}.zip -d {folder}/{split}")
    if not dry_run and not torch.cuda.is_available():
        fail("--gpu-check needs a CUDA device; add --dry-run for the CPU rehearsal at tiny sizes")
    device = torch.device("cpu" if dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    methods = available_methods()
    peaks = {"fp32": 1.0, "bf16": 1.0} if dry_run else parse_peaks(None, device)
    dataset = "digits" if dry_run else "cifar10"
    notes = (["dry run: digits shapes, batch 4, g_steps 1, 1 timed call per step; numbers are meaningless"] if dry_run
             else ["full paper batch per method; fp32 = cuDNN/matmul defaults of torch (convolutions may use TF32)"])
    kw = dict(device=device, batch=4 if dry_run else None, tmp=out, overrides={"g_steps": 1} if dry_run else None)
    rows, md = run_bench(methods, kw, [("off", False), ("bf16", True)], 0 if dry_run else 2, 1 if dry_run else 5,
                         peaks, notes, out, "gpu_bench", dataset)
    agree = {}
    for method in methods:
        try:
            agree[method] = amp_agreement(method, dataset, device, batch=4 if dry_run else 64)
        except Exception as e:  # recorded, not fatal: the report must come back from the single device call
            agree[method] = {"error": {type(e).__name__: (math.nan, math.nan)}}
    # (a) teacher: epochs from the measured bf16 + channels_last step time and the time left
    step_s = next((r["phases"][0]["median_s"] for r in rows if r["method"] == "teacher" and r["amp"] == "bf16"), 0.05)
    n_train = sum(len(files) for _, _, files in os.walk(os.path.join(folder, "train")))
    epoch_est = 1.5 * step_s * math.ceil(n_train / 128) + 3.0
    left = budget_s - (time.time() - t_start) - 30
    epochs = 1 if dry_run else max(1, min(100, int(left / epoch_est)))
    t0 = time.time()
    teacher_path = os.path.join(out, "teacher_folder_resnet34.pt")
    meta = train_teacher.main(["--dataset", "folder", "--data-root", folder, "--arch", "resnet34", "--epochs",
                               str(epochs), "--milestones", f"{max(1, epochs // 2)},{max(1, 3 * epochs // 4)}",
                               "--amp", "bf16", "--channels-last", "1", "--out", teacher_path, "--overwrite",
                               "--device", str(device), "--eval-every", str(epochs)]
                              + (["--batch-size", "4"] if dry_run else []))
    wall = time.time() - t0
    report = {"bench": rows, "agreement": agree,
              "teacher": {"arch": "resnet34", "epochs": epochs, "test_acc": meta["test_acc"], "wall_s": wall,
                          "s_per_epoch_incl_eval": wall / epochs, "train_images": n_train},
              "device": device_name(device), "dry_run": dry_run, "total_s": time.time() - t_start}
    lines = [md, "", "## bf16 vs fp32, one call of each step function from identical weights", "",
             "| method | step | loss | fp32 | bf16 | rel. diff |", "|---|---|---|---|---|---|"]
    for method, phases in agree.items():
        for ph, losses in phases.items():
            for k, (a, b) in losses.items():
                lines.append(f"| {method} | {ph} | {k} | {a:.5g} | {b:.5g} | {abs(b - a) / max(abs(a), 1e-8):.2e} |")
    tr = report["teacher"]
    lines += ["", f"## Teacher: ResNet-34 on {folder} ({n_train} training images), bf16 + channels_last", "",
              f"{epochs} epochs, test accuracy {tr['test_acc']:.2f} %, {wall:.0f} s "
              f"({tr['s_per_epoch_incl_eval']:.1f} s per epoch including data loading and evaluation).",
              "", f"Total device-check time {report['total_s']:.0f} s."]
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]), flush=True)
    return report


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description="Speed, FLOPs and MFU of each method's own training steps"))
    a = p.add_argument
    a("--dataset", default="cifar10", choices=sorted(SHAPES), help="paper settings of this dataset (default cifar10)")
    a("--methods", default=None, help="comma-separated subset of " + ",".join(ALL_METHODS) + " (default: all present)")
    a("--batch-size", type=int, default=None, help="batch for every method (default: paper batch on a GPU, "
      f"{CPU_BATCH} on a CPU except for digits, whose settings are CPU-sized)")
    a("--iters", type=int, default=None, help="timed calls per step function (default: GPU 10, CPU 2)")
    a("--warmup", type=int, default=None, help="untimed calls first, the first one counting FLOPs (default: GPU 3, "
      "CPU 1; 0 counts FLOPs on an extra call all the same)")
    a("--amp", default=None, help="variants of --amp to run, comma-separated (off, bf16; default both, but only off "
      "on a CPU without native bf16, where bf16 is emulated and ~50x slower)")
    a("--channels-last", default="0,1", help="variants of channels_last, comma-separated (0, 1)")
    a("--peak-tflops", default=None, help="dense peak instead of measuring it: X (both dtypes) or fp32=X,bf16=Y")
    a("--teacher-arch", default=None, help="teacher architecture for every method (default: each method's pair)")
    a("--student", default=None, help="student architecture for every method (default: each method's pair)")
    a("--device", default=None, help="cpu or cuda (default: cuda when present)")
    a("--seed", type=int, default=0)
    a("--out", default=None, help="output folder (default runs/bench-<dataset>-<device>)")
    a("--gpu-check", default=None, metavar="DIR", help="the prepared device check on the CIFAR-10 JPEG ImageFolder DIR")
    a("--dry-run", action="store_true", help="with --gpu-check: run it on the CPU at tiny sizes")
    args = p.parse_args(argv)
    present = available_methods()
    args.methods = present if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in present:
            fail(f"unknown or missing method '{m}'; choose from {','.join(present)}")
    amps = [v.strip() for v in (args.amp or "off,bf16").split(",")]
    cls = [v.strip() for v in args.channels_last.split(",")]
    if not set(amps) <= {"off", "bf16"} or not set(cls) <= {"0", "1"}:
        fail("--amp takes a comma list of off,bf16 and --channels-last of 0,1; fp16 is CUDA-only and not "
             "benchmarked, e.g. --amp off,bf16 --channels-last 0,1")
    order = [("off", False), ("bf16", True), ("bf16", False), ("off", True)]  # baseline and the README's flags first
    args.variants = sorted({(a_, c == "1") for a_ in amps for c in cls}, key=order.index)
    for k in ("batch_size", "iters", "warmup"):
        if getattr(args, k) is not None and getattr(args, k) < (0 if k == "warmup" else 1):
            fail(f"--{k.replace('_', '-')} must be positive; got {getattr(args, k)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.gpu_check:
        out = args.out or os.path.join("runs", "gpu-check" + ("-dry" if args.dry_run else ""))
        return gpu_check(args.gpu_check, out, args.dry_run)
    device = pick_device(args.device)
    cpu = device.type == "cpu"
    notes = []
    batch = args.batch_size or (CPU_BATCH if cpu and args.dataset != "digits" else None)  # digits: CPU-sized already
    if batch:
        notes.append(f"batch {batch} for every method (and synthesis batch, CMI bank rounded to it) instead of the "
                     "paper's; the iteration definition and the schedule stay the paper's")
    iters, warmup = args.iters or (2 if cpu else 10), args.warmup if args.warmup is not None else (1 if cpu else 3)
    notes.append(f"{max(warmup, 1)} warm-up (the first counts FLOPs) + {iters} timed calls per step function; an "
                 "iteration is composed from them")
    notes.append("random-weight networks; teacher BN running stats from noise images; SSD-KD's buffer full of "
                 "random images; CMI's bank holds n_neg random features (steady state); Fast's pool random images")
    notes.append("FLOPs are counted on one (warm-up) call per step; TA-DFKD's student step draws a data-dependent "
                 "number of generator batches, so its FLOPs and synthesised images vary between calls and variants")
    if cpu:
        notes.append(f"CPU: {torch.get_num_threads()} threads; timings on a shared machine are inflated")
    if cpu and args.amp is None and not cpu_bf16_native():
        args.variants = [v for v in args.variants if v[0] == "off"]
        notes.append(f"bf16 not timed: this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}; "
                     "emulated, ~50x slower than fp32); pass --amp off,bf16 to time it anyway")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peaks = parse_peaks(args.peak_tflops, device, {"fp32" if a_ == "off" else a_ for a_, _ in args.variants})
    out = args.out or os.path.join("runs", f"bench-{args.dataset}-{device.type}")
    kw = dict(device=device, batch=batch, seed=args.seed, teacher_arch=args.teacher_arch, student=args.student,
              tmp=out)
    rows, md = run_bench(args.methods, kw, args.variants, warmup, iters, peaks, notes, out, "bench", args.dataset)
    print(md, flush=True)
    return rows


if __name__ == "__main__":
    main()
