"""SSD-KD: Small Scale Data-Free Knowledge Distillation.

He Liu, Yikai Wang, Huaping Liu, Fuchun Sun, Anbang Yao. CVPR 2024.
NO OFFICIAL CODE EXISTS: OSVAI/SSD-KD (HEAD 909788e, 2024-06-13) holds only a README, a LICENSE and a figure. This is
the first public implementation: every SSD-KD fact comes from the paper, every unstated basic setting from
zju-vipa/Fast-Datafree @0dcecbc, which the paper says it follows (Sec. 4.1); the rest is ours, tagged PAPER-SILENT.

Fast's adversarial inversion with a small replay buffer. Each epoch a clone of a meta-generator is adapted for g_steps
on a fresh z (BN statistics + adversarial + task term, each sample's task term re-weighted by phi(x) = diversity x
difficulty); its best batch enters a constant-size buffer B (oldest out). The student takes kd_steps KD steps on
minibatches drawn from B by prioritized replay on the teacher-student KL, writing new priorities back each step.

Equations (spec/ssd_kd.md 1, 3):
  Eq. (1)  L_BN = sum_l ||mu_l(x) - E mu_l||_2 + ||var_l(x) - E var_l||_2 (+ Fast's momentum blend) -> loss_bn()
  Eq. (2)  generator: bn*L_BN + oh*mean_b(phi_b * CE_b) + adv*L_adv  (min over g; adv = -masked KL)
                                                        -> loss_task(), loss_adv(), generator_step()
  Eq. (2)  student: L_KD = T^2 KL(softmax(t/T) || softmax(s/T)) on x drawn from B by P (the "delta o")
                                                        -> loss_kd(), student_step()
  Eq. (3)  phi(x) = (1 - |{x' in B: c_T(x') = c_T(x)}| / |B|) * (1 - p_T(x))^gamma        -> modulating_phi()
  Eq. (4)  delta_i(x) = w_{i-1}(x) * KL(f_t(x) || f_s(x)), w_{-1} = 1           -> student_step(), insert_batch()
  Eq. (5)  w_i(x) = (N * P_i(x))^(-beta)                                                 -> is_weights()
  Eq. (6)  P_i(x) = (|delta_i(x)| + eps)^alpha / sum_B (|delta_i(x')| + eps)^alpha       -> sampling_probs()
  Alg. 1   epoch = inversion (T_g = g_steps), insert + FIFO evict, T_kd = kd_steps priority-sampled KD steps -> train()

Defaults (spec/ssd_kd.md 2): Fast-Datafree scripts/fast_cifar.sh for everything the paper leaves to Fast (220 epochs,
warmup 20, batch 256, nz 256, SGD 0.2 + cosine T_max 200, T 20, bn_mmt 0.9, meta-generator, reset_l0 at call 140),
per-pair loss weights (PAIR_WEIGHTS), |B| = 5000 (Table 1). PAPER-SILENT [spec R]: gamma 2, alpha 0.6, beta 0.4 -> 1
(linear over all KD steps), eps 1e-6, w max-normalised, w not in the loss, KL at T = 1 in delta, g_steps 5 (Fast5
optimiser settings), kd_steps = ceil(2|B| / batch) (40 at |B| = 5000: Table 1's 1.11 h rules out Fast's 400, which
is most of Fast2's 3.92 h; Table 2 vs 1 with Fig. 4's linearity give >= 36 for r34->r18; README shows the arithmetic),
FIFO eviction, sampling with replacement.
Task target: the teacher's argmax (paper Sec. 3.1, which makes phi*CE exactly a focal loss); Fast's random labels
behind --task-target random. Digits: scaled down, see PAPER_DEFAULTS['digits'].

Differences from the official code (there is none for SSD-KD; these are w.r.t. Fast-Datafree, spec/ssd_kd.md 5, 7):
  - B is a uint8 device tensor, because Fast's student saw 8-bit PNGs (clamp, x255, truncate) and it is 4x smaller
    (|B| = 50k CIFAR images: 154 MB, not 614 MB, on the device and in checkpoint.pt); --buffer-dtype float32.
  - Only the last |B| images are kept (Fast keeps every image ever made); KD draws from B by P, not a shuffled loader.
  - Best images picked with torch.where (Fast: loss.item() per iteration); teacher frozen; student frozen during
    synthesis (Fast computes, then discards, its gradients); BN hooks only during synthesis (Fast's fire in KD too).
  - Crop padding image_size // 8 (4 at 32 px, Fast's RandomCrop(32, padding=4)); digits without flip.
  - Priority write-back for a sample drawn twice in one minibatch keeps the larger value (deterministic scatter).
  - --amp fp16 is refused (the first-order meta-gradient would need per-step unscaling); bf16 and off are supported.

Run:
  python ssd_kd.py                                                    # digits, < 3 min on 2 CPU cores
  python ssd_kd.py --dataset cifar10 --teacher teachers/cifar10_resnet34.pt   # Table 1 (|B| = 5000)
  python ssd_kd.py --dataset cifar100 --teacher T.pt --data-scale 50000        # Table 2 (Fast5-like scale)
  python ssd_kd.py --resume --out runs/ssd_kd-digits-digits_wrn16_2-s0         # continue a run

Expected: paper (Table 1, mean of 3, best-or-final unstated) C10 r34->r18 92.92, wrn40_2->wrn16_1 88.07;
C100 73.05 / 51.96. Ours, digits default (wrn16_2 99.26 % -> wrn16_1, seed 0, CPU): final 98.15 %, acc_last[10]
97.72 %, acc_max 98.33 % (test-selected); Table-4 rows on digits in the README. CIFAR not yet measured.
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (DATASETS, Generator, MetricLogger, Normalize, acc_last_k, autocast, build_model, check_amp,
                    check_finite, check_student, check_teacher_data, check_positive, fill_defaults, finish_run_args,
                    evaluate, fail, finish_run, get_rng_state, load_checkpoint, load_data, load_teacher, pick_device,
                    prepare_run_dir, random_crop_flip, register_bn_hooks, save_checkpoint, save_config,
                    save_sample_grid, seed_everything, set_rng_state, to_floats, one_line_errors)

# Fast-Datafree scripts/fast_cifar.sh + datafree_kd.py defaults; SSD-KD values from the paper or spec [R].
C10 = dict(epochs=220, warmup=20, batch_size=256, synthesis_batch_size=256, data_scale=5000, kd_steps=None,
           g_steps=5, lr_g=3e-3, lr_z=0.01, nz=256, ngf=64, lr=0.2, weight_decay=1e-4, cos_tmax=200, T=20.0,
           bn_mmt=0.9, reset_l0_at=140, flip=1, last_k=10, save_images=0)
PAPER_DEFAULTS = {
    "cifar10": C10, "cifar100": {**C10, "last_k": 20},
    "tinyimagenet": {**C10, "last_k": 20}, "folder": C10,  # PAPER-SILENT: no Tiny/folder runs; CIFAR values
    "mnist": {**C10, "flip": 0},  # PAPER-SILENT (and the default LeNet-5 teacher has no BN: refused)
    # digits (ours): 1,257 real training images, 2 CPU cores, < 3 min. 64 images per epoch and |B| = 640 (half the
    # real training set; B fills at epoch 10); kd_steps = 2|B|/64 = 20 as the C10 rule. 30 epochs, warmup 5,
    # g_steps 5 (Fast5, the spec's choice); lr_g 1e-2 (meta lr 0.05) because 30 meta steps at Fast's 3e-3 leave
    # the BN loss ~3x higher; ngf 32 and nz 128 because the generator, not the 16x16 teacher, dominates CPU time.
    # None = follow --epochs: cos_tmax = KD epochs (25), reset_l0 at the same 60 % of them as C10 (call 140 =
    # 20 + 0.6 * 200; here 5 + 15 = 20).
    "digits": {**C10, "epochs": 30, "warmup": 5, "batch_size": 64, "synthesis_batch_size": 64, "data_scale": 640,
               "lr_g": 1e-2, "nz": 128, "ngf": 32, "cos_tmax": None, "reset_l0_at": None, "flip": 0,
               "save_images": 1},
}
# (adv, bn, oh) of scripts/fast_cifar.sh for the paper's pairs (Table 1); other pairs take their teacher family's.
PAIR_WEIGHTS = {("resnet34", "resnet18"): (1.33, 10.0, 0.5), ("vgg11", "resnet18"): (1.0, 10.0, 0.5),
                ("wrn40_2", "wrn16_1"): (1.1, 10.0, 0.4), ("wrn40_2", "wrn40_1"): (1.1, 10.0, 0.4),
                ("wrn40_2", "wrn16_2"): (1.1, 10.0, 0.4)}
DEFAULT_STUDENT = {"resnet34": "resnet18", "vgg11": "resnet18", "wrn40_2": "wrn16_1", "wrn16_2": "wrn16_1",
                   "resnet34_tiny": "resnet18_tiny"}  # the paper's pairs; digits' wrn16_2 -> wrn16_1


def pair_weights(teacher, student):
    """(adv, bn, oh) for a pair: Fast's script value, else (PAPER-SILENT) the value of the teacher's family."""
    if (teacher, student) in PAIR_WEIGHTS:
        return PAIR_WEIGHTS[(teacher, student)]
    return PAIR_WEIGHTS[("wrn40_2", "wrn16_1") if teacher.startswith("wrn") else
                        ("vgg11", "resnet18") if teacher.startswith("vgg") else ("resnet34", "resnet18")]


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description="SSD-KD: Small Scale Data-Free KD (Liu et al., CVPR 2024)"))
    a = p.add_argument
    a("--dataset", default="digits", choices=DATASETS, help="real test data and teacher domain (default digits)")
    a("--data-root", default="data", help="torchvision root / folder dataset root")
    a("--teacher", default=None, help="teacher checkpoint (default teachers/<dataset>_<arch>.pt)")
    a("--student", default=None, help="student arch (default: the paper's pair, resnet34->resnet18, wrn40_2->wrn16_1)")
    a("--out", default=None, help="run directory (default runs/ssd_kd-<dataset>-<teacher stem>-s<seed>)")
    a("--seed", type=int, default=0, help="seed (Fast scripts: 0; the paper averages 3 runs)")
    a("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    a("--epochs", type=int, default=None, help="epochs E of Alg. 1 (Fast: 220)")
    a("--resume", action="store_true", help="continue the run in --out from checkpoint.pt")
    a("--amp", default="off", choices=["bf16", "fp16", "off"], help="autocast, CPU or CUDA (off until benchmarked)")
    a("--channels-last", action="store_true", help="channels_last memory format (CPU and CUDA)")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (Fast: every epoch)")
    a("--save-every", type=int, default=1, help="checkpoint every N epochs and at the end (ours; default 1: a "
      "killed run loses at most one epoch, about a minute of GPU time at paper scale)")
    a("--save-images", type=int, default=None, choices=[0, 1], help="write samples_<epoch>.png (digits 1, else 0)")
    a("--stop-after", type=int, default=None, help="stop after this epoch as if interrupted (resume test)")
    a("--warmup", type=int, default=None, help="epochs without KD (Fast --warmup 20; adv on from call `warmup`)")
    a("--batch-size", type=int, default=None, help="KD minibatch |M| (PAPER-SILENT; Fast --batch_size 256)")
    a("--synthesis-batch-size", type=int, default=None, help="images inverted per epoch (Fast 256)")
    a("--data-scale", type=int, default=None, help="replay buffer size |B| (Table 1: 5000; Table 2: ~50000)")
    a("--kd-steps", type=int, default=None, help="T_kd per epoch (PAPER-SILENT; default ceil(2|B|/batch) = 40 at "
      "|B| 5000: Table 1/2 hours give ~36-118 for R34->R18, not Fast's 400; README 'SSD-KD')")
    a("--g-steps", type=int, default=None, help="T_g per epoch (PAPER-SILENT; 5 = Fast5; Fast2 2, Fast10 10)")
    a("--lr-g", type=float, default=None, help="inner Adam lr of the generator clone (Fast5 3e-3, Fast2 5e-3)")
    a("--lr-z", type=float, default=None, help="inner Adam lr of z (Fast5 0.01, Fast2 0.015)")
    a("--lr-meta", type=float, default=None, help="meta Adam lr (Fast: lr_g * g_steps)")
    a("--nz", type=int, default=None, help="latent size (Fast: 256)")
    a("--ngf", type=int, default=None, help="generator width (Fast: 64)")
    a("--lr", type=float, default=None, help="student SGD lr (Fast 0.2, momentum 0.9)")
    a("--weight-decay", type=float, default=None, help="student weight decay (Fast 1e-4)")
    a("--cos-tmax", type=int, default=None, help="cosine T_max, KD epochs (OFFICIAL: Fast fixes 200; digits: all)")
    a("--T", type=float, default=None, help="KD temperature (Fast --T 20)")
    a("--adv", type=float, default=None, help="weight of L_adv (Fast, per pair: r34 1.33, vgg 1.0, wrn 1.1)")
    a("--bn", type=float, default=None, help="weight of L_BN, Eq. (1) (Fast: 10)")
    a("--oh", type=float, default=None, help="weight of phi*L_Task (Fast, per pair: r34/vgg 0.5, wrn 0.4)")
    a("--bn-mmt", type=float, default=None, help="Fast's BN-statistics momentum rho (0.9; 0 = plain Eq. 1)")
    a("--task-target", default="argmax", choices=["argmax", "random"],
      help="L_Task target: teacher argmax (paper Sec. 3.1) or uniform random labels (Fast's code)")
    a("--gamma", type=float, default=2.0, help="focal exponent gamma of Eq. (3) (PAPER-SILENT; focal-loss 2)")
    a("--diversity", type=int, default=1, choices=[0, 1], help="diversity term of Eq. (3) (Table 4 ablation)")
    a("--difficulty", type=int, default=1, choices=[0, 1], help="difficulty term of Eq. (3) (Table 4 ablation)")
    a("--detach-phi", type=int, default=0, choices=[0, 1], help="stop phi's gradient (PAPER-SILENT; 0 = focal loss)")
    a("--priority-sampling", type=int, default=1, choices=[0, 1], help="PS, Eq. (4-6); 0 = uniform (Table 4)")
    a("--alpha", type=float, default=0.6, help="priority exponent alpha, Eq. (6) (PAPER-SILENT; PER 0.6)")
    a("--beta", type=float, default=0.4, help="IS exponent beta at the first KD step, Eq. (5) (PAPER-SILENT; PER)")
    a("--beta-end", type=float, default=1.0, help="beta at the last KD step, linear (PAPER-SILENT; PER 1.0)")
    a("--eps", type=float, default=1e-6, help="priority offset epsilon, Eq. (6) (PAPER-SILENT; PER 1e-6)")
    a("--w-max-norm", type=int, default=1, choices=[0, 1], help="divide w by its max over B (PAPER-SILENT; PER 1)")
    a("--is-weight-loss", type=int, default=0, choices=[0, 1], help="also weight L_KD by w (PAPER-SILENT; PER)")
    a("--generator-init", default="meta", choices=["meta", "fresh"],
      help="Alg. 1 'initialize a generative network': clone of Fast's meta-generator, or a fresh random one")
    a("--reset-l0-at", type=int, default=None, help="call (1-based) of Fast reset_l0 (C10 140, digits 60%% in; 0 off)")
    a("--buffer-dtype", default="uint8", choices=["uint8", "float32"], help="B storage (uint8 = Fast's PNGs)")
    a("--flip", type=int, default=None, choices=[0, 1], help="horizontal flips in synthesis and KD (digits 0)")
    a("--last-k", type=int, default=None, help="k of acc_last[k] (TA-DFKD: 10 for C10, 20 for C100)")
    args = p.parse_args(argv)
    fill_defaults(args, PAPER_DEFAULTS[args.dataset])
    if not 0 <= args.warmup < args.epochs:
        fail(f"--warmup {args.warmup} must lie in [0, {args.epochs - 1}] or no KD step runs; lower it")
    if args.kd_steps is None:
        args.kd_steps = math.ceil(2 * args.data_scale / max(args.batch_size, 1))
    if args.cos_tmax is None:  # digits: relative to the run (C10's 200 and 140 are absolute, as Fast hard-codes)
        args.cos_tmax = args.epochs - args.warmup
    if args.reset_l0_at is None:
        args.reset_l0_at = args.warmup + round(0.6 * (args.epochs - args.warmup))
    args.lr_meta = args.lr_meta or args.lr_g * args.g_steps  # Fast: meta Adam lr = lr_g * g_steps
    check_positive(args, "epochs", "batch_size", "synthesis_batch_size", "data_scale", "kd_steps", "g_steps", "nz",
                   "ngf", "cos_tmax", "eval_every", "save_every", "last_k")
    if min(args.gamma, args.alpha, args.beta, args.beta_end, args.eps, args.bn_mmt) < 0 or args.bn_mmt >= 1:
        fail("--gamma, --alpha, --beta, --beta-end, --eps must be >= 0 and --bn-mmt in [0, 1); fix the value")
    if min(args.lr_g, args.lr_z, args.lr_meta, args.lr, args.T) <= 0:
        fail("--lr-g, --lr-z, --lr-meta, --lr and --T must be > 0; pass positive values")
    if args.amp == "fp16":
        fail("--amp fp16 is not supported by ssd_kd.py (FOMAML sums unscaled inner gradients); use --amp bf16")
    return finish_run_args(args, "ssd_kd")


# ---- Losses: one pure function per term -----------------------------------------------------------------------

def kl_rows(logits_s, logits_t, T=1.0):
    """Per-sample KL(softmax(t/T) || softmax(s/T)), summed over classes -> (B,). fp32 even under autocast."""
    return F.kl_div(F.log_softmax(logits_s.float() / T, 1), F.log_softmax(logits_t.float() / T, 1),
                    reduction="none", log_target=True).sum(1)


def loss_kd(logits_s, logits_t, T, weight=None):
    """Eq. (2) L_KD (footnote 1, Fast criterions.kldiv): T^2 * KL(p_t || p_s), batch mean ('batchmean').
    `weight` (B,) is PER's importance weight when --is-weight-loss (PAPER-SILENT; off by default)."""
    kl = kl_rows(logits_s, logits_t, T) * T * T
    return (kl if weight is None else kl * weight).mean()


