"""DAFL: "Data-Free Learning of Student Networks", Hanting Chen, Yunhe Wang, Chang Xu, Zhaohui Yang, Chuanjian Liu,
Boxin Shi, Chunjing Xu, Chao Xu, Qi Tian, ICCV 2019, arXiv 1904.01186. Official code: github.com/huawei-noah/
Efficient-Computing, Data-Efficient-Model-Compression/DAFL/DAFL-train.py (mirror: autogyro/DAFL, 2019).

The frozen teacher T plays a fixed GAN discriminator. A generator G is trained so that T's responses to x = G(z) look
like its responses to real training images: confident (one-hot loss), strongly activated (activation loss), and
balanced over the classes across the batch (information-entropy loss). The student S learns KL(T || S) on the same
synthetic batch. No real data is used for training; real test images only measure the student.

Equations (named by the paper's symbols; the numbering could not be checked against the PDF, spec/dafl.md 1):
  L_oh     one-hot loss    1/B sum_i CE(y_T^i, t^i), t^i = argmax_k y_T^i[k]          ->  loss_one_hot()
  L_a      activation loss -1/(B D) sum_i sum_j |f_T^i[j]| (code: mean, not L1 sum)  ->  loss_activation()
  L_ie     info-entropy    sum_k p_k log10 p_k, p = 1/B sum_i softmax(y_T^i)          ->  loss_information_entropy()
  L_Total  generator loss  oh L_oh + ie L_ie + a L_a (paper: L_oh + alpha L_a + beta L_ie)  ->  loss_generator()
  L_KD     student loss    1/B sum_i KL(softmax(y_T^i) || softmax(y_S^i)), T = 1     ->  loss_kd()
  Alg. 1   one joint backward of L_Total + L_KD per iteration, then a G step and an S step  ->  joint_step()
In the common framework of the TA-DFKD paper (Shin & Choi, AAAI 2024, arXiv 2402.12406, Table 1), the
student minimises Eq. (1) L_KD = E_z[D(T(G(z)), S(G(z)))] and the generator Eq. (2)
L_G = alpha L_Cls + beta L_Adv + gamma L_Rep. DAFL is Eq. (1) with D = KL, and Eq. (2) with
L_Cls = L_oh (class prior), beta = 0, L_Rep = L_a (activation); L_ie, its class-balance term, is an extra term.

Defaults (DAFL-train.py argparse defaults and the official README commands, spec/dafl.md 2):
  mnist     LeNet-5 -> LeNet-5-half, 200 epochs x 120 iterations, batch 512, nz 100, G Adam 0.2, S Adam 2e-3,
            no LR schedule, oh/ie/a = 1/5/0.1.
  cifar10   ResNet-34 -> ResNet-18, 2000 x 120, batch 1024, nz 1000, G Adam 0.02, S SGD 0.1 momentum 0.9 wd 5e-4,
            S lr x0.1 at epochs 800 and 1600 (G constant), oh/ie/a = 0.05/5/0.01 (current Huawei README; the 2019
            autogyro README passes no weights, i.e. 1/5/0.1: --oh 1 --ie 5 --a 0.1).
  cifar100  as cifar10 with oh/ie/a = 0.5/20/0.1 (both READMEs). acc_last[k]: k = 10 / 20 as TA-DFKD's Table 3.
  tinyimagenet, folder  PAPER-SILENT: DAFL has no such setting (TA-DFKD ran DAFL on Tiny without stating how);
            CIFAR-100's for Tiny (student resnet18_tiny), CIFAR-10's for a folder.
  digits    ours, scaled down to run in < 3 min on 2 CPU cores: see PAPER_DEFAULTS['digits'].
  Generator: common.DAFLGenerator, BN eps 0.8 in two layers (official quirk), Tanh then an affine-free BN, so its
  batch-standardised output is fed to T and S as it is; real test images are normalised with the teacher's statistics.

Differences from the official code (DAFL-train.py, module-level training loop):
  - Teacher frozen (requires_grad_(False)); official T collects never-used weight gradients. Gradients of G and S and
    both updates are unchanged. One device, no nn.DataParallel (with N GPUs the official BN statistics of G and S are
    per GPU chunk). Seeds are set (official: none).
  - log10 of the batch-mean probability is clamped at 1e-30 (official unguarded: an underflowed class gives 0 * -inf =
    NaN, spec/dafl.md 7); identical wherever the official value is finite.
  - No model selection on the test set: official keeps the best-epoch student and reports it; we report the final
    accuracy and acc_last[k], and log acc_max (the paper's number, test-selected) for comparison only. Everything
    is saved as state_dicts in checkpoint.pt (official: pickled nn.DataParallel modules `teacher` / `student`).
  - Evaluation every --eval-every epochs (official: every epoch, the default). Test batch 512 (official 64 / 1024;
    eval mode, so the accuracy is the same).
  - Paper vs code, code kept: one joint G+S step on one batch (paper's Alg. 1 alternates modules [paper?]); log10 and
    no 1/K in L_ie, mean instead of L1 sum in L_a (absorbed by ie and a); student Adam (MNIST) / SGD without Nesterov
    (CIFAR), where the paper mentions NAG [paper?].

Run:
  python dafl.py                                                             # digits, ~2 min on 2 idle CPU cores
  python dafl.py --dataset mnist                                             # paper scale: LeNet-5 -> LeNet-5-half
  python dafl.py --dataset cifar10 --teacher teachers/cifar10_resnet34.pt    # paper scale, GPU
  python dafl.py --dataset cifar10 --out runs/x --resume                     # continue an interrupted run
Expected:
  Paper (README Tables 1, 3; best test acc): MNIST 98.20, CIFAR-10 92.22, CIFAR-100 74.47.
  TA-DFKD Table 3, teacher T1: CIFAR-10 acc_last[10] 83.60 +- 7.8 / acc_max 92.07; CIFAR-100 74.08 +- 0.6 / 75.22.
  Ours, digits (CPU, default flags, WRN-16-2 99.26 % -> WRN-16-1): final 98.15 / 97.04 % (seeds 0 / 1), acc_last[5]
  97.11 / 97.96 %, acc_max 98.15 / 98.33 %; predicted-class entropy 2.22 of ln 10 = 2.30 (no collapse).
  MNIST / CIFAR: not yet measured (no GPU this session).
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from common import (DATASETS, MODELS, DAFLGenerator, MetricLogger, Normalize, autocast, build_model, check_amp,
                    check_finite, check_student, check_teacher_data, check_positive, fill_defaults, finish_run_args,
                    evaluate, fail, finish_run, get_rng_state, load_data, load_teacher, pick_device, prepare_run_dir,
                    save_checkpoint, save_config, save_sample_grid, seed_everything, set_rng_state, to_floats,
                    one_line_errors)

_CIFAR10 = dict(student="resnet18", epochs=2000, iters_per_epoch=120, batch_size=1024, nz=1000, ngf=64,
                lr_generator=0.02, lr_student=0.1, student_optimizer="sgd", weight_decay=5e-4, milestones="800,1600",
                oh=0.05, ie=5.0, a=0.01, k=10)
_CIFAR100 = dict(_CIFAR10, oh=0.5, ie=20.0, a=0.1, k=20)
PAPER_DEFAULTS = {
    "mnist": dict(student="lenet5_half", epochs=200, iters_per_epoch=120, batch_size=512, nz=100, ngf=64,
                  lr_generator=0.2, lr_student=2e-3, student_optimizer="adam", weight_decay=0.0, milestones="",
                  oh=1.0, ie=5.0, a=0.1, k=10),
    "cifar10": _CIFAR10,
    "cifar100": _CIFAR100,
    "tinyimagenet": dict(_CIFAR100, student="resnet18_tiny"),  # PAPER-SILENT: no official Tiny setting
    "folder": _CIFAR10,                                         # PAPER-SILENT: CIFAR-10's
    # Ours: grey 10-class digits take MNIST's setting (Adam for both, no schedule, loss weights 1/5/0.1), scaled to
    # 16x16 inputs and 2 CPU cores: batch 64 (not 512), ngf 32 (half of DAFL's 128/64 widths: at batch 64 the
    # generator is the costliest network), 15 x 50 = 750 iterations (not 24,000), and lr_G 2e-3: over so few steps
    # MNIST's 0.2 swings G too far (measured seed 0: 0.2 -> 36-75 % over steps 450-850, 0.02 -> 89 % after 600,
    # 0.002 -> 96 % after 600; a frozen G gives 36 % after 100 steps, where lr_G 2e-3 gives 76 %).
    "digits": dict(student="wrn16_1", epochs=15, iters_per_epoch=50, batch_size=64, nz=100, ngf=32,
                   lr_generator=2e-3, lr_student=2e-3, student_optimizer="adam", weight_decay=0.0, milestones="",
                   oh=1.0, ie=5.0, a=0.1, k=5),
}


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description="DAFL: data-free learning of student networks (Chen et al., ICCV 2019)"))
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="real test data and default settings")
    p.add_argument("--data-root", default="data", help="where torchvision datasets live (or the folder dataset)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default teachers/<dataset>_<arch>.pt)")
    p.add_argument("--student", default=None, choices=list(MODELS), help="student architecture (official: "
                   "lenet5_half on MNIST, resnet18 on CIFAR; ours: wrn16_1 on digits)")
    p.add_argument("--out", default=None, help="run directory (default runs/dafl-<dataset>-<teacher stem>-s<seed>)")
    p.add_argument("--seed", type=int, default=0, help="random seed (official: none set)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of --iters-per-epoch iterations (official "
                   "--n_epochs: 200 MNIST, 2000 CIFAR)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off", help="autocast, any device (losses fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (CPU and CUDA)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (official: every epoch)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N epochs (default: --eval-every)")
    p.add_argument("--save-images", type=int, choices=[0, 1], default=None, help="write samples_<epoch>.png, the "
                   "last synthetic batch of the epoch (default 1 on digits, else 0)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this epoch as if interrupted (testing)")
    # method hyperparameters (None = per-dataset default from PAPER_DEFAULTS)
    p.add_argument("--iters-per-epoch", type=int, default=None, help="iterations per epoch (official: 120, "
                   "hard-coded)")
    p.add_argument("--batch-size", type=int, default=None, help="synthetic batch = #z per iteration (official "
                   "--batch_size: 512 MNIST, 1024 CIFAR; issue #8: small batches break DAFL)")
    p.add_argument("--nz", type=int, default=None, help="latent size of z ~ N(0, I) (official --latent_dim: 100 "
                   "MNIST, 1000 CIFAR)")
    p.add_argument("--ngf", type=int, default=None, help="generator width: 2*ngf and ngf channels (official: 64, "
                   "i.e. 128/64)")
    p.add_argument("--bn-eps", type=float, default=0.8, help="eps of the generator's two inner BNs (official: 0.8, "
                   "passed positionally where momentum was probably meant; PyTorch default 1e-5)")
    p.add_argument("--lr-generator", type=float, default=None, help="generator Adam lr (official --lr_G: 0.2 MNIST, "
                   "0.02 CIFAR; constant)")
    p.add_argument("--lr-student", type=float, default=None, help="student lr (official --lr_S: 2e-3 MNIST, 0.1 CIFAR)")
    p.add_argument("--student-optimizer", choices=["adam", "sgd"], default=None, help="official: Adam on MNIST, "
                   "SGD momentum 0.9 (no Nesterov) on CIFAR")
    p.add_argument("--momentum", type=float, default=0.9, help="student SGD momentum (official: 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="student weight decay (official: 0 MNIST, 5e-4 "
                   "CIFAR)")
    p.add_argument("--milestones", default=None, help="comma-separated 0-indexed epochs from which the student lr is "
                   "multiplied by --lr-gamma once more (official adjust_learning_rate: 800,1600 on CIFAR, none on "
                   "MNIST); the generator lr stays constant")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="student LR decay factor (official: 0.1)")
    p.add_argument("--oh", type=float, default=None, help="weight of L_oh (official --oh: 1 MNIST, 0.05 CIFAR-10 "
                   "[2019 README: 1], 0.5 CIFAR-100)")
    p.add_argument("--ie", type=float, default=None, help="weight of L_ie, the paper's beta (official --ie: 5 MNIST "
                   "and CIFAR-10, 20 CIFAR-100)")
    p.add_argument("--a", type=float, default=None, help="weight of L_a, the paper's alpha (official --a: 0.1 MNIST, "
                   "0.01 CIFAR-10 [2019 README: 0.1], 0.1 CIFAR-100)")
    p.add_argument("--k", type=int, default=None, help="acc_last[k]: mean of the last k evaluations (TA-DFKD: 10 "
                   "CIFAR-10, 20 CIFAR-100)")
    args = p.parse_args(argv)
    fill_defaults(args, PAPER_DEFAULTS[args.dataset])
    try:
        args.milestones = [int(m) for m in str(args.milestones).split(",") if m.strip()]
    except ValueError:
        fail(f"--milestones takes comma-separated epochs, e.g. --milestones 800,1600; got {args.milestones!r}")
    args.save_every = args.eval_every if args.save_every is None else args.save_every
    args.save_images = int(args.dataset == "digits") if args.save_images is None else args.save_images
    check_positive(args, "epochs", "iters_per_epoch", "batch_size", "nz", "ngf", "eval_every", "save_every", "k")
    if args.batch_size < 2:
        fail("--batch-size must be >= 2 (the generator's BatchNorm needs a batch); pass e.g. --batch-size 64")
    if args.lr_student <= 0 or args.lr_generator <= 0 or not 0 < args.lr_gamma <= 1 or args.bn_eps <= 0:
        fail("--lr-student, --lr-generator and --bn-eps must be > 0 and --lr-gamma in (0, 1]; pass positive values")
    if min(args.oh, args.ie, args.a, args.weight_decay) < 0 or not all(map(math.isfinite, (args.oh, args.ie, args.a))):
        fail("--oh, --ie, --a and --weight-decay must be finite and >= 0; pass e.g. --oh 1 --ie 5 --a 0.1")
    if any(m < 1 for m in args.milestones):
        fail(f"--milestones must be epochs >= 1; got {args.milestones}")
    return finish_run_args(args, "dafl")


# ---------------------------------------------------------------------------------------------------------------
# Losses: (B, K) teacher/student logits and (B, D) teacher features in, scalar out, fp32 even under autocast
# ---------------------------------------------------------------------------------------------------------------

def loss_one_hot(logits_t):
    """L_oh (one-hot loss): 1/B sum_i CE(y_T^i, t^i) with pseudo-label t^i = argmax_k y_T^i[k].

    OFFICIAL: `criterion(outputs_T, outputs_T.data.max(1)[1])`, CrossEntropyLoss with mean reduction; the label
    carries no gradient. Minimising it makes T confident on G's images, as it is on real ones.
    """
    logits_t = logits_t.float()
    return F.cross_entropy(logits_t, logits_t.detach().argmax(1))


def loss_activation(feat_t):
    """L_a (activation loss): -1/(B D) sum_i sum_j |f_T^i[j]|, f_T = T's penultimate feature (B, D).

    OFFICIAL: `-features_T.abs().mean()`, a mean over B*D entries where the paper writes the per-sample L1 norm (a
    factor D, absorbed by the weight a). ResNet/WRN/LeNet features are post-ReLU, so abs() changes nothing there.
    """
    return -feat_t.float().abs().mean()


def loss_information_entropy(logits_t):
    """L_ie (information-entropy loss): sum_k p_k log10 p_k with p = 1/B sum_i softmax(y_T^i), i.e. minus the base-10
    entropy of the batch-mean prediction. Minimum -log10 K (-1 for K=10, -2 for K=100) when T spreads G's batch
    evenly over the classes: the term that keeps G from collapsing onto a few classes.

    OFFICIAL: `(softmax_o_T * torch.log10(softmax_o_T)).sum()`: log10 and no 1/K (the paper's natural log and
    1/K factor are absorbed by ie). The clamp only guards log10(0) (official: NaN).
    """
    p = logits_t.float().softmax(1).mean(0)  # (K,)
    return (p * torch.log10(p.clamp_min(1e-30))).sum()


def loss_generator(l_oh, l_ie, l_a, oh, ie, a):
    """L_Total = oh L_oh + ie L_ie + a L_a (paper: L_oh + alpha L_a + beta L_ie; official flags --oh --ie --a).
    TA-DFKD Eq. (2) with L_Cls = L_oh, no L_Adv, L_Rep = L_a, plus L_ie."""
    return oh * l_oh + ie * l_ie + a * l_a


def loss_kd(logits_s, logits_t):
    """L_KD = 1/B sum_i sum_k q_ik (log q_ik - log p_ik), q = softmax(y_T), p = softmax(y_S): KL(T || S) at T = 1,
    TA-DFKD Eq. (1) with D = KL.

    OFFICIAL `kdloss`: F.kl_div(log_softmax(y_S), softmax(y_T), summed) / B. No temperature, no T^2, no hard-label
    term. The paper writes cross-entropy H(y_S, y_T), which differs by T's entropy: same gradient for S.
    """
    return F.kl_div(logits_s.float().log_softmax(1), logits_t.float().softmax(1), reduction="sum") / logits_s.shape[0]


def predicted_class_entropy(logits_t):
    """Diagnostic, not a loss: entropy (nats) of the histogram of T's argmax classes on one synthetic batch, and the
    largest class share. ln K (2.30 for K=10) = balanced; 0 = every image in one class, DAFL's failure mode."""
    hist = F.one_hot(logits_t.argmax(1), logits_t.shape[1]).float().mean(0)  # (K,)
    return -torch.special.xlogy(hist, hist).sum(), hist.max()


