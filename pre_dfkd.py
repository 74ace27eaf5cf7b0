"""PRE-DFKD: "Robust and Resource-Efficient Data-Free Knowledge Distillation by Generative Pseudo Replay", Kuluhan
Binici, Shivam Aggarwal, Nam Trung Pham, Karianto Leman, Tulika Mitra, AAAI 2022, arXiv 2201.03019. Official code:
github.com/kuluhan/PRE-DFKD @0b39f6a (main.py, distillation.py, networks/generator.py, utils/aux.py).

A "novel" generator G (spectral-norm convs) is trained against the student with DAFL's class prior plus an
adversarial term. A student trained only on G's drifting samples forgets, so a VAE (encoder E, decoder = "memory"
generator M) learns the distribution of past synthetic samples, and every student step rehearses samples drawn from
M ("generative pseudo replay") beside the new ones. Memory samples are inferred per batch by one Adam step on their
latent codes that makes them confident and class-balanced. Per iteration: 1 G step, then 10 student steps, a VAE
step after each of the first 4. The paper text was not available (spec/pre_dfkd.md 0): equations are named by
their role and the official line; the paper's "synthetic-data-aware reconstruction" is the code's pixel + logit L1.

Equations (spec/pre_dfkd.md 1, 3; B novel, B_M = B/8 memory, B_V = B/2 VAE-novel images). In the TA-DFKD paper's
numbered framework: L_KD is its Eq. (1) with D = L1; L_G is its Eq. (2) with L_Cls = L_oh (+ L_ie), L_Adv, L_Rep = L_a.
  L_oh    CE(T(x), argmax T(x)), batch mean (distillation.py:54,56)                   -> loss_one_hot()
  L_ie    sum_k p_k log10 p_k, p = batch-mean softmax T(x) (:57-58)                    -> loss_information_entropy()
  L_a     -mean|f_T(x)|, f_T the pooled penultimate feature (:53,55)                   -> loss_activation()
  L_adv   1 - clamp(J(S(x), T(x)), 0, 1), clamped reverse-KL "JS", T=3 (utils/aux.py:70-85) -> loss_adv()
  L_G     oh L_oh + ie L_ie + a L_a + L_adv, on B novel images (:59-68)               -> loss_generator()
  L_KD    L1(S(x), T(x)), x = cat(B novel, B_M memory), mean over (B+B_M) K (:33-41)    -> loss_kd()
  z-step  one Adam step on z_mem minimising ie L_ie + oh L_oh + mse(var z, 1) + mse(mean z, 0) (:15-30, :98-115)
                                                                          -> memory_z_step(), loss_z_moments()
  L_V     L1(M(E(x)), x) + L1(T(M(E(x))), T(x)) + 1e-5 KL(q(z|x) || N(0, I)),
          x = cat(B_V novel, B_M memory); the run's first 4 VAE updates use x = B_V novel only (:72-147) -> loss_vae()
  reparameterisation z = mu + eps exp(lv / 2) (networks/generator.py:128-140)          -> reparameterise()

Defaults: official main.py argparse (README runs `python main.py`): ResNet-34 -> ResNet-18, 400 epochs x 36 iterations
(hard-coded), batch 1024, latent 1000, G Adam 0.02, M and E Adam 5e-4 (lr_G/40), z-step Adam 0.02, student SGD 0.1
momentum 0.9 wd 5e-4, cosine T_max 400 (hard-coded, stepped after each epoch), oh/ie/a = 1/5/0.1, seed 1. CIFAR-10
and CIFAR-100 share them (k = 10 / 20 as TA-DFKD's tables). UNOFFICIAL (spec 9): tinyimagenet resnet34_tiny ->
resnet18_tiny at 64x64 (the official ResNet cannot take 64x64, spec 7.8); mnist lenet5 -> lenet5_half with student
Adam 2e-3 (official: Adam at lr_S 0.1, spec 7.12). Digits (ours, scaled down): see PAPER_DEFAULTS['digits'].

Differences from the official code (spec/pre_dfkd.md 7; numbers there)
  - Kept, each behind a flag so it can be ablated (PAPER-SILENT whether intended, spec 9): the VAE step's z-step
    gradient also lands in M and is applied with L_V (7.1, `--vae-z-grad 1`; 0 = M descends L_V alone); the student
    rehearses M in eval mode, the VAE self-replays M in train mode (7.3, `--mem-eval 1`; 0 = train mode for both).
  - Kept: T_max 400 independent of --epochs (7.5): 200 epochs end at half the lr, 500 anneal to 0 at 400 and rise
    again (PyTorch's periodic cosine); pass --t-max = --epochs for a full anneal. F.normalize along the image
    height in E (7.10; `--encoder-norm 0` drops it). The untrained M is rehearsed first (7.4: the loop order).
    S in train mode in the G step (7.13: its BN running stats see G's batch).
  - Fixed: the novel images are detached before L_KD (7.2: official backprops L_KD into G, whose grads are cleared
    unused: compute only). L_ie's log10 is clamped at 1e-30 (official NaN on an underflowed class; identical where
    finite). Teacher frozen (official: T's grads pile up unused, 7.14), S frozen in the G step (its official grads
    are zeroed before use): same numbers. The first VAE branch runs T on the B_V images it uses (official: on all
    B, then slices; eval-mode T gives the same values).
  - Fixed: Tiny-ImageNet runs (7.8, above); MNIST student lr (7.12, above); seed settable (7.7, default 1 as
    official); the student, all networks, optimisers and RNG are checkpointed, metrics.jsonl/summary.json written
    (7.6: official keeps nothing). One device, no nn.DataParallel (7.13: official BN stats per GPU chunk).
    Accuracy in percent on unshuffled test batches of 512 (official: a fraction, shuffled batches of 1024; same
    value). fp16 only: the z-step's gradient is loss-scaled (Adam's step is scale-invariant up to eps).
  - Paper vs code ([2nd], spec 1): the paper's reconstruction uses the teacher's responses; the code (and we) add
    pixel L1 (a feature target exists only as commented-out lines). The paper's 2.1 MB memory footprint does not
    match the code's 12.7 M-parameter VAE (~51 MB in fp32); we follow the code.

Run
  python pre_dfkd.py                                                        # digits, teachers/digits_wrn16_2.pt
  python pre_dfkd.py --dataset cifar100 --teacher teachers/cifar100_resnet34.pt --amp bf16 --channels-last  # README
  python pre_dfkd.py --dataset cifar10 --teacher CIFAR10_9546.pt --epochs 200   # as TA-DFKD trains (T_max stays 400)
  python pre_dfkd.py --dataset tinyimagenet --teacher TINY_7550.pt --epochs 500  # Table A1, UNOFFICIAL nets
  python pre_dfkd.py --out runs/x --resume                                  # continue an interrupted run
Expected (TA-DFKD paper, R34 -> R18, acc_last[k] +- std / acc_max over 4 runs; ours: blank until run on a GPU)
  Table 3 T1: CIFAR-10 (95.46) 89.22 +- 4.9 / 94.10; CIFAR-100 (77.98) 76.13 +- 0.2 / 76.57. Table A1 Tiny T1
  (75.50): 46.45 +- 9.78 / 53.16.
  Digits (ours, CPU 1 thread, teacher WRN-16-2 99.63 % -> WRN-16-1, default flags): final 99.07 / 99.07 / 99.26 %
  (seeds 1-3), acc_last[5] 93.78 / 97.00 / 90.26 %, acc_max 99.07 / 99.07 / 99.44 % (test-selected); 111-116 s
  CPU time each. `python pre_dfkd.py` on an idle 2-core CPU (2 threads): final 99.07 %, acc_last[5] 96.15 %, 63 s.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm

from common import (DATASETS, MODELS, DAFLGenerator, MetricLogger, Normalize, acc_last_k, autocast, build_model,
                    check_amp, check_finite, check_student, check_teacher_data, check_positive, fill_defaults,
                    finish_run_args, evaluate, fail, finish_run, get_rng_state, load_data, load_teacher, pick_device,
                    prepare_run_dir, save_checkpoint, save_config, save_sample_grid, seed_everything, set_rng_state,
                    to_floats, one_line_errors)

_CIFAR = dict(student="resnet18", epochs=400, iters_per_epoch=36, batch_size=1024, mem_batch_size=128, vae_novel=512,
              nz=1000, ngf=64, lr_g=0.02, lr_vae=5e-4, lr_z=0.02, lr=0.1, student_optimizer="sgd", weight_decay=5e-4,
              t_max=400, k=20, save_every=1)  # save_every 1: an epoch (~0.7 M teacher passes) is minutes on a GPU
PAPER_DEFAULTS = {
    "cifar100": _CIFAR,                                           # README: python main.py
    "cifar10": dict(_CIFAR, k=10),                                # main.py --dataset cifar10 (no command shipped)
    "folder": dict(_CIFAR, k=10),                                 # PAPER-SILENT: CIFAR-10's
    "tinyimagenet": dict(_CIFAR, student="resnet18_tiny"),        # UNOFFICIAL (spec 9): official crashes at 64 px
    # UNOFFICIAL (spec 9): DAFL's MNIST student Adam 2e-3; official Adam at lr_S 0.1 (spec 7.12)
    "mnist": dict(_CIFAR, student="lenet5_half", lr=2e-3, student_optimizer="adam", weight_decay=0.0, k=10),
    # Ours, for 2 CPU cores in < 3 min. Kept: the loop (1 G : 10 S : 4 VAE steps per iteration, B_M = B/8,
    # B_V = B/2), every loss weight and learning rate, the optimisers, latent 1000, and T_max = the run (the
    # schedule's shape, not the literal 400). Scaled: batch 1024 -> 64 (memory 8, VAE novel 32), ngf 64 -> 32
    # (half the widths of G, M and E, as our other digits generators), 400 x 36 -> 6 x 10 = 60 iterations (600
    # student steps). Measured (1 thread): 5 x 10 gave 98.70 / 98.33 % (seeds 1, 2) but one seed was only at 93 %
    # after 4 of 5 epochs, so one epoch more; 10 x 20 (the spec's example) costs ~4x the time.
    "digits": dict(student="wrn16_1", epochs=6, iters_per_epoch=10, batch_size=64, mem_batch_size=8, vae_novel=32,
                   nz=1000, ngf=32, lr_g=0.02, lr_vae=5e-4, lr_z=0.02, lr=0.1, student_optimizer="sgd",
                   weight_decay=5e-4, k=5, save_every=1),  # t_max: --epochs
}


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description="PRE-DFKD (Binici et al., AAAI 2022): data-free KD with generative "
                                "pseudo replay. Defaults per dataset = official code (None = from PAPER_DEFAULTS)."))
    a = p.add_argument
    a("--dataset", default="digits", choices=DATASETS, help="real test data the student is scored on (default digits)")
    a("--data-root", default="data", help="torchvision root / folder dataset root")
    a("--teacher", default=None, help="teacher checkpoint (default: common.default_teacher_path(dataset))")
    a("--student", default=None, choices=list(MODELS), help="student arch (official: ResNet-18; digits wrn16_1)")
    a("--out", default=None, help="run directory (default runs/pre_dfkd-<dataset>-<teacher stem>-s<seed>)")
    a("--seed", type=int, default=1, help="seed (official: 1, hard-coded at import)")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--epochs", type=int, default=None, help="epochs (official --n_epochs 400; TA-DFKD: 200 C10, 500 C100/Tiny)")
    a("--iters-per-epoch", type=int, default=None, help="iterations per epoch (official: 36, hard-coded)")
    a("--g-iters", type=int, default=1, help="novel-generator steps per iteration, first (official --gen_iter 1)")
    a("--kd-iters", type=int, default=10, help="student steps per iteration, after G (official --kd_iter 10)")
    a("--vae-iters", type=int, default=4, help="a VAE step after each of the first N student steps (official 4)")
    a("--batch-size", type=int, default=None, help="B: novel images per G and per S step (official 1024)")
    a("--mem-batch-size", type=int, default=None, help="B_M: memory samples per S and VAE step (official B//8 = 128)")
    a("--vae-novel", type=int, default=None, help="B_V: novel images per VAE step (official B//2 = 512)")
    a("--nz", type=int, default=None, help="latent size of G, M and E, z ~ N(0, I) (official --latent_dim 1000)")
    a("--ngf", type=int, default=None, help="width of G, M (2 ngf, ngf channels) and E (ngf, 2 ngf) (official 64)")
    a("--lr-g", type=float, default=None, help="novel generator Adam lr (official --lr_G 0.02, constant)")
    a("--lr-vae", type=float, default=None, help="M and E Adam lr (official lr_G / 40 = 5e-4)")
    a("--lr-z", type=float, default=None, help="z-step Adam lr, a fresh Adam per call (official lr_G = 0.02)")
    a("--z-steps", type=int, default=1, help="Adam steps per memory-sample inference (official range(1))")
    a("--lr", type=float, default=None, help="student lr (official --lr_S 0.1; mnist ours 2e-3, UNOFFICIAL)")
    a("--student-optimizer", choices=["sgd", "adam"], default=None, help="official: SGD on CIFAR/Tiny, Adam on MNIST")
    a("--momentum", type=float, default=0.9, help="student SGD momentum (official 0.9, no Nesterov)")
    a("--weight-decay", type=float, default=None, help="student weight decay (official 5e-4; Adam on MNIST: 0)")
    a("--t-max", type=int, default=None, help="cosine T_max in epochs, independent of --epochs (official: 400, "
      "hard-coded; the lr rises again past it; digits: --epochs)")
    a("--oh", type=float, default=1.0, help="weight of L_oh in the G step and z-steps (official --oh 1)")
    a("--ie", type=float, default=5.0, help="weight of L_ie in the G step and z-steps (official --ie 5)")
    a("--a", type=float, default=0.1, help="weight of L_a in the G step (official --a 0.1)")
    a("--temperature", type=float, default=3.0, help="softmax temperature of the JS term (official 3)")
    a("--kld-weight", type=float, default=1e-5, help="KL weight in L_V (official 1e-5)")
    a("--vae-z-grad", type=int, choices=[0, 1], default=1, help="OFFICIAL 1: the VAE step's z-step gradient also "
      "updates M (spec 7.1); 0: M descends L_V alone. PAPER-SILENT")
    a("--mem-eval", type=int, choices=[0, 1], default=1, help="OFFICIAL 1: the student rehearses M in eval mode "
      "(running BN stats, spec 7.3); 0: train mode. PAPER-SILENT")
    a("--encoder-norm", type=int, choices=[0, 1], default=1, help="OFFICIAL 1: E first L2-normalises its input "
      "along the image height (spec 7.10, probably unintended); 0: no normalisation. PAPER-SILENT")
    a("--k", type=int, default=None, help="acc_last[k] window (TA-DFKD: 10 CIFAR-10, 20 otherwise)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    a("--amp", choices=["bf16", "fp16", "off"], default="off", help="autocast (losses, BN stats, softmax in fp32)")
    a("--channels-last", action="store_true", help="channels_last memory format for every network")
    a("--deterministic", action="store_true", help="cudnn deterministic, benchmark off (as the official script)")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (official: every epoch)")
    a("--save-every", type=int, default=None, help="checkpoint every N epochs and at the end (default 1)")
    a("--save-images", type=int, choices=[0, 1], default=None, help="write samples_<epoch>.png (novel) and "
      "replay_<epoch>.png (memory) (default: digits 1)")
    a("--stop-after", type=int, default=None, help="stop after epoch N as if interrupted (for testing --resume)")
    args = p.parse_args(argv)
    fill_defaults(args, PAPER_DEFAULTS[args.dataset])
    args.t_max = args.epochs if args.t_max is None else args.t_max  # digits (ours): the cosine's shape over the run
    args.save_images = int(args.dataset == "digits") if args.save_images is None else args.save_images
    check_positive(args, "epochs", "iters_per_epoch", "g_iters", "kd_iters", "batch_size", "mem_batch_size",
                   "vae_novel", "nz", "ngf", "z_steps", "t_max", "eval_every", "save_every", "k")
    if not 0 <= args.vae_iters <= args.kd_iters:
        fail(f"--vae-iters must lie in 0..--kd-iters ({args.kd_iters}), got {args.vae_iters}; the official uses 4")
    if args.batch_size < 2 or args.mem_batch_size < 2 or not 2 <= args.vae_novel <= args.batch_size:
        fail("--batch-size and --mem-batch-size must be >= 2 (BatchNorm, batch variance of z) and --vae-novel in "
             f"2..--batch-size; got {args.batch_size}, {args.mem_batch_size}, {args.vae_novel}")
    if min(args.lr_g, args.lr_vae, args.lr_z, args.lr, args.temperature) <= 0 or args.momentum < 0:
        fail("--lr-g, --lr-vae, --lr-z, --lr and --temperature must be > 0 and --momentum >= 0; pass positive values")
    weights = (args.oh, args.ie, args.a, args.kld_weight, args.weight_decay)
    if min(weights) < 0 or not all(map(math.isfinite, weights)):
        fail("--oh, --ie, --a, --kld-weight and --weight-decay must be finite and >= 0; e.g. --oh 1 --ie 5 --a 0.1")
    return finish_run_args(args, "pre_dfkd")


# ---------------------------------------------------------------------------------------------- networks
def init_uniform(net):
    """OFFICIAL weights_init (networks/generator.py:32-39): Conv and Linear weights U(-0.08, 0.08), biases 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.uniform_(m.weight, -0.08, 0.08)
            nn.init.zeros_(m.bias)
    return net