def loss_adv(logits_s, logits_t):
    """Eq. (2) adversarial term as in Fast (fast_meta.py): -(1/B) sum_b m_b KL_b(p_t || p_s), T = 1,
    m_b = [argmax s_b == argmax t_b]; the mean runs over the whole batch, masked rows included."""
    keep = (logits_s.argmax(1) == logits_t.argmax(1)).float()
    return -(kl_rows(logits_s, logits_t) * keep).mean()


def loss_task(logits_t, target, phi):
    """Eq. (2) phi(x) * L_Task(x): per-sample CE of the teacher against `target`, times phi, batch mean [spec R]."""
    return (phi * F.cross_entropy(logits_t.float(), target, reduction="none")).mean()


def loss_bn(hooks, mmt, rho):
    """Eq. (1) on every teacher BN (plain L2 norms, summed over layers) with Fast's momentum variant
    (spec/bns.md 5): mu_hat = (1-rho) mu + rho mu_mmt, var_hat likewise; mmt[l] is None (plain) or (mu, var)."""
    total = 0.0
    for h, m in zip(hooks, mmt):
        mean, var = h.mean, h.var
        if m is not None:
            mean, var = (1 - rho) * mean + rho * m[0], (1 - rho) * var + rho * m[1]
        total = total + torch.linalg.vector_norm(h.bn.running_var.float() - var) \
            + torch.linalg.vector_norm(h.bn.running_mean.float() - mean)
    return total