# ---------------------------------------------------------------------------------------------------------------
# One iteration: the official joint update of G and S
# ---------------------------------------------------------------------------------------------------------------

def joint_step(teacher, student, generator, opt_g, opt_s, scaler, z, w, amp="off", channels_last=False):
    """Alg. 1 as DAFL-train.py runs it: x = G(z); L_Total on T(x); L_KD on S(x.detach()) against T(x).detach();
    ONE backward of L_Total + L_KD; then optimizer_G.step() and optimizer_S.step().

    S therefore learns on exactly the batch G was scored on, made by the pre-update G. The two detaches isolate the
    gradients: G receives only grad L_Total, S only grad L_KD (spec/dafl.md 8, fact 12). T is frozen, but the graph
    runs through it back to x. w = (oh, ie, a). Returns detached losses, the batch and T's logits (diagnostics).
    """
    device = z.device
    with autocast(device, amp):
        x_syn = generator(z)                                             # (B, C, H, W), batch-standardised
        if channels_last:
            x_syn = x_syn.contiguous(memory_format=torch.channels_last)
        logits_t, feat_t = teacher(x_syn, return_features=True)          # (B, K), (B, D)
        logits_s = student(x_syn.detach())                               # (B, K)
    l_oh, l_ie, l_a = loss_one_hot(logits_t), loss_information_entropy(logits_t), loss_activation(feat_t)
    loss_g = loss_generator(l_oh, l_ie, l_a, *w)
    loss_s = loss_kd(logits_s, logits_t.detach())
    opt_g.zero_grad(set_to_none=True)
    opt_s.zero_grad(set_to_none=True)
    scaler.scale(loss_g + loss_s).backward()
    scaler.step(opt_g)
    scaler.step(opt_s)
    scaler.update()
    losses = {"loss/oh": l_oh, "loss/ie": l_ie, "loss/a": l_a, "loss/generator": loss_g, "loss/kd": loss_s}
    return {k: v.detach() for k, v in losses.items()}, x_syn.detach(), logits_t.detach()