def novel_generator(nz=1000, ngf=64, img_size=32, nc=3):
    """G (`Generator`, generator.py:5-50) = common.DAFLGenerator(bn_eps=0.8) with spectral norm on its three convs
    (one power iteration per train-mode forward; G is never put in eval mode) and the uniform init. State-dict keys
    are the official ones up to DAFLGenerator's layer names (spec 4.5). 8,423,939 parameters at 32x32x3."""
    g = init_uniform(DAFLGenerator(nz, ngf, img_size, nc, bn_eps=0.8))
    for seq, i in ((g.conv_blocks1, 0), (g.conv_blocks2, 0), (g.conv_blocks2, 3)):
        seq[i] = spectral_norm(seq[i])
    return g


def memory_generator(nz=1000, ngf=64, img_size=32, nc=3):
    """M (`MemoryGenerator`, generator.py:52-96), the VAE decoder: DAFLGenerator(bn_eps=0.8), uniform init."""
    return init_uniform(DAFLGenerator(nz, ngf, img_size, nc, bn_eps=0.8))


def reparameterise(mu, log_var):
    """z = mu + eps * exp(log_var / 2), eps ~ N(0, I) (generator.py:128-140)."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)


class Encoder(nn.Module):
    """E (`Encoder`, generator.py:98-140): x (B, C, H, W), H divisible by 8 -> (z, mu, log_var), each (B, nz).
    ngf=64 gives the official 64/128 widths: 4,321,872 parameters at 32x32x3 (spec 4.3)."""

    def __init__(self, nz=1000, ngf=64, img_size=32, nc=3, normalize_height=True):
        super().__init__()
        self.normalize_height = normalize_height
        self.conv_blocks0 = nn.Sequential(nn.Conv2d(nc, ngf, 3, 1, 1), nn.BatchNorm2d(ngf, 0.8), nn.LeakyReLU(0.2))
        self.conv_blocks1 = nn.Sequential(nn.Conv2d(ngf, 2 * ngf, 3, 1, 1), nn.BatchNorm2d(2 * ngf, 0.8),
                                          nn.LeakyReLU(0.2))
        self.conv_blocks2 = nn.Sequential(nn.Conv2d(2 * ngf, 2 * ngf, 3, 2, 1), nn.BatchNorm2d(2 * ngf))
        feat = 2 * ngf * (img_size // 8) ** 2
        self.fc_mu, self.fc_var = nn.Linear(feat, nz), nn.Linear(feat, nz)
        init_uniform(self)

    def forward(self, x):
        out = F.normalize(x, p=2, dim=2) if self.normalize_height else x  # OFFICIAL: L2 along the HEIGHT (7.10)
        out = F.interpolate(self.conv_blocks1(self.conv_blocks0(out)), scale_factor=0.5)   # (B, 2ngf, H/2, W/2)
        out = F.interpolate(self.conv_blocks2(out), scale_factor=0.5).flatten(1)           # (B, 2ngf (H/8)^2)
        mu, log_var = self.fc_mu(out), self.fc_var(out)
        return reparameterise(mu, log_var), mu, log_var


# ---------------------------------------------------------------------------------------------- losses (fp32)
def loss_one_hot(logits_t):
    """L_oh (distillation.py:54,56): CrossEntropyLoss (mean) of T against its own argmax; the label has no grad."""
    logits_t = logits_t.float()
    return F.cross_entropy(logits_t, logits_t.detach().argmax(1))


def loss_information_entropy(logits_t):
    """L_ie (:57-58): sum_k p_k log10 p_k, p the batch-mean softmax (K,): minus the base-10 entropy of the batch's
    mean prediction, minimum -log10 K when classes are balanced. Clamp: only guards log10(0) (official NaN)."""
    p = logits_t.float().softmax(1).mean(0)
    return (p * torch.log10(p.clamp_min(1e-30))).sum()


def loss_activation(feat_t):
    """L_a (:53,55): -mean |f_T| over all B*D entries of T's pooled penultimate feature (B, D)."""
    return -feat_t.float().abs().mean()


