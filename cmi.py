"""CMI: Contrastive Model Inversion for Data-Free Knowledge Distillation.

Gongfan Fang, Jie Song, Xinchao Wang, Chengchao Shen, Xingen Wang, Mingli Song. IJCAI 2021, arXiv 2105.08584.
Official code: zju-vipa/CMI @9e79fa9 (= zju-vipa/DataFree), `datafree_kd.py`, `datafree/synthesis/contrastive.py`.

Model inversion plus a contrastive term. Each round a freshly initialised generator and its latent z are optimised
for g_steps: BN statistics of the teacher's training data, confident target classes, student-teacher agreement to
break, and an InfoNCE loss (through a projection head) that pulls each image's local view to its own global view and
away from other images and from a feature bank of all earlier rounds, so new images differ from old ones. The best
iteration's images join an in-memory pool; the student then takes kd_steps KD steps over the whole pool.

Equations (paper text was not available when spec/cmi.md was written: named by term, not number; spec/cmi.md 1):
  Method: L_bn   = sum_l ||var_l(x_g) - rv_l||2 + ||mu_l(x_g) - rm_l||2          -> common.bns_loss()
  Method: L_oh   = CE(T(x_g), y), y sorted random classes                          -> loss_oh()
  Method: L_adv  = -(1/B) sum_i m_i KL(p_T_i || p_S_i), m_i = [argmax S = argmax T] -> loss_adv()
  Method: L_inv  = bn*L_bn + oh*L_oh + adv*L_adv                                    -> generator_step()
  Method: f(x)   = concat_l GAP(input of BN l)(x), h(v) = normalize(MLP(v))          -> FeatureHook, MLPHead
  Method: L_cr   = InfoNCE(h(f(x_l)), stopgrad h(f(x_g))) over batch + bank, tau   -> loss_cr()
  Method: L      = cr*L_cr + L_inv, minimised over generator, z and head             -> generator_step()
  Method: L_KD   = T^2 KL(sigma(t/T) || sigma(s/T)), batch mean, T = 20             -> loss_kd(), student_step()
In the common framework of the TA-DFKD paper (Shin & Choi, AAAI 2024, arXiv 2402.12406, Table 1), the
student minimises Eq. (1) L_KD = E_z[D(T(G(z)), S(G(z)))] and the generator Eq. (2)
L_G = alpha L_Cls + beta L_Adv + gamma L_Rep. CMI is Eq. (1) with D = T^2 KL at T = 20, and
Eq. (2) = L_inv (L_Cls = L_oh, L_Adv = L_adv, L_Rep = L_bn) plus its own contrastive term cr*L_cr.

Defaults: the official CIFAR-10 wrn40_2 -> wrn16_1 scratch script (scripts/cmi/scratch_cmi..., README: 88.82 %; the
90.01 % of Table 1 also needs a pre-inverted 50k set, not shipped). CIFAR-100, Tiny-ImageNet, MNIST, folder and every
other pair have no official settings: UNOFFICIAL, the same column (spec/cmi.md 3). Digits: see PAPER_DEFAULTS.

Differences from the official code (spec/cmi.md 7):
  - Images live in a uint8 tensor on the device, not PNG files; values are truncated to uint8 as the PNG path does.
    CIFAR-10 at paper scale: 200 rounds x 256 = 51,200 images x 3 KB = 157 MB (vs 629 MB as float32); the feature
    bank is 40,960 x 2D float32 = 886 MB for wrn40_2 (D = 2704), 168 MB for resnet34 (D = 512). checkpoint.pt holds
    both (~1 GB for wrn40_2 at the end).
  - Full-bank NaN fixed (contrastive.py MemoryBank.get_data): when n_updates == bank_size the official code samples
    zero cached rows: that round's loss is NaN at every iteration, never beats best_cost, so the round keeps the
    reset generator's iteration-0 images and features. Gradients stay finite, the head does not become NaN, the next
    round is finite: one round (160, 0-indexed) of CIFAR-10's 200, 256 of 51,200 images. We sample from the
    min(n_updates, bank_size) rows written, and loss_cr() takes the second mean only when cached rows are present.
  - Augmentation is batched on the device: RandomResizedCrop (local view) by affine_grid/grid_sample with the size
    clamped to the image instead of kornia's rejection sampling; crop padding image_size/8 (4 at 32 px).
  - Best-iteration selection with torch.where on device tensors (the official loss.item() syncs every iteration).
  - Student/teacher parameters are frozen during synthesis (officially they collect unused gradients).
  - No test-set model selection: official reports the best epoch; we report final and acc_last[k], and log acc_max
    (test-selected) for comparison only. Evaluation every --eval-every epochs (official: every epoch, our default).
  - No --cmi_init (pre-inverted set) and no --synthesis-only mode; one round per epoch as all CMI scripts use.
  - Digits: no horizontal flip (digits are not mirror-symmetric), as train_teacher.py.

Run:
  python cmi.py                                                # digits, teachers/digits_wrn16_2.pt, < 3 min on CPU
  python cmi.py --dataset cifar10 --teacher teachers/cifar10_wrn40_2.pt   # paper scale (student wrn16_1), GPU
  python cmi.py --dataset cifar10 --teacher teachers/cifar10_wrn40_2.pt --resume          # continue that run
Expected:
  Paper Table 1 (best epoch): C10 r34->r18 94.84, wrn40_2->wrn16_1 90.01 (scratch 88.82); C100 77.04 / 57.91.
  TA-DFKD Table 3, teacher T1 (r34->r18): C10 acc_last[10] 92.54 +- 1.6 / acc_max 94.80; C100 74.10 +- 0.2 / 74.85.
  Ours: digits (CPU, seed 0) 98.15 % final, acc_last[10] 97.93 %, teacher 99.26 %; CIFAR not yet measured.
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (DATASETS, Generator, Normalize, acc_last_k, autocast, build_model, check_amp, check_finite,
                    check_student, check_teacher_data, check_positive, fill_defaults, finish_run_args, evaluate, fail,
                    finish_run, get_rng_state, load_checkpoint, load_data, load_teacher, MetricLogger, pick_device,
                    prepare_run_dir, random_crop_flip, register_bn_hooks, bns_loss, save_checkpoint, save_config,
                    save_sample_grid, seed_everything, set_rng_state, to_floats, one_line_errors)

# scripts/cmi/scratch_cmi... (CIFAR-10 wrn40_2 -> wrn16_1) + hard-wired values of datafree_kd.py (nz, bank, n_neg, head).
C10 = dict(batch_size=128, synthesis_batch_size=256, epochs=200, kd_steps=400, g_steps=200, lr_g=1e-3, lr=0.1,
           weight_decay=1e-4, T=20.0, bn=1.0, oh=1.0, adv=0.5, cr=0.8, tau=0.1, nz=256, ngf=64, bank_size=40960,
           n_neg=4096, head_dim=256, flip=1, last_k=10, save_images=0)
PAPER_DEFAULTS = {
    "cifar10": C10,
    "cifar100": {**C10, "last_k": 20},       # UNOFFICIAL: no CIFAR-100 script exists; TA-DFKD's k = 20
    "tinyimagenet": {**C10, "last_k": 20},   # UNOFFICIAL: TA-DFKD found no working CMI setting on Tiny-ImageNet
    "folder": C10,                           # UNOFFICIAL
    "mnist": {**C10, "flip": 0},             # UNOFFICIAL (and the default LeNet-5 teacher has no BN: refused)
    # digits (ours): 1,257-image scale, < 3 min on 2 CPU cores. One synthesis iteration (B = 64: a generator pass,
    # two teacher passes with input gradients, a student pass) costs ~0.3 CPU-s, so 20 rounds x 20 g_steps; 20 x 64
    # = 1,280 images, about the real training set. Bank 640 = 10 rounds fills at round 10, so the (fixed) full-bank
    # state occurs in every default run; n_neg 256 = 4 batches (officially 16); ngf 32 (generator cost halved).
    # Loss weights, tau, T, lr_g, lr, optimisers and schedules: official.
    "digits": {**C10, "batch_size": 64, "synthesis_batch_size": 64, "epochs": 20, "kd_steps": 40, "g_steps": 20,
               "ngf": 32, "bank_size": 640, "n_neg": 256, "flip": 0, "save_images": 1},
}
DEFAULT_STUDENT = {"resnet34": "resnet18", "vgg11": "resnet18", "wrn40_2": "wrn16_1", "wrn16_2": "wrn16_1",
                         "resnet34_tiny": "resnet18_tiny"}  # the paper's pairs; digits' wrn16_2 -> wrn16_1


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description="CMI: Contrastive Model Inversion (Fang et al., IJCAI 2021)"))
    a = p.add_argument
    a("--dataset", default="digits", choices=DATASETS, help="real test data and teacher domain (default digits)")
    a("--data-root", default="data", help="torchvision root / folder dataset root")
    a("--teacher", default=None, help="teacher checkpoint (default teachers/<dataset>_<arch>.pt)")
    a("--student", default=None, help="student arch (default: the paper's pair, resnet34->resnet18, wrn40_2->wrn16_1)")
    a("--out", default=None, help="run directory (default runs/cmi-<dataset>-<teacher stem>-s<seed>)")
    a("--seed", type=int, default=0, help="seed (official scripts: 0)")
    a("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    a("--epochs", type=int, default=None, help="epochs = synthesis rounds (official --epochs, C10 200)")
    a("--resume", action="store_true", help="continue the run in --out from checkpoint.pt")
    a("--amp", default="off", choices=["bf16", "fp16", "off"], help="autocast, CPU or CUDA (off until benchmarked)")
    a("--channels-last", action="store_true", help="channels_last memory format (CPU and CUDA)")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (official: every epoch)")
    a("--save-every", type=int, default=1, help="checkpoint every N epochs and at the end (ours; default 1: a "
      "killed run loses at most one epoch, about a minute of GPU time at paper scale)")
    a("--save-images", type=int, default=None, choices=[0, 1], help="write samples_<epoch>.png (digits 1, else 0)")
    a("--stop-after", type=int, default=None, help="stop after this epoch as if interrupted (resume test)")
    a("--batch-size", type=int, default=None, help="KD batch size (official --batch_size, C10 128)")
    a("--synthesis-batch-size", type=int, default=None, help="images per round B (official 256)")
    a("--nz", type=int, default=None, help="latent size (official: 256, hard-wired)")
    a("--ngf", type=int, default=None, help="generator width (official: 64, hard-wired)")
    a("--g-steps", type=int, default=None, help="generator iterations per round (official --g_steps 200)")
    a("--kd-steps", type=int, default=None, help="student steps per round (official --kd_steps = --ep_steps 400)")
    a("--lr-g", type=float, default=None, help="Adam lr of generator, z and head (official --lr_g 1e-3)")
    a("--lr", type=float, default=None, help="student SGD lr, cosine to 0 over the epochs (official 0.1)")
    a("--weight-decay", type=float, default=None, help="student weight decay (official 1e-4)")
    a("--T", type=float, default=None, help="KD temperature (official --T 20)")
    a("--bn", type=float, default=None, help="weight of L_bn (official --bn 1)")
    a("--oh", type=float, default=None, help="weight of L_oh (official --oh 1)")
    a("--adv", type=float, default=None, help="weight of L_adv (official --adv 0.5)")
    a("--cr", type=float, default=None, help="weight of L_cr (official --cr 0.8)")
    a("--tau", type=float, default=None, help="contrastive temperature tau (official --cr_T 0.1)")
    a("--bank-size", type=int, default=None, help="feature bank rows (official: 40960, hard-wired)")
    a("--n-neg", type=int, default=None, help="cached negatives per iteration (official: 4096, hard-wired)")
    a("--head-dim", type=int, default=None, help="projection head output width (official: 256, hard-wired)")
    a("--flip", type=int, default=None, choices=[0, 1], help="horizontal flips in both views and KD (digits 0)")
    a("--last-k", type=int, default=None, help="k of acc_last[k] (TA-DFKD: 10 for C10, 20 for C100)")
    args = p.parse_args(argv)
    fill_defaults(args, PAPER_DEFAULTS[args.dataset])
    check_positive(args, "epochs", "batch_size", "synthesis_batch_size", "nz", "ngf", "g_steps", "kd_steps",
                   "bank_size", "n_neg", "head_dim", "eval_every", "save_every", "last_k")
    if args.bank_size % args.synthesis_batch_size:  # OFFICIAL: MemoryBank.add asserts bank_size % B == 0
        fail(f"--bank-size {args.bank_size} is not a multiple of B = {args.synthesis_batch_size}; choose a multiple")
    if args.n_neg > args.bank_size:
        fail(f"--n-neg {args.n_neg} exceeds --bank-size {args.bank_size}; lower --n-neg")
    if min(args.lr_g, args.lr, args.T, args.tau) <= 0:
        fail("--lr-g, --lr, --T and --tau must be > 0; pass positive values")
    return finish_run_args(args, "cmi")


# -- Losses: one pure function per term ---------------------------------------------------------------------------

def loss_oh(logits_t, targets):
    """Method: L_oh = CE(T(x_g), y), mean over the batch (contrastive.py: F.cross_entropy(t_out, targets)); the
    class prior L_Cls of TA-DFKD Eq. (2)."""
    return F.cross_entropy(logits_t.float(), targets)


def loss_adv(logits_s, logits_t):
    """Method: L_adv = -(1/B) sum_i m_i KL(sigma(t_i) || sigma(s_i)), m_i = [argmax s_i == argmax t_i], T = 1: the
    L_Adv of TA-DFKD Eq. (2).
    Pushes the generator to images the student still classifies like the teacher but with a distant distribution.
    OFFICIAL: the mean divides by B (masked rows count as 0), neither logit detached. Mask by product: no sync."""
    s, t = logits_s.float(), logits_t.float()
    keep = (s.argmax(1) == t.argmax(1)).float()
    kl = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="none").sum(1)  # (B,)
    return -(kl * keep).mean()


def loss_cr(q, k, tau, n_cur):
    """Method: L_cr, InfoNCE of local-view projections q against detached global-view keys k, both (N + N', d): the
    n_cur current rows, then N' cached bank rows; l_r = -log softmax_r'(q_r . k_r' / tau)[r]. OFFICIAL: mean over
    current rows + mean over cached rows ("to avoid too small gradients w.r.t. the generator"), the second mean taken
    whenever the bank was ever written, NaN with zero sampled rows (spec bug 1); here only when rows are present."""
    logits = q.float() @ k.detach().float().T / tau  # (N + N', N + N')
    ce = F.cross_entropy(logits, torch.arange(len(q), device=q.device), reduction="none")
    if len(q) > n_cur:  # shape test, not a tensor value: no sync
        return ce[:n_cur].mean() + ce[n_cur:].mean()
    return ce.mean()


def loss_kd(logits_s, logits_t, T):
    """Method: L_KD = T^2 * KL(sigma(t/T) || sigma(s/T)), batch mean (criterions.KLDiv, T = 20 in all CMI scripts):
    TA-DFKD Eq. (1) with D = T^2 KL."""
    return F.kl_div(F.log_softmax(logits_s.float() / T, 1), F.softmax(logits_t.float() / T, 1),
                    reduction="batchmean") * T * T


# -- Method pieces: feature hooks, projection head, feature bank, image pool, augmentation, generator reset -------

class FeatureHook:
    """InstanceMeanHook (hooks.py): per-sample spatial mean of the hooked module's input, (B, C), fp32."""

    def __init__(self, module):
        self.feat = None
        self.handle = module.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.feat = inputs[0].float().mean(dim=(2, 3))


def register_feature_hooks(teacher, arch):
    """Method: f(x). OFFICIAL (datafree_kd.py): every BatchNorm2d input, except resnet34 teachers: the inputs of
    layer1..layer4 only (the comment says block outputs; it hooks inputs). PAPER-SILENT: resnet34_tiny as resnet34."""
    if arch in ("resnet34", "resnet34_tiny"):
        return [FeatureHook(getattr(teacher, f"layer{i}")) for i in range(1, 5)]
    return [FeatureHook(m) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]


class MLPHead(nn.Module):
    """Method: h(v) = normalize2(W2 ReLU(W1 v + b1) + b2), D -> D -> head_dim (contrastive.py MLPHead)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, dim_out))

    def forward(self, v):
        return F.normalize(self.head(v).float(), dim=1)


class FeatureBank:
    """MemoryBank (contrastive.py): ring buffer of raw teacher features [f(x_l) | f(x_g)] (2D wide), on the device.
    ptr and n_updates are Python ints (counts of rows), so sampling never reads the device."""

    def __init__(self, size, dim, device):
        self.data = torch.zeros(size, dim, device=device)  # OFFICIAL: randn, never read before written
        self.size, self.ptr, self.n_updates = size, 0, 0

    def add(self, feat):
        self.data[self.ptr:self.ptr + len(feat)] = feat.detach().float()
        self.ptr = (self.ptr + len(feat)) % self.size
        self.n_updates += len(feat)

    def filled(self):  # rows ever written, at most the bank size
        return min(self.n_updates, self.size)

    def sample(self, n_neg):
        """min(n_neg, rows written) distinct random rows. OFFICIAL: draws among the first `ptr` rows until the bank
        has wrapped past full, so at n_updates == size (ptr back at 0) it gave zero rows: NaN loss that round."""
        n = self.filled()
        idx = torch.randperm(n, device=self.data.device)[:min(n_neg, n)]
        return self.data[idx]


class ImagePool:
    """All synthetic images of the run as uint8 (N, C, H, W) on the device (officially PNG files on disk)."""

    def __init__(self, capacity, channels, size, device):
        self.images = torch.zeros(capacity, channels, size, size, dtype=torch.uint8, device=device)
        self.n = 0

    def add(self, x):
        # OFFICIAL: save_image_batch does (clamp(0,1)*255).astype(uint8): truncation, no rounding
        self.images[self.n:self.n + len(x)] = (x.detach().float().clamp(0, 1) * 255).to(torch.uint8)
        self.n += len(x)


def random_resized_crop_flip(x, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """Local view: RandomResizedCrop(size, scale=(0.25, 1)) + flip, per sample, bilinear, one grid_sample.
    PAPER-SILENT deviation from kornia: crop sides are clamped to the image instead of rejection-sampled."""
    n, dev = x.shape[0], x.device
    area = torch.empty(n, device=dev).uniform_(*scale)
    r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)  # fractions of width / height
    cx, cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - w), (torch.rand(n, device=dev) * 2 - 1) * (1 - h)
    sx = w * (torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0) if flip else 1.0)  # negative = mirrored
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def reset_generator(generator):
    """OFFICIAL reset_model (contrastive.py), every round: conv/linear weights N(0, 0.02), biases 0; BN weights
    N(1, 0.02), biases 0 (running stats kept but unused: the generator stays in train mode)."""
    for m in generator.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# -- One generator iteration, one round of synthesis, one student step --------------------------------------------

def generator_step(ctx, z, targets, opt_g):
    """Method: L = cr*L_cr + bn*L_bn + oh*L_oh + adv*L_adv, one Adam step on (G, z) and one on the head h.
    Returns the images (before the step), their raw features [f(x_l) | f(x_g)], the loss and the loss terms."""
    a, teacher, student, head, dev = ctx["args"], ctx["teacher"], ctx["student"], ctx["head"], ctx["device"]
    pad = ctx["image_size"] // 8
    with autocast(dev, a.amp):
        x = ctx["generator"](z).float()  # (B, C, H, W) in (0, 1)
        x_g = ctx["normalize"](random_crop_flip(x, pad, bool(a.flip)))
        x_l = ctx["normalize"](random_resized_crop_flip(x, flip=bool(a.flip)))
        if a.channels_last:
            x_g, x_l = (v.contiguous(memory_format=torch.channels_last) for v in (x_g, x_l))
        logits_t = teacher(x_g)
        l_bn = bns_loss(ctx["bn_hooks"])  # read now: the local-view pass below overwrites the hooks
        f_g = torch.cat([h.feat for h in ctx["feat_hooks"]], 1)  # (B, D)
        l_oh = loss_oh(logits_t, targets)
        l_adv = loss_adv(student(x_g), logits_t) if a.adv > 0 else torch.zeros((), device=dev)
        teacher(x_l)
        f_l = torch.cat([h.feat for h in ctx["feat_hooks"]], 1)
        cached_l, cached_g = ctx["bank"].sample(a.n_neg).chunk(2, dim=1)  # (N', D) each
        q, k = head(torch.cat([f_l, cached_l, f_g, cached_g])).chunk(2)  # one head pass, as the official code
    l_cr = loss_cr(q, k, a.tau, len(x))  # outside autocast: the q.k^T / tau matmul stays fp32
    loss = a.cr * l_cr + a.bn * l_bn + a.oh * l_oh + a.adv * l_adv
    opt_g.zero_grad(set_to_none=True)
    ctx["opt_head"].zero_grad(set_to_none=True)
    ctx["scaler"].scale(loss).backward()
    ctx["scaler"].step(opt_g)
    ctx["scaler"].step(ctx["opt_head"])
    ctx["scaler"].update()
    terms = {"loss/bn": l_bn, "loss/oh": l_oh, "loss/adv": l_adv, "loss/cr": l_cr, "loss/gen": loss}
    return x.detach(), torch.cat([f_l, f_g], 1).detach(), loss.detach(), {k: v.detach() for k, v in terms.items()}


def synthesize(ctx):
    """One round (CMISynthesizer.synthesize): reset G, fresh z ~ N(0, I) and sorted random targets, fresh Adam over
    (G, z); g_steps iterations; keep the lowest-loss iteration's images and features. Returns (x, feats, sums)."""
    a, dev, generator = ctx["args"], ctx["device"], ctx["generator"]
    ctx["student"].eval().requires_grad_(False)  # OFFICIAL: eval mode; frozen here (officially unused grads)
    # hooks live only during synthesis: the KD steps' teacher passes need no BN statistics
    ctx["bn_hooks"] = register_bn_hooks(ctx["teacher"])
    ctx["feat_hooks"] = register_feature_hooks(ctx["teacher"], ctx["arch"])
    reset_generator(generator)
    generator.train()
    z = torch.randn(a.synthesis_batch_size, a.nz, device=dev).requires_grad_(True)
    targets = torch.randint(ctx["num_classes"], (a.synthesis_batch_size,), device=dev).sort()[0]
    opt_g = torch.optim.Adam([{"params": generator.parameters()}, {"params": [z]}], lr=a.lr_g, betas=(0.5, 0.999))
    sums = {}
    for it in range(a.g_steps):
        x, feats, loss, terms = generator_step(ctx, z, targets, opt_g)
        if it == 0:  # OFFICIAL: iteration 0 is always accepted
            best_x, best_f, best_loss = x, feats, loss
        else:  # device-side select instead of `if best_cost > loss.item()`
            better = loss < best_loss
            best_x, best_f = torch.where(better, x, best_x), torch.where(better, feats, best_f)
            best_loss = torch.where(better, loss, best_loss)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
    for h in ctx["bn_hooks"] + ctx["feat_hooks"]:
        h.handle.remove()
    ctx["student"].train().requires_grad_(True)
    return best_x, best_f, {k: v / a.g_steps for k, v in sums.items()}


def student_step(ctx, x_uint8, opt_s):
    """Method: L_KD on a pool batch with the CIFAR train transform (crop + flip), teacher under no_grad."""
    a, dev, student = ctx["args"], ctx["device"], ctx["student"]
    x = ctx["normalize"](random_crop_flip(x_uint8.float().div_(255), ctx["image_size"] // 8, bool(a.flip)))
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(dev, a.amp):
        with torch.no_grad():
            logits_t = ctx["teacher"](x)
        loss = loss_kd(student(x), logits_t, a.T)
    opt_s.zero_grad(set_to_none=True)
    ctx["scaler"].scale(loss).backward()
    ctx["scaler"].step(opt_s)
    ctx["scaler"].update()
    return loss.detach()


# -- Training schedule --------------------------------------------------------------------------------------------

def build(args, teacher, meta, data, device):
    """Every object of a run, fresh (load_state() overwrites them on --resume). D comes from one dummy forward."""
    nc, size = data.in_channels, data.image_size
    student = build_model(args.student, data.num_classes, nc).to(device)
    generator = Generator(args.nz, args.ngf, size, nc).to(device)
    if args.channels_last:
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    hooks = register_feature_hooks(teacher, meta["arch"])
    with torch.no_grad():
        teacher(torch.zeros(2, nc, size, size, device=device))
    dim = sum(h.feat.shape[1] for h in hooks)  # D (wrn40_2: 2704, resnet34: 512)
    for h in hooks:
        h.handle.remove()
    head = MLPHead(dim, args.head_dim).to(device)
    opt_s = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return dict(args=args, device=device, teacher=teacher, student=student, generator=generator, head=head,
                normalize=Normalize(data.mean, data.std).to(device), arch=meta["arch"], num_classes=data.num_classes,
                image_size=size,
                opt_head=torch.optim.Adam(head.parameters(), lr=args.lr_g),  # OFFICIAL: created once, default betas
                opt_s=opt_s, sched_s=torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=args.epochs),
                scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda"),
                bank=FeatureBank(args.bank_size, 2 * dim, device),
                pool=ImagePool(args.epochs * args.synthesis_batch_size, nc, size, device))


STATEFUL = ("student", "generator", "head", "opt_head", "opt_s", "sched_s", "scaler")


def save_state(ctx, path, epoch, step, elapsed, history):
    bank, pool = ctx["bank"], ctx["pool"]
    save_checkpoint(path, {**{k: ctx[k].state_dict() for k in STATEFUL}, "epoch": epoch, "step": step,
                           "elapsed_s": elapsed, "rng": get_rng_state(), "history": history,
                           "config": vars(ctx["args"]), "bank": bank.data[:bank.filled()].cpu(), "bank_ptr": bank.ptr,
                           "bank_n_updates": bank.n_updates, "pool": pool.images[:pool.n].cpu()})


def load_state(ctx, ck):
    for k in STATEFUL:
        ctx[k].load_state_dict(ck[k])
    bank, pool = ctx["bank"], ctx["pool"]  # slice assignment copies host -> device
    bank.data[:len(ck["bank"])], bank.ptr, bank.n_updates = ck["bank"], ck["bank_ptr"], ck["bank_n_updates"]
    pool.images[:len(ck["pool"])], pool.n = ck["pool"], len(ck["pool"])
    set_rng_state(ck["rng"])
    return ck["epoch"], ck["step"], ck["elapsed_s"]


def train(args, teacher, meta, data, device):
    ctx = build(args, teacher, meta, data, device)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, step, elapsed0 = 0, 0, 0.0
    if args.resume:
        start_epoch, step, elapsed0 = load_state(ctx, load_checkpoint(ckpt_path))
    # a teacher whose recorded accuracy is not digest-verified (or an official file) is measured here
    teacher_acc = meta.get("test_acc") or evaluate(teacher, data.test, ctx["normalize"], device, args.amp,
                                                   args.channels_last)
    logger = MetricLogger(args.out, args.epochs, start_epoch, teacher_acc=teacher_acc)
    pool, bank, opt_s = ctx["pool"], ctx["bank"], ctx["opt_s"]
    t0 = t_last = time.time()
    seen, sums, n_sums = 0, {}, 0
    for epoch in range(start_epoch, args.epochs):
        # Phase 1 (Method: L): one synthesis round; its best images join the pool, its features the bank
        n_neg = min(args.n_neg, bank.filled())  # cached negatives used this round (Python ints, no sync)
        x_best, f_best, g_terms = synthesize(ctx)
        pool.add(x_best)
        bank.add(f_best)
        # Phase 2 (Method: L_KD): kd_steps over all images so far, a fresh shuffled pass each round (DataIter)
        order, pos, kd = torch.randperm(pool.n, device=device), 0, 0.0
        for _ in range(args.kd_steps):
            if pos >= pool.n:
                order, pos = torch.randperm(pool.n, device=device), 0
            idx = order[pos:pos + args.batch_size]  # OFFICIAL: no drop_last, the tail batch is smaller
            pos += args.batch_size
            kd = kd + student_step(ctx, pool.images[idx], opt_s)
            seen, step = seen + len(idx), step + 1
        ctx["sched_s"].step()  # OFFICIAL: cosine over epochs, stepped once per epoch
        for k, v in {**g_terms, "loss/kd": kd / args.kd_steps}.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sums += 1
        done = epoch + 1
        if done % args.eval_every == 0 or done == args.epochs:
            acc = evaluate(ctx["student"], data.test, ctx["normalize"], device, args.amp, args.channels_last)
            losses = to_floats({k: v / n_sums for k, v in sums.items()})  # SYNC: once per evaluation
            check_finite(losses, step)
            now = time.time()
            hist = logger.history + [{"acc": acc}]
            record = {"epoch": done, "step": step, "acc": acc, "acc_max": max(r["acc"] for r in hist),  # test-selected
                      f"acc_last_{args.last_k}": acc_last_k(hist, args.last_k), **losses,
                      "bank/fill": bank.filled() / bank.size, "bank/negatives": n_neg, "pool/images": pool.n,
                      "img_per_s": seen / max(now - t_last, 1e-9),  # KD images per wall second, synthesis included
                      "elapsed_s": elapsed0 + now - t0}
            logger.log(record)
            seen, sums, n_sums, t_last = 0, {}, 0, now
            if args.save_images:  # SYNC: the teacher's classes of the last synthesized batch, once per evaluation
                with torch.no_grad():
                    labels = ctx["teacher"](ctx["normalize"](x_best.float())).argmax(1)
                save_sample_grid(os.path.join(args.out, f"samples_{done}.png"), x_best, labels)
        stopping = args.stop_after is not None and done == args.stop_after
        if done % args.save_every == 0 or done == args.epochs or stopping:
            save_state(ctx, ckpt_path, done, step, elapsed0 + time.time() - t0, logger.history)
        if stopping:
            print(f"stopped after epoch {done} (--stop-after); continue with --resume", flush=True)
            return None
    return finish_run(args.out, "cmi", args.dataset, teacher_acc, logger.history,
                      args.last_k, args.epochs, elapsed0 + time.time() - t0, args.seed, student=args.student,
                      teacher_arch=meta["arch"])


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    check_amp(args.amp, device)
    teacher, meta = load_teacher(args.teacher, args.dataset, device)
    if not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()):
        fail(f"teacher {meta['arch']} has no BatchNorm2d layer, which CMI's L_bn and features need; use a BN teacher")
    args.student = args.student or DEFAULT_STUDENT.get(meta["arch"])
    if args.student is None:
        fail(f"no default student for teacher {meta['arch']}; pass --student ARCH")
    build_model(args.student, 10, 3)  # unknown name -> one-line error before anything is written
    data = load_data(args.dataset, args.data_root, args.batch_size, 512, meta.get("image_size"),
                     meta.get("in_channels"), meta.get("mean"), meta.get("std"), device)
    check_teacher_data(meta, data)
    check_student(args.student, data)
    prepare_run_dir(args.out, args.resume, args)  # on --resume: checkpoint verified, same flags, before any write
    seed_everything(args.seed)
    save_config(args.out, args, device)
    return train(args, teacher, meta, data, device)


if __name__ == "__main__":
    main()