def student_lr(base_lr, epoch0, milestones, gamma=0.1):
    """OFFICIAL adjust_learning_rate, called at the start of each 0-indexed epoch: base * gamma^(#milestones <=
    epoch0). CIFAR: 0.1 for epochs 0-799, 0.01 for 800-1599, 0.001 from 1600. The generator lr never decays."""
    return base_lr * gamma ** sum(epoch0 >= m for m in milestones)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def train(args, teacher, teacher_acc, data, device, ck=None):
    """The official loop: epochs x iters_per_epoch joint steps, student evaluated on real test data after epochs."""
    channels_last = args.channels_last
    normalize = Normalize(data.mean, data.std).to(device)  # real test images only; G's output is already standardised
    student = build_model(args.student, data.num_classes, data.in_channels).to(device)
    generator = DAFLGenerator(args.nz, args.ngf, data.image_size, data.in_channels, bn_eps=args.bn_eps).to(device)
    if channels_last:
        for m in (teacher, student, generator):
            m.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_generator)
    if args.student_optimizer == "adam":
        opt_s = torch.optim.Adam(student.parameters(), lr=args.lr_student, weight_decay=args.weight_decay)
    else:
        opt_s = torch.optim.SGD(student.parameters(), lr=args.lr_student, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and device.type == "cuda")
    keys = ("loss/oh", "loss/ie", "loss/a", "loss/generator", "loss/kd", "gen/class_entropy", "gen/max_class_frac")
    # device sums since the last eval, read once per eval; n_it counts their iterations (Python int, no sync)
    meters = {k: torch.zeros((), device=device) for k in keys}
    start_epoch, step, n_it, wall_before = 0, 0, 0, 0.0
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if ck is not None:
        student.load_state_dict(ck["student"])
        generator.load_state_dict(ck["generator"])
        for obj, key in ((opt_s, "opt_s"), (opt_g, "opt_g"), (scaler, "scaler")):
            obj.load_state_dict(ck[key])
        meters = {k: v.to(device) for k, v in ck["meters"].items()}
        start_epoch, step, n_it, wall_before = ck["epoch"], ck["step"], ck["n_it"], ck["wall_s"]
        set_rng_state(ck["rng"])
        print(f"resumed {ckpt_path} at epoch {start_epoch}", flush=True)
    logger = MetricLogger(args.out, args.epochs, start_epoch, teacher_acc=teacher_acc)
    if ck is not None:
        logger.history = list(ck["history"])
    w = (args.oh, args.ie, args.a)
    t0 = t_interval = time.time()

    for epoch in range(start_epoch + 1, args.epochs + 1):
        lr_s = student_lr(args.lr_student, epoch - 1, args.milestones, args.lr_gamma)  # official 0-indexed epoch
        for group in opt_s.param_groups:
            group["lr"] = lr_s
        teacher.eval()        # BN on running statistics, never updated
        student.train()       # S's BN uses batch statistics and tracks G's images
        generator.train()     # OFFICIAL: G is never put in eval mode
        for _ in range(args.iters_per_epoch):
            z = torch.randn(args.batch_size, args.nz, device=device)
            out, x_syn, logits_t = joint_step(teacher, student, generator, opt_g, opt_s, scaler, z, w, args.amp,
                                              channels_last)
            out["gen/class_entropy"], out["gen/max_class_frac"] = predicted_class_entropy(logits_t)
            for k in keys:
                meters[k] += out[k]
            step += 1
            n_it += 1

        if epoch % args.eval_every == 0 or epoch == args.epochs:
            values = to_floats(meters)  # SYNC: one per evaluation
            train_s = time.time() - t_interval
            record = {"epoch": epoch, "step": step, **{k: v / n_it for k, v in values.items()}, "lr_student": lr_s}
            check_finite(record, step)
            record["acc"] = evaluate(student, data.test, normalize, device, args.amp, channels_last)  # SYNC
            accs = [r["acc"] for r in logger.history] + [record["acc"]]
            record["acc_max"] = max(accs)                             # test-selected: for comparison only
            record["acc_last_k"] = sum(accs[-args.k:]) / len(accs[-args.k:])
            record["img_per_s"] = n_it * args.batch_size / max(train_s, 1e-9)  # synthetic images, eval excluded
            record["elapsed_s"] = wall_before + time.time() - t0
            logger.log(record)
            if args.save_images:  # SYNC: the batch T and S last trained on, back in [0, 1] pixels, by T's class
                imgs = normalize.inverse(x_syn.float()).clamp(0, 1)
                save_sample_grid(os.path.join(args.out, f"samples_{epoch}.png"), imgs, logits_t.argmax(1))
            meters = {k: torch.zeros_like(v) for k, v in meters.items()}
            n_it = 0
            t_interval = time.time()
        if epoch % args.save_every == 0 or epoch == args.epochs or epoch == args.stop_after:
            save_checkpoint(ckpt_path, {
                "student": student.state_dict(), "generator": generator.state_dict(), "opt_s": opt_s.state_dict(),
                "opt_g": opt_g.state_dict(), "scaler": scaler.state_dict(), "meters": meters, "n_it": n_it,
                "epoch": epoch, "step": step, "wall_s": wall_before + time.time() - t0, "rng": get_rng_state(),
                "history": logger.history, "config": vars(args)})
        if epoch == args.stop_after:
            print(f"stopped after epoch {epoch} (--stop-after); continue with --resume", flush=True)
            return None
    return finish_run(args.out, "dafl", args.dataset, teacher_acc, logger.history, args.k, args.epochs,
                      wall_before + time.time() - t0, args.seed, student=args.student, teacher=args.teacher)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    check_amp(args.amp, device)
    teacher, meta = load_teacher(args.teacher, args.dataset, device)
    data = load_data(args.dataset, args.data_root, args.batch_size, 512, meta.get("image_size"),
                     meta.get("in_channels"), meta.get("mean"), meta.get("std"), device)
    check_teacher_data(meta, data)
    check_student(args.student, data)
    if data.image_size % 4:
        fail(f"DAFL's generator upsamples twice by 2, so the input size must be a multiple of 4; got {data.image_size}")
    # on --resume: the checkpoint, verified, of the same experiment (only its length and bookkeeping may change)
    ck = prepare_run_dir(args.out, args.resume, args)
    seed_everything(args.seed)
    save_config(args.out, args, device)
    teacher_acc = evaluate(teacher, data.test, Normalize(data.mean, data.std).to(device), device, args.amp)
    print(f"teacher {meta['arch']} {teacher_acc:.2f}% on {args.dataset}; student {args.student}; {args.epochs} "
          f"epochs x {args.iters_per_epoch} joint G+S steps, batch {args.batch_size}, on {device}", flush=True)
    return train(args, teacher, teacher_acc, data, device, ck)


if __name__ == "__main__":
    main()