def loss_adv(logits_s, logits_t, temperature=3.0):
    """L_adv (utils/aux.py:70-85, copied verbatim by TA-DFKD): p, q = softmax(z/T); m = (p+q)/2 from the unclamped
    p, q; all three clamped to [0.01, 0.99] without renormalising; J = 1/2 KL(m||p) + 1/2 KL(m||q) with
    nn.KLDivLoss's 'mean' reduction, i.e. averaged over B*K entries; L_adv = 1 - clamp(J, 0, 1). Symmetric."""
    p = F.softmax(logits_t.float() / temperature, 1)
    q = F.softmax(logits_s.float() / temperature, 1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * (m * (m.log() - p.log())).mean() + 0.5 * (m * (m.log() - q.log())).mean()
    return 1.0 - js.clamp(0.0, 1.0)


def loss_generator(l_oh, l_ie, l_a, l_adv, oh, ie, a):
    """L_G = oh L_oh + ie L_ie + a L_a + L_adv (distillation.py:59,64; adversarial weight 1, implicit)."""
    return oh * l_oh + ie * l_ie + a * l_a + l_adv


def loss_kd(logits_s, logits_t):
    """TA-DFKD Eq. (1), L_KD (:36-41): F.l1_loss(S(x), T(x)), the mean over all (B + B_M) * K logits."""
    return F.l1_loss(logits_s.float(), logits_t.float())


def loss_z_moments(z):
    """z-step prior (:19-27, misnamed `loss_kld` there): mse(var_b(z), 1) + mse(mean_b(z), 0) over the nz dims,
    var the UNBIASED batch variance (torch.var default, misnamed `log_var`)."""
    z = z.float()
    return F.mse_loss(z.var(0), torch.ones_like(z[0])) + F.mse_loss(z.mean(0), torch.zeros_like(z[0]))


def loss_vae(rec, x, logits_rec, logits_x, mu, log_var, kld_weight=1e-5):
    """L_V (:79-95, :119-139): pixel L1 (mean over N*C*H*W) + teacher-logit L1 (mean over N*K) + kld_weight * KL,
    KL(N(mu, exp lv) || N(0, I)) = mean over samples of -1/2 sum_j (1 + lv_j - mu_j^2 - exp lv_j) (:139). The logit
    target T(x) is detached; T(rec) back-propagates through T into M and E. -> (L_V, pixel, logit, KL)."""
    mu, log_var = mu.float(), log_var.float()
    kld = (-0.5 * (1 + log_var - mu ** 2 - log_var.exp()).sum(1)).mean()
    pix, logit = F.l1_loss(rec.float(), x.float()), F.l1_loss(logits_rec.float(), logits_x.float().detach())
    return pix + logit + kld_weight * kld, pix, logit, kld


def class_entropy(logits_t):
    """Diagnostic: entropy (nats) of the histogram of T's argmax classes; ln K = balanced, 0 = one class."""
    hist = F.one_hot(logits_t.argmax(1), logits_t.shape[1]).float().mean(0)
    return -torch.special.xlogy(hist, hist).sum()


# ---------------------------------------------------------------------------------------------- steps
def cl(x, args):
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def memory_z_step(memory, teacher, args, device, scaler, into_memory=False):
    """Class-balanced memory-sample inference (distillation.py:15-30, :98-115): z_mem ~ N(0, I) (B_M, nz), a fresh
    Adam([z_mem], lr_z), --z-steps (official 1) steps on ie L_ie + oh L_oh (of T(M(z_mem))) + loss_z_moments(z_mem).
    A fresh Adam's first step moves every coordinate by ~ -lr_z sign(grad). M keeps its current mode. into_memory:
    OFFICIAL coupling (spec 1): backward() also leaves the loss's gradient in M's .grad. -> (z_mem, loss)."""
    z = torch.randn(args.mem_batch_size, args.nz, device=device, requires_grad=True)
    opt_z = torch.optim.Adam([z], lr=args.lr_z)
    for _ in range(args.z_steps):
        with autocast(device, args.amp):
            logits_t = teacher(cl(memory(z), args))
        loss = args.ie * loss_information_entropy(logits_t) + args.oh * loss_one_hot(logits_t) + loss_z_moments(z)
        opt_z.zero_grad(set_to_none=True)
        if into_memory:
            scaler.scale(loss).backward()  # fp16: z's grad is scaled too; Adam is scale-invariant (up to eps)
        else:
            z.grad, = torch.autograd.grad(scaler.scale(loss), z)
        opt_z.step()
    return z.detach(), loss.detach()


def generator_step(generator, student, teacher, opt_g, scaler, args, device, acc, z=None):
    """L_G (train_novel_generator, distillation.py:45-70): x = G(z) (B, C, H, W), G in train mode; the class prior
    on T(x); L_adv on S(x) (S in train mode, as official: its BN running stats see this batch) against T(x).detach(),
    so G gets L_adv's gradient through S only. One Adam step on G."""
    z = torch.randn(args.batch_size, args.nz, device=device) if z is None else z
    student.requires_grad_(False)
    with autocast(device, args.amp):
        x = cl(generator(z), args)
        logits_t, feat_t = teacher(x, return_features=True)
        logits_s = student(x)
    l_oh, l_ie, l_a = loss_one_hot(logits_t), loss_information_entropy(logits_t), loss_activation(feat_t)
    l_adv = loss_adv(logits_s, logits_t.detach(), args.temperature)
    loss = loss_generator(l_oh, l_ie, l_a, l_adv, args.oh, args.ie, args.a)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_g)
    scaler.update()
    student.requires_grad_(True)
    for name, v in (("oh", l_oh), ("ie", l_ie), ("a", l_a), ("adv", l_adv), ("g", loss)):
        acc[f"loss/{name}"] += v.detach()
    acc["n_g"] += 1