def update_bn_mmt(hooks, mmt, rho):
    """Fast hooks.update_mmt, once per synthesis call: state = last stats first, then rho*state + (1-rho)*stats."""
    return [[h.mean.detach(), h.var.detach()] if m is None else
            [rho * m[0] + (1 - rho) * h.mean.detach(), rho * m[1] + (1 - rho) * h.var.detach()]
            for h, m in zip(hooks, mmt)]


# ---- Method pieces: modulating function (Eq. 3), priority sampling (Eq. 4-6), replay buffer (Alg. 1) ----------

def modulating_phi(p_max, c_t, class_counts, fill, gamma, diversity=True, difficulty=True):
    """Eq. (3) phi = (1 - count_B(c_T(x)) / |B|) * (1 - p_T(x))^gamma -> (B,).
    p_max: teacher confidence (B,); c_t: teacher argmax (B,); class_counts: (K,) histogram of c_T over B.
    PAPER-SILENT [spec R b]: |B| = current fill while B fills; diversity term 1 while B is empty."""
    div = 1 - class_counts[c_t].float() / fill if (diversity and fill > 0) else torch.ones_like(p_max)
    diff = (1 - p_max).pow(gamma) if difficulty else torch.ones_like(p_max)
    return div * diff


def sampling_probs(delta, alpha, eps):
    """Eq. (6) P(x) = (|delta(x)| + eps)^alpha / sum_B (|delta(x')| + eps)^alpha over the N filled entries."""
    q = (delta.abs() + eps).pow(alpha)
    return q / q.sum()


