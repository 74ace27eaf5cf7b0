"""Fast: Up to 100x Faster Data-free Knowledge Distillation (Fast2 / Fast5 / Fast10, and the non-meta "Fast").

Gongfan Fang, Kanya Mo, Xinchao Wang, Jie Song, Shitao Bei, Haofei Zhang, Mingli Song. AAAI 2022, arXiv 2112.06253.
Official code: zju-vipa/Fast-Datafree @0dcecbc, `datafree_kd.py`, `datafree/synthesis/fast_meta.py` (and `fast.py`),
`datafree/hooks.py`, `datafree/criterions.py`, `scripts/fast_cifar.sh`. The paper text was not available when
spec/fast.md was written, so the equations below are the code's, named by term.

Instead of optimising every batch from scratch for thousands of steps (DeepInversion, CMI), Fast keeps one
meta-generator. Each epoch a clone of it is adapted for only k = 2, 5 or 10 inner Adam steps on a fresh z (BN
statistics with momentum + random-label CE + masked adversarial KL); the meta-generator is then moved by a first-order
meta-gradient (the sum of the inner gradients, "MAML") or toward the adapted clone (REPTILE). The best batch of the
call joins a pool of every image made so far, and the student takes 400 KD steps (T = 20) on the pool.

Equations (spec/fast.md 1, 3). In the framework of the TA-DFKD paper (which numbers them): KD is its Eq. (1)
L_KD = E_z[D(T(G(z)), S(G(z)))] with D = T^2 KL (loss_kd), L_inv is its Eq. (2) with L_Cls = L_oh, L_Adv = L_adv,
L_Rep = R_BN.
  R_BN    = sum_l ||rv_l - ((1-rho) var_l + rho var_bar_l)||_2 + ||rm_l - ((1-rho) mu_l + rho mu_bar_l)||_2 -> loss_bn()
  momentum state after each call: (mu_bar, var_bar) <- last stats, then rho*state + (1-rho)*last -> update_bn_mmt()
  L_oh    = CE(T(aug(x)), y), y ~ U{0..C-1} drawn per call                                      -> loss_oh()
  L_adv   = -(1/B) sum_b m_b KL(p_T,b || p_S,b), m_b = [argmax S = argmax T], on from call `warmup` -> loss_adv()
  L_inv   = bn*R_BN + oh*L_oh + adv*L_adv, k inner Adam steps on (theta', z)                    -> generator_step()
  MAML    g_meta = sum_{i<k} grad_theta' L_inv(theta'_i, z_i), one meta-Adam step (lr_g * k)      -> fomaml_grad()
  REPTILE g_meta = 67 (theta - theta'_k), one meta-Adam step                                    -> reptile_grad()
  output  the x = G_theta'_i(z_i) with the lowest pre-step L_inv, i < k                         -> select_best()
  L_KD    = T^2 KL(softmax(t/T) || softmax(s/T)), batch mean, T = 20, on pool images             -> loss_kd()
  reset   at call warmup + 120: l1.0 weight N(0, 0.02), conv_blocks.0 (BN) gamma N(0, 0.02), biases 0 -> reset_l0()

Defaults (spec/fast.md 2): scripts/fast_cifar.sh: 220 epochs, warmup 20, batch 256 (KD and synthesis), 400 KD steps,
SGD 0.2 (momentum 0.9, wd 1e-4) + cosine T_max 200 / eta_min 2e-4 stepped after KD epochs, T 20, bn_mmt 0.9, nz 256,
ngf 64; presets Fast2 (lr_g 5e-3, lr_z 0.015), Fast5 (3e-3, 0.01), Fast10 (2e-3, 0.01), meta lr = lr_g * g_steps;
per-pair (adv, bn, oh) in PAIR_WEIGHTS. CIFAR-10 = CIFAR-100 values (fast_cifar.sh:2). PAPER-SILENT [spec R]: default
preset Fast5; pairs outside the script take their teacher family's weights; Tiny-ImageNet as CIFAR (UNOFFICIAL).
Digits: scaled down, see PAPER_DEFAULTS['digits'].

Differences from the official code (spec/fast.md 7), none changing an update rule:
  - Pool: one uint8 device tensor (checkpointed), truncated as Fast's PNGs (clamp, x255, astype uint8), not PNG files
    re-read every epoch; so no stale-pool trap (7.9: a re-run into the same --save_dir trains on the old run's images)
    and no per-epoch DataLoader rebuild. KD order as Fast's loader: a fresh shuffle per epoch, reshuffled when spent.
  - No host syncs in the loop (7.10): best-of-k by torch.where (Fast: loss.item()); no unprinted train metric; BN hooks
    only during synthesis. Teacher frozen, student frozen during synthesis (7.13: Fast accumulates unused gradients).
    z and labels drawn on the device, the clone by deepcopy (7.12: the RNG stream differs from Fast's).
  - Fast reports the best epoch (7.1, test-selected) and synthesis-only hours (7.2); we report final and acc_last[k],
    log acc_max labelled test-selected, and time/synth_s, time/kd_s and elapsed_s (end to end, SSD-KD's timing).
  - --amp fp16 refused: Fast's --fp16 KD path crashes (7.11) and the summed meta-gradient would need per-step
    unscaling. The teacher's own normalisation (Fast: the dataset's); digits without horizontal flip.
  - Kept as Fast does, tagged OFFICIAL: adv on one call before KD (7.3); reset_l0 sets the first BN's gamma ~0 (7.4;
    --reset-l0-gamma 1 gives N(1, 0.02)) and only with a meta-generator; best batch from pre-step losses (7.5);
    REPTILE factor 67, inert under Adam (7.6); T_max 200 and reset call 140 absolute on CIFAR (--t-max,
    --reset-l0-at); the meta-generator's BN buffers never update (7.7).

Run:
  python fast.py                                                                   # digits, Fast5, < 3 min on CPU
  python fast.py --dataset cifar10 --teacher teachers/cifar10_resnet34.pt --g-steps 2   # Fast2, SSD-KD Table 1
  python fast.py --dataset cifar100 --teacher T.pt --student wrn16_1 --g-steps 10       # Fast10, Table 2
  python fast.py --meta reptile | --meta none                                      # REPTILE / non-meta Fast
  python fast.py --resume --out runs/fast-digits-digits_wrn16_2-s0                 # continue a run

Expected: Fast README (best epoch, synthesis hours) C10 W40-2->W16-1 Fast2/5/10 88.36/88.90/89.29, C100 R34->R18
69.76/72.82/74.34 (full tables in the README). Ours, digits (wrn16_2 99.63 % -> wrn16_1, idle 2-core CPU, 2
threads): `python fast.py` (Fast5, seed 0) final 99.07 %, acc_last[10] 99.00 %, acc_max 99.63 % (test-selected), 36 s;
Fast2 seeds 0-2 final 98.15 / 98.70 / 98.33 %, 32-34 s each (README: beside SSD-KD). CIFAR not yet measured.
"""
import argparse
import copy
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