def student_step(student, generator, memory, teacher, opt_s, scaler, args, device, acc):
    """L_KD with generative pseudo replay (distill_knowledge, distillation.py:8-43; main.py:101-102): B novel images
    x_N = G(z) (G in train mode: BN batch stats and a power iteration, as official; detached, see header), B_M memory
    images from M (eval mode with --mem-eval 1) after a z-step; one optimiser step on L1(S(x), T(x)) over
    x = cat(x_N, x_M). -> (x (B + B_M, C, H, W), T(x) (B + B_M, K)), both detached."""
    b = args.batch_size
    with torch.no_grad(), autocast(device, args.amp):
        x_new = cl(generator(torch.randn(b, args.nz, device=device)), args)
    memory.train(not args.mem_eval)
    z_mem, loss_z = memory_z_step(memory, teacher, args, device, scaler)
    with torch.no_grad(), autocast(device, args.amp):
        x = torch.cat([x_new, cl(memory(z_mem), args)])
        logits_t = teacher(x)
    with autocast(device, args.amp):
        loss = loss_kd(student(x), logits_t)
    opt_s.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_s)
    scaler.update()
    acc["loss/kd"] += loss.detach()
    acc["loss/z"] += loss_z
    acc["new/class_entropy"] += class_entropy(logits_t[:b])
    acc["replay/class_entropy"] += class_entropy(logits_t[b:])
    acc["n_s"] += 1
    return x, logits_t