def is_weights(P, beta, max_norm=True):
    """Eq. (5) w = (N P)^(-beta), N = |B| fill [spec R]; max_norm divides by the max over B as PER does
    (= (P / P_min)^(-beta), max w = 1). Eq. (5) as printed has no normalisation (PAPER-SILENT, flag)."""
    w = (P.numel() * P).pow(-beta)
    return w / w.max() if max_norm else w


class ReplayBuffer:
    """Alg. 1's B: constant capacity |B| (the paper's "data scale"), FIFO (a ring: a new batch overwrites the oldest
    entries, spec R), per entry the image, the teacher class c_T cached at insertion (Eq. 3), the priority delta
    (Eq. 4) and the insertion epoch. The fill count is a host int, so slicing to it never syncs."""

    def __init__(self, capacity, shape, device, dtype="uint8"):
        self.capacity, self.inserted = capacity, 0
        self.images = torch.zeros((capacity, *shape), dtype=getattr(torch, dtype), device=device)
        self.cls = torch.zeros(capacity, dtype=torch.long, device=device)
        self.delta = torch.zeros(capacity, device=device)
        self.birth = torch.full((capacity,), -1, dtype=torch.long, device=device)

    @property
    def fill(self):
        return min(self.inserted, self.capacity)

    def quantize(self, x):
        """Fast's PNG pool: clamp to [0, 1], x255, truncate to uint8 (or keep float32 with --buffer-dtype)."""
        return (x.clamp(0, 1) * 255).to(torch.uint8) if self.images.dtype == torch.uint8 else x.float()

    def get(self, idx):
        x = self.images[idx]
        return x.float().div_(255) if x.dtype == torch.uint8 else x

    def add(self, x, cls, delta, epoch):
        x, cls, delta = x[-self.capacity:], cls[-self.capacity:], delta[-self.capacity:]
        idx = (self.inserted + torch.arange(len(x), device=x.device)) % self.capacity
        self.images[idx], self.cls[idx], self.delta[idx] = self.quantize(x), cls, delta.float()
        self.birth[idx] = epoch
        self.inserted += len(x)

    def update_priorities(self, idx, delta):
        """Eq. (4) write-back for the drawn entries only; a duplicate index keeps its larger value (scatter amax is
        order-free, so CUDA stays deterministic; PAPER-SILENT)."""
        self.delta.scatter_reduce_(0, idx, delta.float(), reduce="amax", include_self=False)

    def class_counts(self, num_classes):  # scatter_add, not bincount: CUDA bincount reads max() on the host
        cls = self.cls[:self.fill]
        return torch.zeros(num_classes, dtype=torch.long, device=cls.device).scatter_add_(0, cls, torch.ones_like(cls))

    def state_dict(self):
        n = self.fill
        return {"inserted": self.inserted, "images": self.images[:n].cpu(), "cls": self.cls[:n].cpu(),
                "delta": self.delta[:n].cpu(), "birth": self.birth[:n].cpu()}

    def load_state_dict(self, s):
        self.inserted = s["inserted"]
        for k in ("images", "cls", "delta", "birth"):
            getattr(self, k)[:len(s[k])] = s[k].to(getattr(self, k).device)