# scripts/fast_cifar.sh + datafree_kd.py; g_steps 5 = Fast5 is PAPER-SILENT [spec R] (the script runs 2, 5 and 10).
# save_every 1: a killed run loses at most one epoch (CIFAR: ~1 min on a V100, SSD-KD's 1.5-4 h / 220 epochs).
C10 = dict(epochs=220, warmup=20, batch_size=256, synthesis_batch_size=256, kd_steps=400, g_steps=5, nz=256, ngf=64,
           lr=0.2, weight_decay=1e-4, t_max=200, eta_min=2e-4, T=20.0, bn_mmt=0.9, reset_l0_at=140, crop_padding=4,
           flip=1, last_k=10, save_every=1, save_images=0)
PAPER_DEFAULTS = {
    "cifar10": C10, "cifar100": {**C10, "last_k": 20},
    "tinyimagenet": {**C10, "last_k": 20}, "folder": C10,  # UNOFFICIAL [spec R]: no such runs; CIFAR values
    "mnist": {**C10, "flip": 0},  # UNOFFICIAL (and the default LeNet-5 teacher has no BN: refused)
    # digits (ours, spec 10 [R]): 1,257 real training images, 2 CPU cores, < 3 min. Same ratios as C10:
    # warmup = epochs / 11 (20/220), reset_l0 at call warmup + 0.6 (epochs - warmup) (C10 20 + 120), T_max = KD
    # epochs (None = follow --epochs). 22 epochs: the KD phase (20 epochs x 40 steps) is where the time goes.
    # Batch 64 (KD and synthesis): a pool of 1,408 images after 22 calls, about the real training set.
    # kd_steps 40 (400/10): 40 x 64 = 2,560 draws per epoch = ~2 passes over the final pool (C10: 400 x 256 over
    # 56,320 = 1.8). ngf 32: the generator, not the 16x16 teacher, dominates CPU time. Crop padding 2 = 4 x 16/32;
    # no flip (digits are not mirror-symmetric, as train_teacher.py). Every loss weight and lr stays official.
    "digits": {**C10, "epochs": 22, "warmup": 2, "batch_size": 64, "synthesis_batch_size": 64, "kd_steps": 40,
               "ngf": 32, "t_max": None, "reset_l0_at": None, "crop_padding": 2, "flip": 0, "save_images": 1},
}
# g_steps -> (lr_g, lr_z) of fast_cifar.sh: Fast2 lines 4/12/20/28/36, Fast5 6/14/..., Fast10 8/16/...
PRESETS = {2: (5e-3, 0.015), 5: (3e-3, 0.01), 10: (2e-3, 0.01)}
# (adv, bn, oh) of fast_cifar.sh per teacher -> student pair; other pairs take their teacher family's [spec R].
PAIR_WEIGHTS = {("resnet34", "resnet18"): (1.33, 10.0, 0.5), ("vgg11", "resnet18"): (1.0, 10.0, 0.5),
                ("wrn40_2", "wrn16_1"): (1.1, 10.0, 0.4), ("wrn40_2", "wrn40_1"): (1.1, 10.0, 0.4),
                ("wrn40_2", "wrn16_2"): (1.1, 10.0, 0.4)}