def vae_step(memory, encoder, teacher, opt_m, opt_e, scaler, x_new, first, args, device, acc):
    """L_V (train_memory_generator, distillation.py:72-147), M and E in train mode. first (the run's first
    iteration): x = x_N[:B_V]. Else a z-step with M in train mode (its gradient kept in M with --vae-z-grad 1),
    x = cat(x_N[:B_V], M(z_mem) in train mode). Then E(x) -> z, M(z) = rec, L_V; one Adam step on M and on E."""
    memory.train(), encoder.train()
    opt_m.zero_grad(set_to_none=True)
    opt_e.zero_grad(set_to_none=True)
    x = x_new[:args.vae_novel]
    if not first:
        z_mem, _ = memory_z_step(memory, teacher, args, device, scaler, into_memory=bool(args.vae_z_grad))
        with torch.no_grad(), autocast(device, args.amp):
            x = torch.cat([x, cl(memory(z_mem), args)])
    with autocast(device, args.amp):
        with torch.no_grad():
            logits_x = teacher(x)
        z_enc, mu, log_var = encoder(x)
        rec = cl(memory(z_enc), args)
        logits_rec = teacher(rec)
    loss, pix, logit, kld = loss_vae(rec, x, logits_rec, logits_x, mu, log_var, args.kld_weight)
    scaler.scale(loss).backward()
    scaler.step(opt_m)
    scaler.step(opt_e)
    scaler.update()
    for name, v in (("vae", loss), ("vae_pix", pix), ("vae_logit", logit), ("vae_kld", kld)):
        acc[f"loss/{name}"] += v.detach()
    acc["n_v"] += 1