def reset_l0(generator):
    """Fast fast_meta.reset_l0 (OFFICIAL, kept): l1.0 weight N(0, 0.02), bias 0; conv_blocks.0 BN weight N(0, 0.02)
    (near zero, not 1: a Fast quirk, spec 7), bias 0. Acts on the meta-generator; its Adam state is kept."""
    for m in (generator.l1[0], generator.conv_blocks[0]):
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)


# ---- One update each: generator_step (inner iteration of the inversion), student_step (one KD step) -----------

def generator_step(ctx, fast, z, target, counts, fill, use_adv):
    """Eq. (2) for the generator at one inner iteration: returns (loss, x, detached terms). x = g(z) in [0, 1]."""
    a = ctx["args"]
    with autocast(ctx["device"], a.amp):
        x = fast(z)
        x_aug = ctx["normalize"](random_crop_flip(x, x.shape[-1] // 8, bool(a.flip)))  # same view for both nets
        if a.channels_last:
            x_aug = x_aug.contiguous(memory_format=torch.channels_last)
        logits_t = ctx["teacher"](x_aug).float()
        logits_s = ctx["student"](x_aug).float() if use_adv else None
    l_bn = loss_bn(ctx["bn_hooks"], ctx["bn_mmt"], a.bn_mmt)
    p_max, c_t = logits_t.softmax(1).max(1)
    phi = modulating_phi(p_max, c_t, counts, fill, a.gamma, bool(a.diversity), bool(a.difficulty))
    phi = phi.detach() if a.detach_phi else phi
    l_task = loss_task(logits_t, c_t if target is None else target, phi)
    l_adv = loss_adv(logits_s, logits_t) if use_adv else torch.zeros((), device=x.device)
    loss = a.bn * l_bn + a.oh * l_task + a.adv * l_adv
    return loss, x.detach(), {"loss/bn": l_bn.detach(), "loss/task": l_task.detach(), "loss/adv": l_adv.detach(),
                              "loss/gen": loss.detach(), "phi/mean": phi.detach().mean()}


def synthesize(ctx, call):
    """Alg. 1 (1), as Fast's FastMetaSynthesizer.synthesize: clone the meta-generator (or build a fresh one), adapt
    it with z for g_steps (inner Adam rebuilt each call), FOMAML: the meta-gradient is the sum of the clone's
    per-step gradients, one meta-Adam step at the last iteration. Returns the lowest-loss (pre-step) batch."""
    a, dev, gen = ctx["args"], ctx["device"], ctx["generator"]
    ctx["student"].eval().requires_grad_(False)
    ctx["bn_hooks"] = register_bn_hooks(ctx["teacher"])
    if call == a.reset_l0_at and a.generator_init == "meta":
        reset_l0(gen)
    meta = a.generator_init == "meta"
    ctx["opt_g"].zero_grad(set_to_none=True)  # Fast: meta zero_grad at it == 0
    fast = copy.deepcopy(gen) if meta else Generator(a.nz, a.ngf, ctx["image_size"], ctx["in_channels"]).to(dev)
    fast.train()
    z = torch.randn(a.synthesis_batch_size, a.nz, device=dev).requires_grad_(True)
    target = None if a.task_target == "argmax" else \
        torch.randint(ctx["num_classes"], (a.synthesis_batch_size,), device=dev)
    opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": a.lr_z}], lr=a.lr_g,
                           betas=(0.5, 0.999))
    counts, fill = ctx["buffer"].class_counts(ctx["num_classes"]), ctx["buffer"].fill  # B before this insertion
    use_adv = a.adv > 0 and call >= a.warmup  # OFFICIAL: adv on from call `warmup` (1-based), one epoch before KD
    sums = {}
    for it in range(a.g_steps):
        loss, x, terms = generator_step(ctx, fast, z, target, counts, fill, use_adv)
        if it == 0:
            best_x, best_loss = x, loss.detach()
        else:  # Fast: `if best_cost > loss.item()` (pre-step loss), here without a host sync
            better = loss.detach() < best_loss
            best_x, best_loss = torch.where(better, x, best_x), torch.minimum(loss.detach(), best_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if meta:  # Fast fomaml_grad: meta .grad += clone .grad
            for pm, pf in zip(gen.parameters(), fast.parameters()):
                pm.grad = pf.grad.clone() if pm.grad is None else pm.grad.add_(pf.grad)
            if it == a.g_steps - 1:
                ctx["opt_g"].step()
        opt.step()
        sums = {k: sums.get(k, 0.0) + v / a.g_steps for k, v in terms.items()}
    ctx["bn_mmt"] = update_bn_mmt(ctx["bn_hooks"], ctx["bn_mmt"], a.bn_mmt) if a.bn_mmt > 0 else ctx["bn_mmt"]
    for h in ctx["bn_hooks"]:
        h.remove()
    ctx["student"].train().requires_grad_(True)
    return best_x, sums


@torch.no_grad()
def insert_batch(ctx, x, epoch):
    """Alg. 1 lines 12-15: delta of a new sample = KL(p_t || p_s) at T = 1 (w_{-1} = 1, Eq. 4) and c_T, both on the
    stored (un-augmented) image, student in eval mode [spec R a]; insert, FIFO-evict beyond |B|."""
    a, buf = ctx["args"], ctx["buffer"]
    xn = ctx["normalize"](buf.quantize(x).float().div(255) if buf.images.dtype == torch.uint8 else x)
    ctx["student"].eval()
    with autocast(ctx["device"], a.amp):
        logits_t, logits_s = ctx["teacher"](xn).float(), ctx["student"](xn).float()
    ctx["student"].train()
    buf.add(x, logits_t.argmax(1), kl_rows(logits_s, logits_t), epoch)


def student_step(ctx, beta):
    """Alg. 1 lines 17-22: draw M from B by P (Eq. 6, with replacement as PER), L_KD on crop+flip views, w for M
    (Eq. 5), write delta = w * KL(T = 1, same forward, detached) back into B (Eq. 4), then the SGD step."""
    a, buf, student = ctx["args"], ctx["buffer"], ctx["student"]
    n = buf.fill
    P = sampling_probs(buf.delta[:n], a.alpha if a.priority_sampling else 0.0, a.eps)  # PS off: uniform P
    idx = torch.multinomial(P, a.batch_size, replacement=True)
    w = is_weights(P, beta if a.priority_sampling else 0.0, bool(a.w_max_norm))[idx]  # PS off: w = 1
    x = ctx["normalize"](random_crop_flip(buf.get(idx), ctx["image_size"] // 8, bool(a.flip)))
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(ctx["device"], a.amp):
        with torch.no_grad():
            logits_t = ctx["teacher"](x)
        logits_s = student(x)
    loss = loss_kd(logits_s, logits_t, a.T, w if a.is_weight_loss else None)
    ctx["opt_s"].zero_grad(set_to_none=True)
    loss.backward()
    buf.update_priorities(idx, w * kl_rows(logits_s.detach(), logits_t))
    ctx["opt_s"].step()
    return loss.detach()


# ---- Training schedule ----------------------------------------------------------------------------------------

def build(args, teacher, data, device):
    """Every object of a run, fresh (train() overwrites them from a checkpoint on --resume)."""
    nc, size = data.in_channels, data.image_size
    student = build_model(args.student, data.num_classes, nc).to(device)
    generator = Generator(args.nz, args.ngf, size, nc).to(device)
    if args.channels_last:
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    opt_s = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    return dict(args=args, device=device, teacher=teacher, student=student, generator=generator,
                normalize=Normalize(data.mean, data.std).to(device), num_classes=data.num_classes,
                image_size=size, in_channels=nc, bn_hooks=[], bn_mmt=[None] * n_bn, opt_s=opt_s,
                opt_g=torch.optim.Adam(generator.parameters(), lr=args.lr_meta, betas=(0.5, 0.999)),
                sched_s=torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=args.cos_tmax, eta_min=2e-4),
                buffer=ReplayBuffer(args.data_scale, (nc, size, size), device, args.buffer_dtype))


STATEFUL = ("student", "generator", "opt_s", "opt_g", "sched_s", "buffer")


def save_state(ctx, path, epoch, step, clock, history):
    save_checkpoint(path, {**{k: ctx[k].state_dict() for k in STATEFUL}, "epoch": epoch, "step": step,
                           "clock": clock, "bn_mmt": [m or [] for m in ctx["bn_mmt"]], "rng": get_rng_state(),
                           "history": history, "config": vars(ctx["args"])})


def load_state(ctx, ck):
    for k in STATEFUL:
        ctx[k].load_state_dict(ck[k])
    ctx["bn_mmt"] = [[t.to(ctx["device"]) for t in m] or None for m in ck["bn_mmt"]]
    set_rng_state(ck["rng"])
    return ck["epoch"], ck["step"], ck["clock"]


def buffer_stats(buf, num_classes):
    """Fig. 2 claim: entropy (nats; log K = balanced) of B's teacher-class histogram; priority mean and std."""
    p = buf.class_counts(num_classes).float() / max(buf.fill, 1)
    d = buf.delta[:buf.fill]
    return {"buffer/class_entropy": -torch.special.xlogy(p, p).sum(), "buffer/prio_mean": d.mean(),
            "buffer/prio_std": d.std(unbiased=False)}


def tick(device):
    if device.type == "cuda":
        torch.cuda.synchronize()  # SYNC: once per phase, so the inversion/distillation split is real GPU time
    return time.perf_counter()


def train(args, teacher, meta, data, device):
    ctx = build(args, teacher, data, device)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, step, clock = 0, 0, {"inversion_s": 0.0, "distill_s": 0.0, "elapsed_s": 0.0}
    if args.resume:
        start_epoch, step, clock = load_state(ctx, load_checkpoint(ckpt_path))
    # a teacher whose recorded accuracy is not digest-verified (or an official file) is measured here
    teacher_acc = meta.get("test_acc") or evaluate(teacher, data.test, ctx["normalize"], device, args.amp,
                                                   args.channels_last)
    logger = MetricLogger(args.out, args.epochs, start_epoch, teacher_acc=teacher_acc)
    buf, total_kd = ctx["buffer"], (args.epochs - args.warmup) * args.kd_steps
    t0 = t_last = time.perf_counter()
    elapsed0, seen, sums, n_sums = clock["elapsed_s"], 0, {}, 0
    for epoch in range(start_epoch, args.epochs):
        # (1) Data inversion with distribution balancing (Eq. 1-3), then insertion into B (Eq. 4, w = 1)
        t_a = tick(device)
        x_best, g_terms = synthesize(ctx, epoch + 1)
        insert_batch(ctx, x_best, epoch)
        t_b = tick(device)
        # (2) Distillation with priority sampling (Eq. 4-6), from the first epoch after warmup
        kd = torch.zeros((), device=device)
        if epoch >= args.warmup:
            for _ in range(args.kd_steps):
                beta = args.beta + (args.beta_end - args.beta) * step / max(total_kd - 1, 1)  # PER linear anneal
                kd = kd + student_step(ctx, beta) / args.kd_steps
                step += 1
            ctx["sched_s"].step()  # OFFICIAL: stepped only after KD epochs, T_max counted from warmup
        t_c = tick(device)
        clock["inversion_s"] += t_b - t_a
        clock["distill_s"] += t_c - t_b
        seen += args.synthesis_batch_size * args.g_steps + (args.kd_steps * args.batch_size if epoch >= args.warmup
                                                            else 0)
        for k, v in {**g_terms, "loss/kd": kd}.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sums += 1
        done = epoch + 1
        clock["elapsed_s"] = elapsed0 + time.perf_counter() - t0
        if done % args.eval_every == 0 or done == args.epochs:
            acc = evaluate(ctx["student"], data.test, ctx["normalize"], device, args.amp, args.channels_last)
            values = to_floats({**{k: v / n_sums for k, v in sums.items()}, **buffer_stats(buf, data.num_classes)})
            check_finite(values, step)  # SYNC above: once per evaluation
            now = time.perf_counter()
            hist = logger.history + [{"acc": acc}]
            logger.log({"epoch": done, "step": step, "acc": acc, "acc_max": max(r["acc"] for r in hist),  # test-sel.
                        f"acc_last_{args.last_k}": acc_last_k(hist, args.last_k), **values,
                        "buffer/fill": buf.fill, "lr": ctx["opt_s"].param_groups[0]["lr"],
                        "time/inversion_s": clock["inversion_s"], "time/distill_s": clock["distill_s"],
                        "img_per_s": seen / max(now - t_last, 1e-9), "elapsed_s": elapsed0 + now - t0})
            seen, sums, n_sums, t_last = 0, {}, 0, now
            if args.save_images:  # SYNC: the teacher's classes of the last synthesized batch, once per evaluation
                with torch.no_grad():
                    labels = ctx["teacher"](ctx["normalize"](x_best.float())).argmax(1)
                save_sample_grid(os.path.join(args.out, f"samples_{done}.png"), x_best, labels)
        stopping = args.stop_after is not None and done == args.stop_after
        if done % args.save_every == 0 or done == args.epochs or stopping:
            clock["elapsed_s"] = elapsed0 + time.perf_counter() - t0
            save_state(ctx, ckpt_path, done, step, clock, logger.history)
        if stopping:
            print(f"stopped after epoch {done} (--stop-after); continue with --resume", flush=True)
            return None
    return finish_run(args.out, "ssd_kd", args.dataset, teacher_acc, logger.history,
                      args.last_k, args.epochs, elapsed0 + time.perf_counter() - t0, args.seed, student=args.student,
                      teacher_arch=meta["arch"], inversion_s=clock["inversion_s"], distill_s=clock["distill_s"])


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    check_amp(args.amp, device)
    teacher, meta = load_teacher(args.teacher, args.dataset, device)
    if not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()):
        fail(f"teacher {meta['arch']} has no BatchNorm2d layer, which Eq. (1) needs; use a BN teacher")
    args.student = args.student or DEFAULT_STUDENT.get(meta["arch"])
    if args.student is None:
        fail(f"no default student for teacher {meta['arch']}; pass --student ARCH")
    build_model(args.student, 10, 3)  # unknown name -> one-line error before anything is written
    adv, bn, oh = pair_weights(meta["arch"], args.student)
    args.adv, args.bn, args.oh = (args.adv if args.adv is not None else adv, args.bn if args.bn is not None else bn,
                                  args.oh if args.oh is not None else oh)
    data = load_data(args.dataset, args.data_root, args.batch_size, 512, meta.get("image_size"),
                     meta.get("in_channels"), meta.get("mean"), meta.get("std"), device)
    check_teacher_data(meta, data)
    check_student(args.student, data)
    if data.image_size % 4:
        fail(f"image size {data.image_size} is not a multiple of 4, which Fast's generator needs; resize the data")
    prepare_run_dir(args.out, args.resume, args)  # on --resume: checkpoint verified, same flags, before any write
    seed_everything(args.seed)
    save_config(args.out, args, device)
    return train(args, teacher, meta, data, device)


if __name__ == "__main__":
    main()