DEFAULT_STUDENT = {"resnet34": "resnet18", "vgg11": "resnet18", "wrn40_2": "wrn16_1", "wrn16_2": "wrn16_1",
                   "resnet34_tiny": "resnet18_tiny"}  # the script's pairs; digits' wrn16_2 -> wrn16_1
REPTILE_FACTOR = 67.0  # OFFICIAL fast_meta.py reptile_grad: inert under Adam (spec 7.6), kept literal


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description="Fast: Up to 100x Faster Data-free KD (Fang et al., AAAI 2022)"))
    a = p.add_argument
    a("--dataset", default="digits", choices=DATASETS, help="real test data and teacher domain (default digits)")
    a("--data-root", default="data", help="torchvision root / folder dataset root")
    a("--teacher", default=None, help="teacher checkpoint (default teachers/<dataset>_<arch>.pt)")
    a("--student", default=None, help="student arch (default: the script's pair, resnet34->resnet18, wrn40_2->wrn16_1)")
    a("--out", default=None, help="run directory (default runs/fast-<dataset>-<teacher stem>-s<seed>)")
    a("--seed", type=int, default=0, help="seed (fast_cifar.sh: 0)")
    a("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    a("--epochs", type=int, default=None, help="epochs = synthesis calls (fast_cifar.sh --epochs 220)")
    a("--resume", action="store_true", help="continue the run in --out from checkpoint.pt")
    a("--amp", default="off", choices=["bf16", "fp16", "off"], help="autocast, CPU or CUDA (off until benchmarked)")
    a("--channels-last", action="store_true", help="channels_last memory format (CPU and CUDA)")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (Fast: every epoch)")
    a("--save-every", type=int, default=None, help="checkpoint every N epochs (and at the end; default 1)")
    a("--save-images", type=int, default=None, choices=[0, 1], help="write samples_<epoch>.png (digits 1, else 0)")
    a("--stop-after", type=int, default=None, help="stop after this epoch as if interrupted (resume test)")
    a("--meta", default="maml", choices=["maml", "reptile", "none"],
      help="meta update: maml (Fast --is_maml 1, default), reptile (--is_maml 0), none (--method fast, no meta)")
    a("--g-steps", type=int, default=None, help="inner steps k: 2 / 5 / 10 = Fast2 / Fast5 / Fast10 (PAPER-SILENT: 5)")
    a("--lr-g", type=float, default=None, help="inner Adam lr of the generator (preset: 5e-3 / 3e-3 / 2e-3)")
    a("--lr-z", type=float, default=None, help="inner Adam lr of z (preset: 0.015 / 0.01 / 0.01)")
    a("--lr-meta", type=float, default=None, help="meta Adam lr (Fast: lr_g * g_steps)")
    a("--warmup", type=int, default=None, help="epochs without KD (Fast --warmup 20; adv on from call `warmup`)")
    a("--kd-steps", type=int, default=None, help="KD steps per epoch (Fast --kd_steps 400)")
    a("--batch-size", type=int, default=None, help="KD batch (Fast --batch_size 256)")
    a("--synthesis-batch-size", type=int, default=None, help="images synthesised per call (Fast = --batch_size)")
    a("--nz", type=int, default=None, help="latent size (Fast: 256, hard-coded)")
    a("--ngf", type=int, default=None, help="generator width (Fast: 64, hard-coded)")
    a("--lr", type=float, default=None, help="student SGD lr (Fast --lr 0.2, momentum 0.9 hard-coded)")
    a("--weight-decay", type=float, default=None, help="student weight decay (Fast 1e-4)")
    a("--t-max", type=int, default=None, help="cosine T_max in KD epochs (OFFICIAL: hard-coded 200; digits all)")
    a("--eta-min", type=float, default=None, help="cosine eta_min (Fast 2e-4)")
    a("--T", type=float, default=None, help="KD temperature (Fast --T 20)")
    a("--adv", type=float, default=None, help="weight of L_adv (fast_cifar.sh per pair: r34 1.33, vgg 1.0, wrn 1.1)")
    a("--bn", type=float, default=None, help="weight of R_BN (fast_cifar.sh: 10)")
    a("--oh", type=float, default=None, help="weight of L_oh (fast_cifar.sh per pair: r34/vgg 0.5, wrn 0.4)")
    a("--bn-mmt", type=float, default=None, help="BN-statistics momentum rho (Fast --bn_mmt 0.9; 0 = plain R_BN)")
    a("--reset-l0-at", type=int, default=None,
      help="1-based call of reset_l0 (Fast: warmup + 120 = 140; digits 60%% into KD; 0 = never)")
    a("--reset-l0-gamma", type=float, default=0.0, help="mean of the reset first-BN gamma (OFFICIAL 0; 1 = BN init)")
    a("--crop-padding", type=int, default=None, help="random-crop padding, synthesis and KD (Fast 4; digits 2)")
    a("--flip", type=int, default=None, choices=[0, 1], help="horizontal flips in synthesis and KD (digits 0)")
    a("--last-k", type=int, default=None, help="k of acc_last[k] (TA-DFKD: 10 for C10, 20 for C100)")
    args = p.parse_args(argv)
    fill_defaults(args, PAPER_DEFAULTS[args.dataset])
    if not 0 <= args.warmup < args.epochs:
        fail(f"--warmup {args.warmup} must lie in [0, {args.epochs - 1}] or no KD step runs; lower it")
    if (args.lr_g is None or args.lr_z is None) and args.g_steps not in PRESETS:
        fail(f"--g-steps {args.g_steps} has no Fast preset (2, 5, 10); pass --lr-g and --lr-z")
    lr_g, lr_z = PRESETS.get(args.g_steps, (None, None))
    args.lr_g = lr_g if args.lr_g is None else args.lr_g
    args.lr_z = lr_z if args.lr_z is None else args.lr_z
    args.lr_meta = args.lr_g * args.g_steps if args.lr_meta is None else args.lr_meta  # Fast fast_meta.py:87-90
    if args.t_max is None:  # digits: relative to the run (C10's 200 and 140 are absolute, as Fast hard-codes them)
        args.t_max = args.epochs - args.warmup
    if args.reset_l0_at is None:
        args.reset_l0_at = args.warmup + round(0.6 * (args.epochs - args.warmup))
    check_positive(args, "epochs", "batch_size", "synthesis_batch_size", "kd_steps", "g_steps", "nz", "ngf", "t_max",
                   "eval_every", "save_every", "last_k")
    if args.crop_padding < 0 or args.reset_l0_at < 0 or not 0 <= args.bn_mmt < 1:
        fail("--crop-padding and --reset-l0-at must be >= 0 and --bn-mmt in [0, 1); fix the value")
    if min(args.lr_g, args.lr_z, args.lr_meta, args.lr, args.T) <= 0 or args.eta_min < 0:
        fail("--lr-g, --lr-z, --lr-meta, --lr and --T must be > 0 and --eta-min >= 0; pass positive values")
    if args.amp == "fp16":
        fail("--amp fp16 is not supported by fast.py (Fast's --fp16 crashes; the summed meta-gradient would need "
             "per-step unscaling); use --amp bf16")
    return finish_run_args(args, "fast")


def pair_weights(teacher, student):
    """(adv, bn, oh) for a pair: Fast's script value, else (PAPER-SILENT) the value of the teacher's family."""
    if (teacher, student) in PAIR_WEIGHTS:
        return PAIR_WEIGHTS[(teacher, student)]
    return PAIR_WEIGHTS[("wrn40_2", "wrn16_1") if teacher.startswith("wrn") else
                        ("vgg11", "resnet18") if teacher.startswith("vgg") else ("resnet34", "resnet18")]


def resolve_pair(args, teacher_arch):
    """Fill --student and the unset (adv, bn, oh) from the teacher's arch (main() calls it after loading)."""
    args.student = args.student or DEFAULT_STUDENT.get(teacher_arch)
    if args.student is None:
        fail(f"no default student for teacher {teacher_arch}; pass --student ARCH")
    build_model(args.student, 10, 3)  # unknown name -> one-line error before anything is written
    row = pair_weights(teacher_arch, args.student)
    args.adv, args.bn, args.oh = (row[i] if v is None else v for i, v in enumerate((args.adv, args.bn, args.oh)))
    return args


# ---- Losses: one pure function per term (fp32 under autocast; fp64 inputs stay fp64) --------------------------

def _f32(t):
    return t if t.dtype == torch.float64 else t.float()


def kl_rows(logits_s, logits_t, T=1.0):
    """Per-sample KL(softmax(t/T) || softmax(s/T)), summed over classes -> (B,) (Fast criterions.kldiv)."""
    return F.kl_div(F.log_softmax(_f32(logits_s) / T, 1), F.log_softmax(_f32(logits_t) / T, 1),
                    reduction="none", log_target=True).sum(1)


def loss_kd(logits_s, logits_t, T):
    """TA-DFKD Eq. (1) with D = T^2 KL(p_t || p_s), 'batchmean' (Fast KLDiv(T=20), datafree_kd.py:428)."""
    return (kl_rows(logits_s, logits_t, T) * T * T).mean()


def loss_adv(logits_s, logits_t):
    """L_adv (fast_meta.py:144-149) = -(1/B) sum_b m_b KL_b(p_t || p_s), T = 1, m_b = [argmax s_b == argmax t_b];
    the mean runs over the whole batch, masked rows included."""
    keep = (logits_s.argmax(1) == logits_t.argmax(1)).float()
    return -(kl_rows(logits_s, logits_t) * keep).mean()


def loss_oh(logits_t, target):
    """L_oh (fast_meta.py:143) = CE(T(aug(x)), y), batch mean, y the call's uniform random labels."""
    return F.cross_entropy(_f32(logits_t), target)


def loss_bn(hooks, mmt, rho):
    """R_BN (hooks.py:89-105): per teacher BN, plain L2 norms of running stats minus the momentum-blended batch
    stats mu_hat = (1-rho) mu + rho mu_bar (likewise var); mmt[l] is None (no state yet: plain) or (mu_bar, var_bar)."""
    total = 0.0
    for h, m in zip(hooks, mmt):
        mean, var = h.mean, h.var
        if m is not None:
            mean, var = (1 - rho) * mean + rho * m[0], (1 - rho) * var + rho * m[1]
        total = total + torch.linalg.vector_norm(h.bn.running_var.float() - var) \
            + torch.linalg.vector_norm(h.bn.running_mean.float() - mean)
    return total


def update_bn_mmt(hooks, mmt, rho):
    """hooks.py:107-114 update_mmt, once per call: state = last stats if empty, else rho*state + (1-rho)*last."""
    return [[h.mean.detach(), h.var.detach()] if m is None else
            [rho * m[0] + (1 - rho) * h.mean.detach(), rho * m[1] + (1 - rho) * h.var.detach()]
            for h, m in zip(hooks, mmt)]


# ---- Method pieces: meta-gradients, best-of-k, first-layer reset, image pool -----------------------------------

def clone_generator(generator):
    """Fast Generator.clone(): a copy of the meta-generator, adapted by the inner loop and then discarded."""
    return copy.deepcopy(generator).train()


def fomaml_grad(meta_gen, fast_gen):
    """fast_meta.py:23-27 fomaml_grad, every inner step: meta .grad += clone .grad (summed over the k steps)."""
    for pm, pf in zip(meta_gen.parameters(), fast_gen.parameters()):
        pm.grad = pf.grad.clone() if pm.grad is None else pm.grad.add_(pf.grad)


def reptile_grad(meta_gen, fast_gen, factor=REPTILE_FACTOR):
    """fast_meta.py:16-20,172-175 reptile_grad, after the loop: meta .grad = 67 (theta - theta'_k), parameters only."""
    for pm, pf in zip(meta_gen.parameters(), fast_gen.parameters()):
        pm.grad = factor * (pm.detach() - pf.detach())


def select_best(best, x, loss, it):
    """fast_meta.py:152-155: keep x if its pre-step loss is strictly below the best so far (iteration 0 always).
    best = (x, loss, index) as device tensors; torch.where instead of Fast's loss.item(), so no host sync."""
    if best is None:
        return x, loss, torch.zeros((), dtype=torch.long, device=loss.device)
    better = loss < best[1]
    return (torch.where(better, x, best[0]), torch.where(better, loss, best[1]),
            torch.where(better, torch.full_like(best[2], it), best[2]))


def reset_l0(generator, gamma_mean=0.0):
    """fast_meta.py:30-34 reset_l0: l1.0 weight N(0, 0.02), bias 0; conv_blocks.0 (BN) weight N(gamma_mean, 0.02),
    bias 0. OFFICIAL: gamma_mean 0, so the first BN's gamma is ~0, not 1 (spec 7.4). Meta-Adam state kept."""
    nn.init.normal_(generator.l1[0].weight, 0.0, 0.02)
    nn.init.zeros_(generator.l1[0].bias)
    nn.init.normal_(generator.conv_blocks[0].weight, gamma_mean, 0.02)
    nn.init.zeros_(generator.conv_blocks[0].bias)


class ImagePool:
    """Every synthesised image of the run, uint8 (N, C, H, W) on the device (Fast: PNG files under --save_dir)."""

    def __init__(self, capacity, shape, device):
        self.images = torch.zeros((capacity, *shape), dtype=torch.uint8, device=device)
        self.n = 0

    def add(self, x):
        # OFFICIAL _utils.save_image_batch: clamp(0, 1) * 255, astype('uint8'): truncation, no rounding
        self.images[self.n:self.n + len(x)] = (x.detach().float().clamp(0, 1) * 255).to(torch.uint8)
        self.n += len(x)

    def get(self, idx):
        return self.images[idx].float().div_(255)

    def state_dict(self):
        return {"n": self.n, "images": self.images[:self.n].cpu()}

    def load_state_dict(self, s):
        self.n = s["n"]
        self.images[:self.n] = s["images"].to(self.images.device)


# ---- One update each: generator_step (one inner iteration), synthesize (one call), student_step (one KD step) --

def generator_step(ctx, fast, z, target, use_adv):
    """L_inv at one inner iteration (fast_meta.py:128-150): returns (loss, x, detached terms); x = G(z) in [0, 1]."""
    a = ctx["args"]
    with autocast(ctx["device"], a.amp):
        x = fast(z)
        x_aug = ctx["normalize"](random_crop_flip(x, a.crop_padding, bool(a.flip)))  # one view for T and S
        if a.channels_last:
            x_aug = x_aug.contiguous(memory_format=torch.channels_last)
        logits_t = ctx["teacher"](x_aug).float()
        logits_s = ctx["student"](x_aug).float() if use_adv else None
    l_bn = loss_bn(ctx["bn_hooks"], ctx["bn_mmt"], a.bn_mmt)
    l_oh = loss_oh(logits_t, target)
    zero = torch.zeros((), device=x.device)
    l_adv = loss_adv(logits_s, logits_t) if use_adv else zero
    agree = (logits_s.argmax(1) == logits_t.argmax(1)).float().mean() if use_adv else zero
    loss = a.bn * l_bn + a.oh * l_oh + a.adv * l_adv
    return loss, x.detach(), {"loss/bn": l_bn.detach(), "loss/oh": l_oh.detach(), "loss/adv": l_adv.detach(),
                              "loss/inv": loss.detach(), "gen/adv_agree": agree}


def synthesize(ctx, call):
    """One FastMetaSynthesizer.synthesize() (fast_meta.py:101-181), call = 1-based epoch: clone the meta-generator,
    k inner steps of a fresh Adam over (theta', z), meta update (MAML during, REPTILE after the loop), momentum
    update of the BN state. --meta none (fast.py:103-182): no clone, the fresh Adam moves the generator itself."""
    a, dev, gen = ctx["args"], ctx["device"], ctx["generator"]
    ctx["student"].eval().requires_grad_(False)
    ctx["bn_hooks"] = register_bn_hooks(ctx["teacher"])
    if a.meta != "none" and call == a.reset_l0_at:  # OFFICIAL: fast.py (non-meta) never calls reset_l0
        reset_l0(gen, a.reset_l0_gamma)
    z = torch.randn(a.synthesis_batch_size, a.nz, device=dev).requires_grad_(True)
    target = torch.randint(ctx["num_classes"], (a.synthesis_batch_size,), device=dev)
    fast = clone_generator(gen) if a.meta != "none" else gen
    opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": a.lr_z}], lr=a.lr_g,
                           betas=(0.5, 0.999))
    use_adv = a.adv > 0 and call >= a.warmup  # OFFICIAL: ep >= warmup, i.e. one call before the first KD epoch
    if a.meta == "maml":
        ctx["opt_g"].zero_grad(set_to_none=True)  # Fast: meta zero_grad at it == 0
    best = None
    for it in range(a.g_steps):
        loss, x, terms = generator_step(ctx, fast, z, target, use_adv)
        best = select_best(best, x, loss.detach(), it)  # OFFICIAL: pre-step loss; the final state is never output
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.meta == "maml":
            fomaml_grad(gen, fast)
            if it == a.g_steps - 1:
                ctx["opt_g"].step()
        opt.step()
    ctx["bn_mmt"] = update_bn_mmt(ctx["bn_hooks"], ctx["bn_mmt"], a.bn_mmt) if a.bn_mmt > 0 else ctx["bn_mmt"]
    if a.meta == "reptile":
        ctx["opt_g"].zero_grad(set_to_none=True)
        reptile_grad(gen, fast)
        ctx["opt_g"].step()
    for h in ctx["bn_hooks"]:
        h.remove()
    ctx["student"].train().requires_grad_(True)
    return best[0], {**terms, "gen/best_iter": best[2].float()}  # terms of the last inner iteration (spec 10)