def student_lr(epoch, lr, t_max):
    """OFFICIAL (main.py:70,114): CosineAnnealingLR(T_max, eta_min 0) stepped after each epoch, so 0-based epoch e
    trains with lr (1 + cos(pi e / T_max)) / 2; past T_max the cosine rises again (PyTorch's closed form)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / t_max))


# ---------------------------------------------------------------------------------------------- training
def train(args, teacher, teacher_acc, data, device, ck=None):
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    normalize = Normalize(data.mean, data.std).to(device)  # real test images only: G's and M's output is standardised
    shape = (args.nz, args.ngf, data.image_size, data.in_channels)
    student = build_model(args.student, data.num_classes, data.in_channels).to(device, memory_format=fmt)
    generator, memory = (net(*shape).to(device, memory_format=fmt) for net in (novel_generator, memory_generator))
    encoder = Encoder(*shape, normalize_height=bool(args.encoder_norm)).to(device, memory_format=fmt)
    teacher = teacher.to(memory_format=fmt)
    if args.student_optimizer == "adam":  # OFFICIAL: MNIST
        opt_s = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt_s = torch.optim.SGD(student.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g)
    opt_m, opt_e = (torch.optim.Adam(net.parameters(), lr=args.lr_vae) for net in (memory, encoder))
    scalers = {k: torch.amp.GradScaler("cuda", enabled=args.amp == "fp16") for k in ("g", "s", "v")}
    nets = {"student": student, "generator": generator, "memory": memory, "encoder": encoder, "opt_s": opt_s,
            "opt_g": opt_g, "opt_m": opt_m, "opt_e": opt_e, **{f"scaler_{k}": v for k, v in scalers.items()}}
    start_epoch, step, wall_before = 0, 0, 0.0
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if ck is not None:
        for key, obj in nets.items():
            obj.load_state_dict(ck[key])
        start_epoch, step, wall_before = ck["epoch"], ck["step"], ck["wall_s"]
        set_rng_state(ck["rng"])
        print(f"resumed {ckpt_path} at epoch {start_epoch}", flush=True)
    logger = MetricLogger(args.out, args.epochs, start_epoch, teacher_acc=teacher_acc)
    logger.history = list(ck["history"]) if ck is not None else logger.history
    keys = ("loss/oh", "loss/ie", "loss/a", "loss/adv", "loss/g", "loss/kd", "loss/z", "loss/vae", "loss/vae_pix",
            "loss/vae_logit", "loss/vae_kld", "new/class_entropy", "replay/class_entropy")
    t0 = time.time()
    for epoch in range(start_epoch, args.epochs):
        for group in opt_s.param_groups:
            group["lr"] = student_lr(epoch, args.lr, args.t_max)
        teacher.eval(), student.train(), generator.train()   # OFFICIAL: G and E are never put in eval mode
        acc = {**{k: torch.zeros((), device=device) for k in keys}, "n_g": 0, "n_s": 0, "n_v": 0}  # ints: no sync
        t_epoch = time.time()
        for i in range(args.iters_per_epoch):
            for _ in range(args.g_iters):
                generator_step(generator, student, teacher, opt_g, scalers["g"], args, device, acc)
            for d in range(args.kd_iters):
                x, logits_t = student_step(student, generator, memory, teacher, opt_s, scalers["s"], args, device, acc)
                if d < args.vae_iters:  # OFFICIAL: the first VAE branch is epoch 0, iteration 0 (its 4 steps)
                    vae_step(memory, encoder, teacher, opt_m, opt_e, scalers["v"], x[:args.batch_size],
                             epoch == 0 and i == 0, args, device, acc)
            step += 1
        done = epoch + 1
        if done % args.eval_every == 0 or done == args.epochs or done == args.stop_after:
            n_img = (acc["n_g"] + acc["n_s"]) * args.batch_size + (acc["n_s"] + acc["n_v"]) * args.mem_batch_size
            means = {k: v / max(acc["n_v" if k.startswith("loss/vae") else "n_g" if k in keys[:5] else "n_s"], 1)
                     for k, v in acc.items() if torch.is_tensor(v)}
            record = {"epoch": done, "step": step, **to_floats(means)}  # SYNC: once per evaluation
            check_finite(record, step)
            record["acc"] = evaluate(student, data.test, normalize, device, args.amp, args.channels_last)
            accs = [r["acc"] for r in logger.history] + [record["acc"]]
            record.update({"acc_max": max(accs), "acc_last_k": acc_last_k(logger.history + [record], args.k),
                           "acc_mean": sum(accs) / len(accs), "lr_s": opt_s.param_groups[0]["lr"],
                           "img_per_s": n_img / (time.time() - t_epoch), "elapsed_s": wall_before + time.time() - t0})
            logger.log(record)
            if args.save_images:  # SYNC: the last student batch, back in [0, 1] pixels, rows = T's classes
                b = args.batch_size
                for name, sl in (("samples", slice(0, min(b, 64))), ("replay", slice(b, b + 64))):
                    save_sample_grid(os.path.join(args.out, f"{name}_{done}.png"),
                                     normalize.inverse(x[sl].float()).clamp(0, 1), logits_t[sl].argmax(1))
        if done % args.save_every == 0 or done == args.epochs or done == args.stop_after:
            save_checkpoint(ckpt_path, {**{k: v.state_dict() for k, v in nets.items()}, "epoch": done, "step": step,
                                        "wall_s": wall_before + time.time() - t0, "rng": get_rng_state(),
                                        "history": logger.history, "config": dict(vars(args))})
        if done == args.stop_after:
            print(f"stopped after epoch {done}; continue with --resume", flush=True)
            return None
    return finish_run(args.out, "pre_dfkd", args.dataset, teacher_acc, logger.history, args.k, args.epochs,
                      wall_before + time.time() - t0, args.seed, student=args.student, teacher=args.teacher)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    check_amp(args.amp, device)
    teacher, meta = load_teacher(args.teacher, args.dataset, device)
    data = load_data(args.dataset, args.data_root, 256, 512, meta.get("image_size"), meta.get("in_channels"),
                     meta.get("mean"), meta.get("std"), device)
    check_teacher_data(meta, data)
    check_student(args.student, data)
    if data.image_size % 8:
        fail(f"PRE-DFKD's encoder halves the image three times, so the input size must be a multiple of 8; got "
             f"{data.image_size}")
    # on --resume: the checkpoint, verified, of the same experiment (only its length and bookkeeping may change)
    ck = prepare_run_dir(args.out, args.resume, args)
    seed_everything(args.seed, args.deterministic)
    save_config(args.out, args, device)
    teacher_acc = meta.get("test_acc") or evaluate(teacher, data.test, Normalize(data.mean, data.std).to(device),
                                                   device, args.amp, args.channels_last)
    print(f"teacher {meta['arch']} {teacher_acc:.2f}% on {args.dataset}; student {args.student}; {args.epochs} epochs "
          f"x {args.iters_per_epoch} x (G + {args.kd_iters} S + {args.vae_iters} VAE), B {args.batch_size} + "
          f"{args.mem_batch_size} replayed, on {device}", flush=True)
    return train(args, teacher, teacher_acc, data, device, ck)


if __name__ == "__main__":
    main()