def student_step(ctx, idx):
    """One KD step (datafree_kd.py:416-437): pool images idx, crop + flip (the dataset's train transform), L_KD."""
    a, student = ctx["args"], ctx["student"]
    x = ctx["normalize"](random_crop_flip(ctx["pool"].get(idx), a.crop_padding, bool(a.flip)))
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(ctx["device"], a.amp):
        with torch.no_grad():
            logits_t = ctx["teacher"](x)
        logits_s = student(x)
    loss = loss_kd(logits_s, logits_t, a.T)
    ctx["opt_s"].zero_grad(set_to_none=True)
    loss.backward()
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
    opt_g = None if args.meta == "none" else \
        torch.optim.Adam(generator.parameters(), lr=args.lr_meta, betas=(0.5, 0.999))  # one per run
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    return dict(args=args, device=device, teacher=teacher, student=student, generator=generator, opt_s=opt_s,
                opt_g=opt_g, normalize=Normalize(data.mean, data.std).to(device), num_classes=data.num_classes,
                bn_hooks=[], bn_mmt=[None] * n_bn,
                sched_s=torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=args.t_max, eta_min=args.eta_min),
                pool=ImagePool(args.epochs * args.synthesis_batch_size, (nc, size, size), device))


STATEFUL = ("student", "generator", "opt_s", "opt_g", "sched_s", "pool")


def save_state(ctx, path, epoch, step, clock, history):
    save_checkpoint(path, {**{k: ctx[k].state_dict() if ctx[k] is not None else None for k in STATEFUL},
                           "epoch": epoch, "step": step, "clock": clock, "bn_mmt": [m or [] for m in ctx["bn_mmt"]],
                           "rng": get_rng_state(), "history": history, "config": vars(ctx["args"])})


def load_state(ctx, ck):
    for k in STATEFUL:
        if ctx[k] is not None:
            ctx[k].load_state_dict(ck[k])
    ctx["bn_mmt"] = [[t.to(ctx["device"]) for t in m] or None for m in ck["bn_mmt"]]
    set_rng_state(ck["rng"])
    return ck["epoch"], ck["step"], ck["clock"]


def tick(device):
    if device.type == "cuda":
        torch.cuda.synchronize()  # SYNC: once per phase, so the synthesis/KD split is real GPU time
    return time.perf_counter()


def train(args, teacher, meta, data, device):
    ctx = build(args, teacher, data, device)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, step, clock = 0, 0, {"synth_s": 0.0, "kd_s": 0.0, "elapsed_s": 0.0}
    if args.resume:
        start_epoch, step, clock = load_state(ctx, load_checkpoint(ckpt_path))
    # a teacher whose recorded accuracy is not digest-verified (or an official file) is measured here
    teacher_acc = meta.get("test_acc") or evaluate(teacher, data.test, ctx["normalize"], device, args.amp,
                                                   args.channels_last)
    logger = MetricLogger(args.out, args.epochs, start_epoch, teacher_acc=teacher_acc)
    pool, b = ctx["pool"], args.batch_size
    t0 = t_last = time.perf_counter()
    elapsed0, seen, sums, n_sums = clock["elapsed_s"], 0, {}, 0
    for epoch in range(start_epoch, args.epochs):
        # (1) Synthesis: one call per epoch (ep_steps // kd_steps = 1), its best batch joins the pool
        t_a = tick(device)
        x_best, g_terms = synthesize(ctx, epoch + 1)
        pool.add(x_best)
        t_b = tick(device)
        # (2) KD from epoch `warmup` on: kd_steps batches from a fresh shuffle of the whole pool (Fast's new loader)
        lr = ctx["opt_s"].param_groups[0]["lr"]
        kd = torch.zeros((), device=device)
        if epoch >= args.warmup:
            order, pos = torch.randperm(pool.n, device=device), 0
            for _ in range(args.kd_steps):
                if pos >= pool.n:  # Fast DataIter: restart with a new shuffle when exhausted
                    order, pos = torch.randperm(pool.n, device=device), 0
                kd = kd + student_step(ctx, order[pos:pos + b]) / args.kd_steps
                pos, step = pos + b, step + 1
            ctx["sched_s"].step()  # OFFICIAL: stepped only after KD epochs, T_max counted from warmup
        t_c = tick(device)
        clock["synth_s"] += t_b - t_a
        clock["kd_s"] += t_c - t_b
        seen += args.synthesis_batch_size * args.g_steps + (args.kd_steps * b if epoch >= args.warmup else 0)
        for k, v in {**g_terms, "loss/kd": kd}.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sums += 1
        done = epoch + 1
        if done % args.eval_every == 0 or done == args.epochs:
            acc = evaluate(ctx["student"], data.test, ctx["normalize"], device, args.amp, args.channels_last)
            values = to_floats({k: v / n_sums for k, v in sums.items()})
            check_finite(values, step)  # SYNC above: once per evaluation
            now = time.perf_counter()
            hist = logger.history + [{"acc": acc}]
            logger.log({"epoch": done, "step": step, "acc": acc, "acc_max": max(r["acc"] for r in hist),  # test-sel.
                        f"acc_last_{args.last_k}": acc_last_k(hist, args.last_k), **values, "pool/size": pool.n,
                        "lr": lr, "time/synth_s": clock["synth_s"], "time/kd_s": clock["kd_s"],
                        "img_per_s": seen / max(now - t_last, 1e-9), "elapsed_s": elapsed0 + now - t0})
            seen, sums, n_sums, t_last = 0, {}, 0, now
            if args.save_images:
                with torch.no_grad(), autocast(device, args.amp):
                    labels = ctx["teacher"](ctx["normalize"](x_best[:64].float())).argmax(1)
                save_sample_grid(os.path.join(args.out, f"samples_{done}.png"), x_best[:64], labels)
        stopping = args.stop_after is not None and done == args.stop_after
        if done % args.save_every == 0 or done == args.epochs or stopping:
            clock["elapsed_s"] = elapsed0 + time.perf_counter() - t0
            save_state(ctx, ckpt_path, done, step, clock, logger.history)
        if stopping:
            print(f"stopped after epoch {done} (--stop-after); continue with --resume", flush=True)
            return None
    return finish_run(args.out, "fast", args.dataset, teacher_acc, logger.history,
                      args.last_k, args.epochs, elapsed0 + time.perf_counter() - t0, args.seed, student=args.student,
                      teacher_arch=meta["arch"], meta=args.meta, g_steps=args.g_steps, synth_s=clock["synth_s"],
                      kd_s=clock["kd_s"])


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    check_amp(args.amp, device)
    teacher, meta = load_teacher(args.teacher, args.dataset, device)
    if not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()):
        fail(f"teacher {meta['arch']} has no BatchNorm2d layer, which R_BN needs; use a BN teacher")
    resolve_pair(args, meta["arch"])
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
