"""Shared pieces of dfkd-ref: what every data-free KD method needs, each written once.

Contents, in reading order:
  1. errors            fail(): one line on stderr, exit code 2; one_line_errors() for argparse's own errors;
                       fill_defaults(), check_positive(), finish_run_args(): the flag checks every script shares
  2. models            CIFAR ResNet-18/34, 64x64 ResNet-18/34, WRN-16/40-1/2, VGG-11-BN, LeNet-5(-half), build_model()
  3. generators        Generator (Fast/CMI/SSD-KD), DAFLGenerator (DAFL, DFAD), TAGenerator (TA-DFKD)
  4. BN statistics     BNStatsHook, register_bn_hooks(), bns_loss()     (spec/bns.md)
  5. data              load_data() for digits, mnist, cifar10, cifar100, tinyimagenet, folder; Normalize;
                       random_crop_flip() (batch augmentation on the device)
  6. teachers          save_teacher(), load_teacher() (ours and the official repos' formats, pre-1.6 legacy files
                       through an allow-list unpickler: no code from a file runs), check_teacher_data(), check_student()
  7. run plumbing      device, seeding, autocast/check_amp (warns where bf16 is emulated), atomic checkpoints sealed
                       with a sha256 digest, RNG state, run directory (checked before writing, locked by run.lock),
                       metric logger, evaluate(), summary.json and the final line
  8. figures           svg_panel()/write_svg() (line, point, bar charts), write_curves() (curves.svg),
                       save_sample_grid() (readable PNG of synthetic images, one row per teacher class)

State-dict key names follow the official implementations (spec/models.md), so published teachers load with
strict=True. Nothing here is method-specific: no loss other than the BN-statistics formula, no update step,
no schedule, no argument parser.
"""
import atexit
import collections
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import socket
import struct
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# 1. Errors
# ----------------------------------------------------------------------------------------------------------


def fail(message):
    """Print `error: <what is wrong>; <how to fix>` on one line and exit with code 2 (contract.md)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def one_line_errors(parser):
    """argparse answers a bad flag with its usage block and then the error; contract.md promises one line, so its
    error() goes through fail() (same exit code 2)."""
    parser.error = lambda message: fail(f"{message}; see python {parser.prog} --help")
    return parser


def fill_defaults(args, defaults):
    """A flag left at None takes the script's per-dataset paper value from `defaults` (its PAPER_DEFAULTS row)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_positive(args, *names):
    """Each named integer flag must be >= 1 (run before any check that divides by one of them)."""
    for name in names:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}; pass a positive integer")


def finish_run_args(args, method):
    """The checks and defaults every method script ends its parse_args with: --stop-after inside the run, every
    --lr* finite and <= 10 (1e38 overflowed Adam's update into a traceback; nan passed every "> 0" check), the
    teacher at teachers/<dataset>_<arch>.pt and the run directory runs/<method>-<dataset>-<teacher stem>-s<seed>."""
    if args.stop_after is not None and not 1 <= args.stop_after < args.epochs:
        fail(f"--stop-after {args.stop_after} must lie in [1, {args.epochs - 1}]; lower it or raise --epochs")
    for name, value in vars(args).items():
        if name.startswith("lr") and isinstance(value, float) and not (math.isfinite(value) and value <= 10):
            fail(f"--{name.replace('_', '-')} {value} is not a usable learning rate; pass a finite value <= 10")
    args.teacher = args.teacher or default_teacher_path(args.dataset)
    if not args.out:
        stem = os.path.splitext(os.path.basename(args.teacher))[0]
        args.out = os.path.join("runs", f"{method}-{args.dataset}-{stem}-s{args.seed}")
    return args


# ----------------------------------------------------------------------------------------------------------
# 2. Classifiers (spec/models.md section 1). Every forward takes return_features and then returns
#    (logits, penultimate feature), the feature DAFL's activation loss needs.
# ----------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Post-activation ResNet block (DAFL resnet.py). `shortcut_name` is 'shortcut' (CIFAR) or 'downsample' (TA tiny)."""

    def __init__(self, in_planes, planes, stride=1, shortcut_name="shortcut"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        shortcut = nn.Sequential()  # identity: no state_dict keys
        if stride != 1 or in_planes != planes:
            shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, shortcut)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class ResNet(nn.Module):
    """CIFAR ResNet (no max-pool, 3x3 stem). Keys as DAFL/DFAD/TA/PRE/Fast: conv1, bn1, layer1-4, `linear`.

    The officials pool with a fixed 4x4 window, equal to our adaptive pool at 32x32; adaptive pooling also serves
    16x16 digits and 64x64 inputs. `tiny=True` gives TA-DFKD's 64x64 ResNet_tiny key names instead: a stem conv
    with bias, `downsample` shortcuts and an `fc` head (spec/models.md 1.2).
    """

    def __init__(self, blocks, num_classes=10, in_channels=3, tiny=False):
        super().__init__()
        self.tiny = tiny
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=tiny)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, shortcut_name = 64, ("downsample" if tiny else "shortcut")
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2))):
            layer = []
            for s in [stride] + [1] * (n - 1):
                layer.append(BasicBlock(in_planes, planes, s, shortcut_name))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        head = nn.Linear(512, num_classes)
        if tiny:
            self.fc = head
        else:
            self.linear = head

    def forward(self, x, return_features=False):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        feat = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 512)
        logits = self.fc(feat) if self.tiny else self.linear(feat)
        return (logits, feat) if return_features else logits


class WRNBlock(nn.Module):
    """Pre-activation wide-ResNet block (Fast/CMI wresnet.py, from ZSKT). Keys bn1, conv1, bn2, conv2[, convShortcut]."""

    def __init__(self, in_planes, out_planes, stride, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        if self.equal_in_out:
            out = F.relu(self.bn1(x))
        else:  # the official block pre-activates x itself, and the 1x1 shortcut reads that pre-activated x
            x = out = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.convShortcut(x))


class NetworkBlock(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride, dropout=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[WRNBlock(in_planes if i == 0 else out_planes, out_planes,
                                              stride if i == 0 else 1, dropout) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k (Fast/CMI wresnet.py). Published teachers and students use no dropout (spec/models.md 1.3)."""

    def __init__(self, depth, widen, num_classes=10, in_channels=3, dropout=0.0):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, dropout)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, dropout)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():  # the official init
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x, return_features=False):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        feat = F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1)  # (B, 64k)
        logits = self.fc(feat)
        return (logits, feat) if return_features else logits


class VGG(nn.Module):
    """VGG-11-BN as Fast/CMI vgg.py (from RepDistiller): five blocks, each ending at a BN, then a 512->C classifier."""

    def __init__(self, num_classes=10, in_channels=3, cfg=((64,), (128,), (256, 256), (512, 512), (512, 512))):
        super().__init__()
        for i, widths in enumerate(cfg):
            layers = []
            for w in widths:
                layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                in_channels = w
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))  # the block's last ReLU is applied in forward
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x, return_features=False):
        h = x.shape[2]
        for i in range(4):
            x = F.relu(getattr(self, f"block{i}")(x))
            if i < 3 or h == 64:  # pool3 only at 64x64, as the official forward
                x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        feat = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.classifier(feat)
        return (logits, feat) if return_features else logits


class LeNet5(nn.Module):
    """LeNet-5 (DAFL lenet.py keys conv1..3, fc1, fc2). Input must be 32x32; no BatchNorm, so no BN-statistics methods."""

    def __init__(self, num_classes=10, in_channels=1, widths=(6, 16, 120, 84)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 5)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 5)
        self.conv3 = nn.Conv2d(widths[1], widths[2], 5)
        self.fc1 = nn.Linear(widths[2], widths[3])
        self.fc2 = nn.Linear(widths[3], num_classes)

    def forward(self, x, return_features=False):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        feat = F.relu(self.conv3(x)).flatten(1)  # (B, 120): DAFL's "feature"
        logits = self.fc2(F.relu(self.fc1(feat)))
        return (logits, feat) if return_features else logits


# name -> constructor(num_classes, in_channels). Names are the official repos' ones; *_tiny are TA's 64x64 ResNets.
MODELS = {
    "resnet18": lambda c, ch: ResNet([2, 2, 2, 2], c, ch),
    "resnet34": lambda c, ch: ResNet([3, 4, 6, 3], c, ch),
    "resnet18_tiny": lambda c, ch: ResNet([2, 2, 2, 2], c, ch, tiny=True),  # a real ResNet-18 (TA's is R34-deep)
    "resnet34_tiny": lambda c, ch: ResNet([3, 4, 6, 3], c, ch, tiny=True),
    "wrn16_1": lambda c, ch: WideResNet(16, 1, c, ch),
    "wrn16_2": lambda c, ch: WideResNet(16, 2, c, ch),
    "wrn40_1": lambda c, ch: WideResNet(40, 1, c, ch),
    "wrn40_2": lambda c, ch: WideResNet(40, 2, c, ch),
    "vgg11": lambda c, ch: VGG(c, ch),
    "lenet5": lambda c, ch: LeNet5(c, ch),
    "lenet5_half": lambda c, ch: LeNet5(c, ch, widths=(3, 8, 60, 42)),
}


def build_model(name, num_classes=10, in_channels=3):
    if name not in MODELS:
        fail(f"unknown architecture '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes, in_channels)


# ----------------------------------------------------------------------------------------------------------
# 3. Generators (spec/models.md section 3). One class per network that really differs.
# ----------------------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """Fast-Datafree / CMI generator (used by CMI and SSD-KD): l1.0 Linear, one `conv_blocks` Sequential, bias-free
    convs but the last, Sigmoid output in [0, 1] (the caller normalises). nz=256, ngf=64 at 32x32: 2,328,899 params."""

    def __init__(self, nz=256, ngf=64, img_size=32, nc=3):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, 2 * ngf * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, nc, 3, 1, 1), nn.Sigmoid())

    def forward(self, z):
        out = self.l1(z.flatten(1))
        return self.conv_blocks(out.view(out.shape[0], -1, self.init_size, self.init_size))


class DAFLGenerator(nn.Module):
    """DAFL generator (DAFL-train.py), also DFAD's GeneratorA: output Tanh then a non-affine BN, so the images come
    out batch-standardised and are fed to the teacher as they are (no normaliser).

    bn_eps: DAFL passes 0.8 as BatchNorm2d's second positional argument, which is eps, not momentum (kept, it is
    what produced DAFL's tables); DFAD uses the default 1e-5. ngf=64 gives DAFL's fixed 128/64 widths.
    """

    def __init__(self, nz=100, ngf=64, img_size=32, nc=1, bn_eps=0.8):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, 2 * ngf * self.init_size ** 2))
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(2 * ngf))
        self.conv_blocks1 = nn.Sequential(nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1), nn.BatchNorm2d(2 * ngf, bn_eps),
                                          nn.LeakyReLU(0.2))
        self.conv_blocks2 = nn.Sequential(nn.Conv2d(2 * ngf, ngf, 3, 1, 1), nn.BatchNorm2d(ngf, bn_eps),
                                          nn.LeakyReLU(0.2), nn.Conv2d(ngf, nc, 3, 1, 1), nn.Tanh(),
                                          nn.BatchNorm2d(nc, affine=False))

    def forward(self, z):
        out = self.l1(z.flatten(1))
        out = self.conv_blocks0(out.view(out.shape[0], -1, self.init_size, self.init_size))
        out = self.conv_blocks1(F.interpolate(out, scale_factor=2))
        return self.conv_blocks2(F.interpolate(out, scale_factor=2))


class TAGenerator(nn.Module):
    """TA-DFKD generator (networks/gan.py): plain `l1` Linear, BN + LeakyReLU first block, BN eps 0.8 in the later two,
    Sigmoid output in [0, 1] (the caller normalises). nz=1000 at 32x32: 8,423,939 params."""

    def __init__(self, nz=1000, ngf=64, img_size=32, nc=3):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Linear(nz, 128 * self.init_size ** 2)  # 128 channels hard-coded in the official forward
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128), nn.LeakyReLU(0.2))
        self.conv_blocks1 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2))
        self.conv_blocks2 = nn.Sequential(nn.Conv2d(128, ngf, 3, 1, 1), nn.BatchNorm2d(ngf, 0.8), nn.LeakyReLU(0.2),
                                          nn.Conv2d(ngf, nc, 3, 1, 1), nn.Sigmoid())

    def forward(self, z):
        out = self.l1(z.flatten(1))
        out = self.conv_blocks0(out.view(out.shape[0], 128, self.init_size, self.init_size))
        out = self.conv_blocks1(F.interpolate(out, scale_factor=2))
        return self.conv_blocks2(F.interpolate(out, scale_factor=2))


# ----------------------------------------------------------------------------------------------------------
# 4. BatchNorm statistics (spec/bns.md). The hook records; bns_loss() is the DeepInversion formula.
# ----------------------------------------------------------------------------------------------------------


class BNStatsHook:
    """Forward hook on one BatchNorm2d: stores the batch mean and the *biased* variance of the BN input, per channel,
    in fp32 (under autocast the input may be bf16). Gradient flows through them back to the input image."""

    def __init__(self, bn):
        self.bn = bn
        self.mean = self.var = None
        self.handle = bn.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        a = inputs[0].float()
        self.mean = a.mean(dim=(0, 2, 3))
        self.var = a.var(dim=(0, 2, 3), unbiased=False)

    def remove(self):
        self.handle.remove()


def register_bn_hooks(model):
    """One BNStatsHook per nn.BatchNorm2d in modules() order, as every official implementation hooks them."""
    return [BNStatsHook(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def bns_loss(hooks):
    """DeepInversion feature loss R_feature = sum_l ||sigma^2_l - running_var_l||_2 + ||mu_l - running_mean_l||_2
    (spec/bns.md section 2-3): plain (not squared) Euclidean norms, summed over layers, no per-layer weights."""
    total = 0.0
    for h in hooks:
        total = total + torch.linalg.vector_norm(h.var - h.bn.running_var.detach().float()) \
                      + torch.linalg.vector_norm(h.mean - h.bn.running_mean.detach().float())
    return total


# ----------------------------------------------------------------------------------------------------------
# 5. Data. Every loader yields (x, y) with x float in [0, 1], shape (B, C, H, W): normalisation is explicit (a
#    Normalize module built from the *teacher's* statistics), because a teacher must always see the statistics it
#    was trained with (spec/models.md section 6: DAFL/TA CIFAR-100 teachers use CIFAR-10 constants).
# ----------------------------------------------------------------------------------------------------------

NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # Fast/CMI; see load_teacher for DAFL/TA
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),   # ImageNet constants, as TA and PRE
}
DATASETS = ("digits", "mnist", "cifar10", "cifar100", "tinyimagenet", "folder")
DEFAULT_TEACHER_ARCH = {"digits": "wrn16_2", "mnist": "lenet5", "cifar10": "resnet34", "cifar100": "resnet34",
                        "tinyimagenet": "resnet34_tiny", "folder": "resnet34"}
DIGITS_IMAGE_SIZE = 16  # 8x8 sources upscaled: a WRN keeps a 4x4 map before pooling; 32x32 is 4x the compute


def default_teacher_path(dataset):
    """Where train_teacher.py writes its teacher by default, and where every method looks for one."""
    return os.path.join("teachers", f"{dataset}_{DEFAULT_TEACHER_ARCH[dataset]}.pt")


class Normalize(nn.Module):
    """(x - mean) / std with the statistics as device buffers, made once (no host->device copy per step)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std

    def inverse(self, x):
        return x * self.std + self.mean


def random_crop_flip(x, padding=4, flip=True):
    """Per-sample random crop after zero padding, and random horizontal flip, on the device in one gather.
    The standard CIFAR augmentation (RandomCrop(32, padding=4) + RandomHorizontalFlip), batched so the GPU never
    waits for CPU workers."""
    n, c, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
        x = xp[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (n, c, h, w)
    if flip:
        x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x.contiguous()


class TensorLoader:
    """Minibatches from an in-memory uint8 image tensor (N, C, H, W) held on `device` (the whole of digits, MNIST or
    CIFAR fits in GPU memory). Shuffling draws from torch's global RNG, so a checkpointed RNG state resumes exactly."""

    def __init__(self, images, labels, batch_size, shuffle, device="cpu"):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n).to(self.images.device) if self.shuffle else torch.arange(n, device=self.images.device)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.images[idx].float().div_(255), self.labels[idx]

    @property
    def dataset_size(self):
        return len(self.labels)


class Data:
    """A dataset's loaders and facts: train/test loaders, num_classes, in_channels, image_size, mean, std."""

    def __init__(self, name, train, test, num_classes, in_channels, image_size, mean, std):
        self.name, self.train, self.test = name, train, test
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.mean, self.std = tuple(mean), tuple(std)


def _to_uint8_images(x, size):
    """float (N, C, h, w) in [0, 1] -> uint8 (N, C, size, size), bilinear resize if needed."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _channel_stats(loader, limit=20000):
    """Per-channel mean and std of up to `limit` training images (for digits and a user's folder)."""
    s = s2 = None
    count = 0
    for x, _ in loader:
        x = x.double()
        bs = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        s, s2 = (bs[0], bs[1]) if s is None else (s + bs[0], s2 + bs[1])
        count += x.shape[0] * x.shape[2] * x.shape[3]
        if count >= limit * x.shape[2] * x.shape[3]:
            break
    mean = s / count
    std = (s2 / count - mean ** 2).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _load_digits(image_size):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, values 0..16), a fixed stratified split of
    1,257 train / 540 test images (random_state 0), upscaled to image_size. Needs no download."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.3, stratify=d.target, random_state=0)
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    x = _to_uint8_images(x, image_size)
    return (x[idx_train], y[idx_train]), (x[idx_test], y[idx_test])


def _load_torchvision_arrays(name, root, image_size):
    """MNIST / CIFAR through torchvision (download=True, as users expect), converted once to uint8 tensors."""
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
           "cifar100": torchvision.datasets.CIFAR100}[name]
    out = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:  # no internet, or a corrupt archive
            fail(f"cannot load {name} from {root} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                 f"place the official {name} files under --data-root {root} or connect to the internet")
        data = torch.as_tensor(np.asarray(ds.data))
        x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        if x.shape[-1] != image_size:  # MNIST 28 -> 32, as the officials' Resize((32, 32))
            x = _to_uint8_images(x.float() / 255, image_size)
        out.append((x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)))
    return out


class TinyImageNetVal(torch.utils.data.Dataset):
    """tiny-imagenet-200/val: labels from val_annotations.txt (tab-separated file, wnid, box) mapped through the
    sorted wnid order that ImageFolder(train) uses and TA-DFKD's teacher was trained with."""

    def __init__(self, root, class_to_idx, transform):
        self.samples = []
        with open(os.path.join(root, "val", "val_annotations.txt")) as f:
            for line in f:
                parts = line.strip().split("\t")
                if len(parts) >= 2:
                    self.samples.append((os.path.join(root, "val", "images", parts[0]), class_to_idx[parts[1]]))
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader  # what ImageFolder reads train/ with
        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


def _image_transform(image_size, in_channels):
    import torchvision.transforms as T
    return T.Compose([T.Grayscale(1) if in_channels == 1 else T.Lambda(lambda im: im.convert("RGB")),
                      T.Resize((image_size, image_size)), T.ToTensor()])


def _stream_loader(ds, batch_size, shuffle, device):
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def load_data(name, data_root="data", batch_size=256, test_batch_size=512, image_size=None, in_channels=None,
              mean=None, std=None, device="cpu"):
    """Return a Data for `name`. Defaults per dataset: digits 1x16x16 (DIGITS_IMAGE_SIZE), MNIST 1x32x32 (resized
    as the officials do), CIFAR 3x32x32, TinyImageNet 3x64x64; for `folder`, size and channels of the first image
    and mean/std computed on the training images unless given. mean/std are the dataset's usual constants; pass a
    teacher's own statistics where they differ."""
    device = torch.device(device)
    if name not in DATASETS:
        fail(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if name in ("digits", "mnist", "cifar10", "cifar100"):
        in_channels = 1 if name in ("digits", "mnist") else 3
        image_size = image_size or {"digits": DIGITS_IMAGE_SIZE, "mnist": 32}.get(name, 32)
        if name == "digits":
            (xtr, ytr), (xte, yte) = _load_digits(image_size)
        else:
            (xtr, ytr), (xte, yte) = _load_torchvision_arrays(name, data_root, image_size)
        train = TensorLoader(xtr, ytr, batch_size, True, device)
        test = TensorLoader(xte, yte, test_batch_size, False, device)
        num_classes = int(ytr.max()) + 1 if name == "digits" else {"mnist": 10, "cifar10": 10, "cifar100": 100}[name]
        if mean is None:
            mean, std = NORMALIZATION.get(name) or _channel_stats(train)
        return Data(name, train, test, num_classes, in_channels, image_size, mean, std)

    import torchvision
    if name == "tinyimagenet":
        root = os.path.join(data_root, "tiny-imagenet-200")
        if not os.path.isfile(os.path.join(root, "val", "val_annotations.txt")):
            fail(f"{root}/val/val_annotations.txt not found; unpack tiny-imagenet-200.zip "
                 f"(http://cs231n.stanford.edu/tiny-imagenet-200.zip) under --data-root {data_root}")
        image_size, in_channels = image_size or 64, in_channels or 3
        tf = _image_transform(image_size, in_channels)
        train_ds = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
        test_ds = TinyImageNetVal(root, train_ds.class_to_idx, tf)
        mean, std = (mean, std) if mean is not None else NORMALIZATION["tinyimagenet"]
    else:  # folder: ImageFolder trees train/ and test/ (or val/)
        split = next((s for s in ("test", "val") if os.path.isdir(os.path.join(data_root, s))), None)
        if not os.path.isdir(os.path.join(data_root, "train")) or split is None:
            fail(f"--data-root {data_root} must hold train/ and test/ (or val/), one subfolder per class")
        if image_size is None or in_channels is None:
            first = torchvision.datasets.ImageFolder(os.path.join(data_root, "train")).samples[0][0]
            with warnings.catch_warnings():  # deprecated in torchvision 0.29 (TorchCodec), present in 0.26-0.29
                warnings.simplefilter("ignore", DeprecationWarning)
                shape = torchvision.io.decode_image(first).shape  # (C, H, W) as stored: C = 1 for greyscale
            image_size = image_size or shape[-1]
            in_channels = in_channels or (1 if shape[0] in (1, 2) else 3)
        tf = _image_transform(image_size, in_channels)
        train_ds = torchvision.datasets.ImageFolder(os.path.join(data_root, "train"), transform=tf)
        test_ds = torchvision.datasets.ImageFolder(os.path.join(data_root, split), transform=tf)
        if test_ds.classes != train_ds.classes:
            fail(f"{data_root}/{split} has classes {test_ds.classes[:5]}... but train/ has {train_ds.classes[:5]}...; "
                 f"both splits need the same class folders")
    train = _stream_loader(train_ds, batch_size, True, device)
    test = _stream_loader(test_ds, test_batch_size, False, device)
    if mean is None:
        mean, std = _channel_stats(_stream_loader(train_ds, 500, False, torch.device("cpu")))
    return Data(name, train, test, len(train_ds.classes), in_channels, image_size, mean, std)


# ----------------------------------------------------------------------------------------------------------
# 6. Teachers: our format carries everything a method needs; the official repos' formats load too (spec/models.md 4)
# ----------------------------------------------------------------------------------------------------------

TEACHER_FORMAT = "dfkd-ref-teacher-v1"
# Fast/CMI LeNet keys -> DAFL keys (spec/models.md 1.5)
FAST_LENET_RENAME = {"features.0.": "conv1.", "features.3.": "conv2.", "features.6.": "conv3.",
                     "fc.0.": "fc1.", "fc.2.": "fc2."}
# The official repos' model classes a whole pickled teacher (DAFL/PRE `torch.save(net)`) may reference
OFFICIAL_CLASSES = {(mod, cls) for mod in ("resnet", "lenet", "resnet_tiny", "networks.resnet", "networks.lenet",
                                           "networks.resnet_tiny", "network.resnet_8x", "network.lenet")
                    for cls in ("ResNet", "BasicBlock", "Bottleneck", "LeNet5", "LeNet5Half", "ResNet_tiny")}
TORCH_LAYERS = [nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear, nn.Sequential, nn.ReLU, nn.MaxPool2d,
                nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Tanh, nn.Flatten, nn.Identity, nn.LeakyReLU,
                nn.ModuleList, nn.Dropout2d, nn.Sigmoid, nn.Softmax]
_CLASS_NAME = r"[A-Za-z_][\w.]{0,80}"  # a pickled class name as Python writes it (anything else: corruption)
_TEACHER_REDO = "re-download it, or re-train it with python train_teacher.py"


def save_teacher(path, model, arch, dataset, num_classes, in_channels, image_size, mean, std, test_acc, **extra):
    """Our teacher file (sealed with a sha256 digest by save_checkpoint, so its test_acc can be trusted on load)."""
    save_checkpoint(path, {"format": TEACHER_FORMAT, "arch": arch, "dataset": dataset, "num_classes": num_classes,
                           "in_channels": in_channels, "image_size": image_size, "mean": list(mean),
                           "std": list(std), "test_acc": float(test_acc),
                           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra})


class _PickledModule(nn.Module):
    """Stand-in class for the official repos' pickled modules (resnet.ResNet, lenet.LeNet5, ...): unpickling only
    restores the module tree and its tensors, from which we take the state_dict. No code from the file runs."""


class _Stub:
    """Stand-in for every class of a legacy (pre-1.6) pickled model: it keeps the unpickled attributes and nothing
    else, so no code of the file, and no torch.nn code either, runs while it is read."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = state[0]
        if isinstance(state, dict):
            self.__dict__.update(state)


class _UnknownGlobal(pickle.UnpicklingError):
    def __init__(self, name, official):
        super().__init__(f"unknown class {name}")
        self.name, self.official = name, official


def _module_state(root):
    """state_dict of an unpickled module tree, read from its _parameters/_buffers/_modules attributes (no hook or
    method of the file's objects is called)."""
    state = {}

    def walk(m, prefix, path):
        if id(m) in path or len(path) > 64:
            raise pickle.UnpicklingError("the module tree has a cycle")
        d = getattr(m, "__dict__", None)
        if not isinstance(d, dict):
            raise pickle.UnpicklingError(f"{type(m).__name__} inside the module tree is not a module")
        skip = d.get("_non_persistent_buffers_set") or set()
        skip = skip if isinstance(skip, (set, frozenset, list, tuple)) else set()
        for group in ("_parameters", "_buffers"):
            items = d.get(group) or {}
            if not isinstance(items, dict):
                raise pickle.UnpicklingError(f"{group} is not a dict")
            for k, v in items.items():
                if v is None or (group == "_buffers" and k in skip):
                    continue
                if not isinstance(k, str) or not torch.is_tensor(v):
                    raise pickle.UnpicklingError(f"{prefix}{k} is not a tensor")
                state[prefix + k] = v.detach()
        subs = d.get("_modules") or {}
        if not isinstance(subs, dict):
            raise pickle.UnpicklingError("_modules is not a dict")
        for k, sub in subs.items():
            if sub is not None:
                walk(sub, f"{prefix}{k}.", path | {id(m)})

    walk(root, "", frozenset())
    return state


def _load_pickled_module(path):
    """A whole pickled nn.Module in the zip format (torch >= 1.6): torch's weights-only unpickler, allowing only
    torch.nn layer classes and our stand-in for the official model classes -> its state_dict."""
    import torch.serialization as ser
    shims = [(_PickledModule, f"{mod}.{cls}") for mod, cls in sorted(OFFICIAL_CLASSES)]
    with ser.safe_globals(shims + TORCH_LAYERS + [set]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):  # e.g. {"model": net}: each module becomes its state_dict
        return {k: _module_state(v) if isinstance(v, nn.Module) else v for k, v in obj.items()}
    return _module_state(obj)


# PyTorch's legacy format (torch.save before 1.6, or _use_new_zipfile_serialization=False): five pickles in a row
# (magic number, protocol version, system info, the object, its storage keys), then each storage's raw bytes
# (int64 element count + data). torch's weights-only unpickler refuses a pickled *module* in this format (its
# classes are persistent ids "module"), so we read it ourselves with an allow-list: no code of the file runs.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def _is_ints(t):
    return isinstance(t, (tuple, list)) and all(type(i) is int and i >= 0 for i in t)


def _legacy_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor(_v2), checked: a strided view inside the storage's bounds."""
    if not torch.is_tensor(storage) or type(offset) is not int or offset < 0 or not _is_ints(size) \
            or not _is_ints(stride) or len(size) != len(stride):
        raise pickle.UnpicklingError("malformed tensor record")
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel():
        raise pickle.UnpicklingError("tensor record points outside its storage")
    return storage.as_strided(tuple(size), tuple(stride), storage.storage_offset() + offset)


def _legacy_parameter(data, *_):
    if not torch.is_tensor(data):
        raise pickle.UnpicklingError("malformed parameter record")
    return data


class _LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f, storages=None, limit=0):
        super().__init__(f)
        self.storages, self.limit, self.official = storages if storages is not None else {}, limit, []

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return set if name == "set" else frozenset
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _legacy_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _legacy_parameter
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("torch.nn.backends.thnn", "_get_thnn_function_backend"):  # torch <= 1.0 modules
            return lambda *a: None
        if module.startswith("torch.nn.modules."):
            return _Stub
        if (module, name) in OFFICIAL_CLASSES:
            self.official.append(f"{module}.{name}")
            return _Stub
        if not re.fullmatch(_CLASS_NAME, f"{module}.{name}"):
            raise pickle.UnpicklingError("malformed class name")
        raise _UnknownGlobal(f"{module}.{name}", self.official)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError("malformed persistent id")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) >= 2:  # (module, class, source file, source): the source is never run
            return pid[1]
        if kind != "storage" or len(pid) != 6:
            raise pickle.UnpicklingError(f"unexpected persistent id {str(kind)[:20]!r}")
        stype, key, _, numel, view = pid[1:]
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError("malformed storage record")
        if numel * torch.empty((), dtype=stype.dtype).element_size() > self.limit:
            raise EOFError(f"a storage of {numel} elements is larger than the file")
        buf = self.storages.get(key)
        if buf is None:
            buf = self.storages[key] = torch.empty(numel, dtype=stype.dtype)
        elif buf.dtype != stype.dtype or buf.numel() != numel:
            raise pickle.UnpicklingError("storage records disagree")
        if view is not None:
            if not _is_ints(view[1:]) or len(view) != 3 or view[1] + view[2] > numel:
                raise pickle.UnpicklingError("malformed storage view")
            return buf[view[1]:view[1] + view[2]]
        return buf


def _load_legacy(f, size):
    """Read a legacy-format file (see above) -> (object, is_module). Pickled modules come back as their state_dict."""
    if _LegacyUnpickler(f).load() != _LEGACY_MAGIC:
        raise _NotTorch("a Python pickle, but not one written by torch.save")
    if _LegacyUnpickler(f).load() != 1001:
        raise pickle.UnpicklingError("unknown legacy protocol version")
    info = _LegacyUnpickler(f).load()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise pickle.UnpicklingError("big-endian or unknown system info")
    up = _LegacyUnpickler(f, limit=size)
    obj = up.load()
    keys = _LegacyUnpickler(f).load()
    if not isinstance(keys, list) or any(k not in up.storages for k in keys):
        raise pickle.UnpicklingError("storage keys do not match the object")
    for key in keys:
        buf = up.storages[key]
        head = f.read(8)
        nbytes = buf.numel() * buf.element_size()
        if len(head) < 8:
            raise EOFError("storage data missing")
        if struct.unpack("<q", head)[0] != buf.numel():
            raise pickle.UnpicklingError("storage size does not match its record")
        data = f.read(nbytes)
        if len(data) < nbytes:
            raise EOFError("storage data cut short")
        if nbytes:
            buf.view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if isinstance(obj, _Stub):
        return _module_state(obj), up.official
    if isinstance(obj, dict) and any(isinstance(v, _Stub) for v in obj.values()):  # e.g. {"model": net}
        return {k: _module_state(v) if isinstance(v, _Stub) else v for k, v in obj.items()}, None
    return obj, None


class _NotTorch(Exception):
    pass


_ARCH_KEYS = {}


def _guess_arch(state, guess=True):
    """The architecture whose state_dict has exactly these keys and shapes (num_classes / channels read off)."""
    head = next((state[k] for k in ("linear.weight", "fc.weight", "classifier.weight", "fc2.weight") if k in state), None)
    first = next((v for k, v in state.items() if k.endswith("weight") and v.ndim == 4), None)
    if head is None or first is None or head.ndim != 2:
        return None, None, None
    num_classes, in_channels = head.shape[0], first.shape[1]
    for name in MODELS if guess else ():
        if name not in _ARCH_KEYS:  # key names do not depend on class or channel counts: build each model once
            _ARCH_KEYS[name] = set(build_model(name, 10, 3).state_dict())
        if _ARCH_KEYS[name] != set(state):
            continue
        ref = build_model(name, num_classes, in_channels).state_dict()
        if all(ref[k].shape == state[k].shape for k in ref):
            return name, num_classes, in_channels
    return None, num_classes, in_channels


def load_teacher(path, dataset=None, device="cpu", arch=None, quiet=False):
    """Load a teacher -> (model in eval mode, frozen, on device; meta dict). Prints one line (unless quiet) saying
    what was loaded and whether its recorded test accuracy is verified by the file's sha256 digest (meta["digest"]).

    Accepts: ours (save_teacher); a raw state_dict (DFAD, TA-DFKD); a dict with 'state_dict' or 'model' (Fast/CMI);
    a whole pickled module (DAFL, PRE), in the zip format and in the legacy pre-1.6 one. Strips 'module.'
    (DataParallel) and '_orig_mod.' (torch.compile) prefixes, renames Fast's LeNet keys, infers the architecture
    from keys and shapes unless `arch` is given, loads strictly. Every failure is one line naming the file and what
    it is, exit 2. Official files carry no normalisation: it is taken from the dataset, with CIFAR-100 raw
    state_dicts (DAFL, DFAD, TA) getting the CIFAR-10 constants their code trained with (spec/models.md 6).
    """
    hint = "train one with: python train_teacher.py" + (f" --dataset {dataset}" if dataset else "") + \
        ", or pass --teacher PATH"
    obj, fmt, sealed = _read_torch_file(path, "teacher checkpoint", hint, _TEACHER_REDO)
    if fmt is None and not isinstance(obj, dict):
        fail(f"teacher checkpoint {path} is a PyTorch file holding a {type(obj).__name__}, not a model; pass a "
             f"teacher saved by train_teacher.py or an official state_dict")
    meta = {}
    if fmt is not None:
        state = obj
    elif obj.get("format") == TEACHER_FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        state, fmt = obj.get("state_dict"), "dfkd-ref"
        if meta.get("arch") not in MODELS or not all(type(meta.get(k)) is int and meta[k] > 0
                                                      for k in ("num_classes", "in_channels")):
            fail(f"teacher checkpoint {path} has damaged metadata (arch {str(meta.get('arch'))[:30]!r}); "
                 f"{_TEACHER_REDO}")
    elif "state_dict" in obj or "model" in obj:
        state, fmt = obj.get("state_dict", obj.get("model")), "wrapped"
    elif "student" in obj and "generator" in obj:
        fail(f"{path} is a distillation run's checkpoint, not a teacher; pass the teacher file the run used "
             f"(its config.json names it)")
    else:
        state, fmt = obj, "raw"
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v)
                                                           for k, v in state.items()):
        fail(f"teacher checkpoint {path} is a PyTorch file holding no model (no state_dict of tensors); pass a "
             f"teacher saved by train_teacher.py or an official one")
    clean = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    if "features.0.weight" in clean:  # Fast/CMI LeNet naming
        clean = {next((new + k[len(old):] for old, new in FAST_LENET_RENAME.items() if k.startswith(old)), k): v
                 for k, v in clean.items()}
    guessed, num_classes, in_channels = _guess_arch(clean, guess=not (arch or meta.get("arch")))
    arch = arch or meta.get("arch") or guessed
    if arch is None:
        fail(f"teacher checkpoint {path}: its keys and shapes match none of {', '.join(MODELS)}; rename its keys to "
             f"one of these architectures (README: Loading an official teacher checkpoint)")
    try:
        model = build_model(arch, meta.get("num_classes", num_classes or 10), meta.get("in_channels", in_channels or 3))
        model.load_state_dict(clean, strict=True)
    except (Exception, MemoryError) as e:
        fail(f"teacher checkpoint {path} does not fit architecture {arch} with {meta.get('num_classes', num_classes)}"
             f" classes ({_first_line(e)}); check that it is an unmodified {arch} checkpoint, or re-save it with "
             f"train_teacher.py")
    if fmt != "dfkd-ref":
        ds = dataset or "unknown"
        if ds == "cifar100" and fmt in ("raw", "pickled-module"):
            mean, std = NORMALIZATION["cifar10"]  # DAFL/DFAD/TA/PRE trained CIFAR-100 on the CIFAR-10 constants
        else:
            mean, std = NORMALIZATION.get(ds, (None, None))
        meta = {"arch": arch, "dataset": ds, "num_classes": num_classes, "in_channels": in_channels,
                "image_size": None, "mean": mean, "std": std, "test_acc": None}
    meta["source_format"], meta["digest"] = fmt, "verified" if sealed else "none"
    acc = meta.get("test_acc")
    if fmt == "dfkd-ref" and not sealed:  # a file of ours from before files were sealed: its claim is unchecked
        meta["claimed_test_acc"], meta["test_acc"] = acc, None
        said = (f"recorded test acc {acc:.2f}% NOT verified (the file has no sha256 digest: written before dfkd-ref "
                f"sealed its files; re-train it to seal it)" if isinstance(acc, float) else "no recorded test acc")
    elif fmt == "dfkd-ref":
        said = f"test acc {acc:.2f}% as recorded at training (sha256 digest verified)"
    else:
        said = f"official {fmt} format: no recorded test accuracy, no digest"
    if not quiet:
        print(f"teacher {path}: {arch}, {meta['num_classes']} classes; {said}", flush=True)
    model.to(device).eval().requires_grad_(False)
    return model, meta


def check_teacher_data(meta, data):
    """The teacher must fit the dataset: classes, channels, input size. One line naming both sides, else exit 2."""
    for key, label in (("num_classes", "classes"), ("in_channels", "input channels"), ("image_size", "input size")):
        t, d = meta.get(key), getattr(data, key)
        if t is not None and t != d:
            fail(f"teacher has {t} {label} but dataset {data.name} has {d}; pass a teacher trained on {data.name} "
                 f"(python train_teacher.py --dataset {data.name}) or the matching --dataset")
    if meta.get("mean") is None:
        fail(f"the teacher's input normalisation is unknown for dataset {data.name}; use a teacher saved by "
             f"train_teacher.py")


def check_student(arch, data):
    """The student must take the data's inputs (LeNet-5 needs 32x32; digits are 16x16): one line and exit 2 before
    the run directory is written, not a traceback at the first student forward. A 2-image forward on the CPU."""
    try:
        with torch.no_grad():
            build_model(arch, data.num_classes, data.in_channels).eval()(
                torch.zeros(2, data.in_channels, data.image_size, data.image_size))
    except RuntimeError:
        fail(f"student {arch} cannot take {data.in_channels}x{data.image_size}x{data.image_size} inputs; pass another "
             f"--student")


# ----------------------------------------------------------------------------------------------------------
# 7. Run plumbing
# ----------------------------------------------------------------------------------------------------------


def pick_device(name=None):
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            fail(f"--device {name} asked for but CUDA is not available; drop --device or pass --device cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            fail(f"--device {name} is not a device name; pass cpu, cuda or cuda:N")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); pass cuda:0 .. "
                 f"cuda:{torch.cuda.device_count() - 1}")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def autocast(device, amp):
    """`--amp bf16|fp16|off` as torch.autocast on the device's own type: bf16 acts on the CPU exactly as on CUDA
    (fast on CPUs with AVX512-BF16 or AMX, emulated and slower on others); fp16 only on CUDA (check_amp refuses
    it elsewhere); a no-op for `--amp off`. Losses, BN statistics and softmax/KL are cast to fp32 by their callers."""
    kind = torch.device(device).type
    enabled = amp == "bf16" or (amp == "fp16" and kind == "cuda")
    return torch.autocast(kind, dtype=torch.float16 if amp == "fp16" else torch.bfloat16, enabled=enabled)


def cpu_bf16_native():
    """Whether oneDNN runs bf16 natively on this CPU (AVX512 or AMX on x86, the BF16 extension on Arm). Elsewhere bf16
    is emulated: on an AVX2-only AMD EPYC (1 thread) a 1024^2 torch.mm ran at 0.5 GFLOP/s in bf16 against 33 in
    fp32, a 3x3 conv at 0.65 against 35. Unknown (a torch without the query) counts as native: no false alarm."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def check_amp(amp, device):
    """--amp fp16 needs CUDA (fp16 autocast + GradScaler); one error line and exit 2 elsewhere. --amp bf16 on a CPU
    without native bf16 still runs correctly, but ~50x slower than fp32: one warning line says so."""
    kind = torch.device(device).type
    if amp == "fp16" and kind != "cuda":
        fail(f"--amp fp16 needs a CUDA device, got {kind}; pass --amp bf16 or --amp off")
    if amp == "bf16" and kind == "cpu" and not cpu_bf16_native():
        print(f"warning: this CPU has no native bf16 (torch reports {torch.backends.cpu.get_cpu_capability()}), so "
              "--amp bf16 is emulated and about 50x slower than fp32 here; pass --amp off", file=sys.stderr,
              flush=True)


def get_rng_state():
    """Python, numpy, torch and CUDA RNG states as plain lists and tensors (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Files we write are sealed: torch.save leaves the zip archive's comment empty; we put there a marker and the sha256
# of every byte before the digest, so any change to the file (a flipped bit, a cut, an edit) is found on load.
_SEAL_MARK = b"dfkd-ref sha256 "
_SEAL_KEY = "dfkd_ref_sealed"  # inside every object we save: a file holding it must carry its digest
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record (22 bytes + comment), last in the file


def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:100]}" if text else type(e).__name__


def _sha256_prefix(f, n):
    h, left = hashlib.sha256(), n
    f.seek(0)
    while left > 0:
        chunk = f.read(min(left, 1 << 22))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _seal_status(f, size):
    """'ok', 'mismatch' or 'none' (no seal) for an open file of `size` bytes."""
    n = len(_SEAL_MARK) + 64
    if size < 22 + n:
        return "none"
    f.seek(size - 22 - n)
    tail = f.read(22 + n)
    if tail[:4] != _EOCD or tail[20:22] != struct.pack("<H", n) or tail[22:22 + len(_SEAL_MARK)] != _SEAL_MARK:
        return "none"
    return "ok" if _sha256_prefix(f, size - 64).encode() == tail[-64:] else "mismatch"


def _read_torch_file(path, what, missing, redo):
    """torch.load made safe for any file -> (object, fmt, sealed). fmt is None for a plain object, "pickled-module"
    when the file is a whole pickled model (the object is then its state_dict). No code from the file runs, and
    every failure is one line naming the file and what it is (common.fail, exit 2)."""
    where = f"{what} {path}"
    if not os.path.exists(path):
        fail(f"{where} not found; {missing}")
    if os.path.isdir(path):
        fail(f"{where} is a directory, not a file; pass the .pt file itself")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(512)
            seal = _seal_status(f, size)
            f.seek(max(0, size - 65558))  # a zip archive ends with its end record within the last 64 KiB
            has_end = _EOCD in f.read()
            data = None
            if head[:1] == b"\x80":  # a pickle (the legacy format): parsed from memory
                f.seek(0)
                data = f.read()
    except (OSError, MemoryError) as e:
        fail(f"{where} cannot be read ({_first_line(e)}); check the path and its permissions")
    if size == 0:
        fail(f"{where} is empty (0 bytes: an interrupted download or copy); {redo}")
    if seal == "mismatch":
        fail(f"{where} is damaged: its bytes differ from the sha256 digest stored when dfkd-ref wrote it (a flipped "
             f"bit, a partial copy or an edited file); {redo}")
    fmt = None
    try:
        if head.startswith(b"PK\x03\x04"):
            if not has_end:
                fail(f"{where} is corrupt or truncated: a zip archive without its end record, i.e. cut short (an "
                     f"interrupted download or copy); {redo}")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                try:
                    names = torch.serialization.get_unsafe_globals_in_checkpoint(path) if "GLOBAL" in str(e) else []
                except (Exception, MemoryError):
                    names = []
                if not names or not all(isinstance(n, str) and re.fullmatch(_CLASS_NAME, n) for n in names):
                    raise  # a corrupt pickle, not a model of unknown classes
                official = [n for n in names if tuple(n.rsplit(".", 1)) in OFFICIAL_CLASSES]
                known = {f"{c.__module__}.{c.__qualname__}" for c in TORCH_LAYERS} | {"builtins.set"}
                unknown = [n for n in names if n not in known and n not in official]
                if unknown:
                    raise _UnknownGlobal(unknown[0], official)
                obj = _load_pickled_module(path)
                fmt = "pickled-module" if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()) \
                    else None
        elif data is not None:
            obj, official = _load_legacy(io.BytesIO(data), size)
            fmt = None if official is None else "pickled-module"
        else:
            raise _NotTorch()
    except _UnknownGlobal as e:
        if e.official:
            fail(f"{where} is a whole pickled {e.official[0]} model that also uses {e.name}, which dfkd-ref cannot "
                 f"read without running code from the file; only if the file comes from a source you trust, convert "
                 f"it once in the official repo: python -c \"import torch; torch.save(torch.load('{path}', "
                 f"weights_only=False).state_dict(), 'teacher_sd.pt')\" (weights_only=False runs code stored in the "
                 f"file), then pass teacher_sd.pt")
        fail(f"{where} holds a pickled object of class {e.name}, which dfkd-ref does not know; if it is a model, "
             f"load it with the code that defined it and save model.state_dict(), then pass that file")
    except _NotTorch as e:
        low = head.lstrip().lower()
        if low.startswith((b"<!doctype html", b"<html")):
            what_it_is = "an HTML page (download sites often return a sign-in or confirmation page)"
        elif head.startswith(b"\x1f\x8b"):
            what_it_is = "gzip-compressed (decompress it first)"
        elif head[257:262] == b"ustar":
            what_it_is = "a tar archive (PyTorch < 0.4 saved this way, or it is a packed folder: unpack it)"
        else:
            what_it_is = str(e) or f"not a PyTorch file (it starts with {head[:8]!r}: neither zip nor pickle)"
        fail(f"{where} is {what_it_is}; {redo}")
    except (Exception, MemoryError, RecursionError) as e:
        fail(f"{where} is corrupt or truncated ({_first_line(e)}); {redo}")
    sealed = seal == "ok"
    if isinstance(obj, dict) and _SEAL_KEY in obj:
        if not sealed:
            fail(f"{where} is damaged: dfkd-ref wrote it with a sha256 digest that is now missing or unreadable; "
                 f"{redo}")
        obj = {k: v for k, v in obj.items() if k != _SEAL_KEY}
    return obj, fmt, sealed


def save_checkpoint(path, obj):
    """Atomic, sealed save: write a temporary file in the same folder, seal it (sha256 in the zip comment), fsync,
    then os.replace, so a crash never leaves a half-written checkpoint where a good one was. A write error (disk
    full, read-only folder) is one line, exit 2, with the previous file kept."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w+b") as f:
            torch.save({**obj, _SEAL_KEY: 1} if isinstance(obj, dict) else obj, f)
            f.flush()
            size = f.seek(0, 2)
            f.seek(size - 22)
            if f.read(22)[-2:] != b"\0\0":
                raise OSError(f"unexpected zip comment in {tmp}")
            f.seek(size - 2)
            f.write(struct.pack("<H", len(_SEAL_MARK) + 64) + _SEAL_MARK)
            f.flush()
            digest = _sha256_prefix(f, size + len(_SEAL_MARK))
            f.seek(0, 2)
            f.write(digest.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        fail(f"cannot write {path} ({_first_line(e)}); free disk space or choose a writable location (the previous "
             f"file, if any, is kept)")


_RESUME_CACHE = {}  # checkpoint verified by prepare_run_dir, handed to the method's own load_checkpoint once


def load_checkpoint(path):
    """Load a run checkpoint: seal checked, weights-only (no code in it runs). Anything wrong -> one line, exit 2."""
    key = os.path.abspath(path)
    if key in _RESUME_CACHE:
        stamp, obj = _RESUME_CACHE.pop(key)
        if os.path.isfile(path) and stamp == _stamp(path):
            return obj
    obj, fmt, _ = _read_torch_file(path, "checkpoint", "start without --resume, or point --out at the run to "
                                   "continue", "delete it to start over, or restore it from a copy")
    if fmt is not None or not isinstance(obj, dict):
        fail(f"checkpoint {path} is a PyTorch file holding {'a whole model' if fmt else type(obj).__name__}, not a "
             f"dfkd-ref checkpoint; point --out at a run directory made by the same script")
    return obj


def _stamp(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# Flags a resumed run may change: how long it runs, where it runs and what it writes, not what it computes.
RESUME_FREE = {"epochs", "resume", "device", "eval_every", "save_every", "save_images", "stop_after", "data_root",
               "out", "channels_last"}


def prepare_run_dir(out, resume, args=None):
    """Check the run directory before anything is written: a used --out needs --resume, --resume needs an unfinished
    run (no summary.json), and (given args) the run must be the same experiment: same script, same flags except
    RESUME_FREE. Takes the directory's lock (run.lock) so two runs never write into one --out. Returns the verified
    checkpoint on --resume (the method's next load_checkpoint of it gets the same object without reading it again),
    else None."""
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a directory; pass a directory for the run's outputs")
    used = any(os.path.exists(os.path.join(out, f)) for f in ("checkpoint.pt", "metrics.jsonl", "summary.json"))
    if resume and os.path.isfile(os.path.join(out, "summary.json")):  # --resume never rewrites a finished run
        fail(f"{out} holds a finished run (summary.json); choose another --out")
    if resume and not os.path.exists(ckpt):
        if used:
            fail(f"--resume given but {ckpt} does not exist (the run stopped before its first checkpoint); start "
                 f"again without --resume into a new --out, or delete {out}")
        fail(f"--resume given but {ckpt} does not exist; drop --resume to start a new run, or point --out at the run")
    if used and not resume:
        fail(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    ck = None
    if resume:
        ck = load_checkpoint(ckpt)
        if args is not None:
            cfg, mine = ck.get("config"), vars(args)
            if not isinstance(cfg, dict):
                fail(f"{ckpt} holds no run configuration, so it is not a run of this script; point --out at a run "
                     f"made by it, or choose another --out")
            diff = sorted(k for k in set(cfg) | set(mine)
                          if k not in RESUME_FREE and cfg.get(k, "<unset>") != mine.get(k, "<unset>"))
            if diff:
                fail(f"--resume with other settings than the run in {out} ({', '.join(diff[:6])}"
                     f"{' ...' if len(diff) > 6 else ''} differ: another script or other flags); pass the original "
                     f"flags (see {out}/config.json) or choose another --out")
        _RESUME_CACHE.clear()  # at most one checkpoint held (the same object the caller gets: no copy)
        _RESUME_CACHE[os.path.abspath(ckpt)] = (_stamp(ckpt), ck)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out {out} ({_first_line(e)}); choose a writable directory")
    _lock_run_dir(out)
    return ck


_LOCKS = {}


def _lock_run_dir(out):
    """Create out/run.lock (O_EXCL: atomic) naming this host and process; removed at exit. A lock left by a process
    that no longer runs (killed) is taken over."""
    lock, me = os.path.join(out, "run.lock"), f"{socket.gethostname()} {os.getpid()}"
    if _LOCKS.get(os.path.abspath(lock)) == me:
        return  # main() called again in this process (tests, notebooks)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(lock) as f:
                    host, pid = f.read().split()
                pid = int(pid)
            except (OSError, ValueError):
                host, pid = None, None
                try:
                    if time.time() - os.path.getmtime(lock) < 10:  # being written by a run starting right now
                        fail(f"{out} is in use by another run that is starting; choose another --out")
                except OSError:
                    pass
            if host is not None and host != socket.gethostname():
                fail(f"{out} is in use by a run on host {host} ({lock}); wait for it, choose another --out, or "
                     f"delete {lock} if no run is active there")
            if pid is not None and pid != os.getpid() and _alive(pid):
                fail(f"{out} is in use by another run (process {pid}); wait for it to finish or choose another --out")
            try:
                os.remove(lock)  # stale: its process is gone
            except OSError:
                pass
            continue
        except OSError as e:
            fail(f"cannot write to --out {out} ({_first_line(e)}); choose a writable directory")
        with os.fdopen(fd, "w") as f:
            f.write(me)
        _LOCKS[os.path.abspath(lock)] = me
        atexit.register(_unlock, lock, me)
        return
    fail(f"cannot take the lock {lock}; delete it if no run is using {out}")


def _alive(pid):
    if os.name == "nt":
        return True  # no safe liveness probe: treat as running (the message says how to clear it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _unlock(lock, me):
    try:
        with open(lock) as f:
            if f.read() == me:
                os.remove(lock)
    except OSError:
        pass


def save_config(out, args, device):
    cfg = dict(vars(args), torch=torch.__version__, device=str(device))
    tmp = os.path.join(out, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    os.replace(tmp, os.path.join(out, "config.json"))
    print("config: " + json.dumps(cfg, default=str), flush=True)
    return cfg


def to_floats(tensors):
    """dict of scalar device tensors -> dict of Python floats with a single host sync (SYNC: once per log line)."""
    if not tensors:
        return {}
    values = torch.stack([t.detach().float().reshape(()) for t in tensors.values()]).tolist()
    return dict(zip(tensors.keys(), values))


def check_finite(values, step):
    """Stop on the first non-finite loss, naming it; the last good checkpoint is kept as it is."""
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"loss {k} became {v} at step {step}; lower the learning rate, or --resume from the last checkpoint "
                 f"(kept as it was, if one was written)")


class MetricLogger:
    """metrics.jsonl (one JSON object per evaluation) plus one human line with throughput and ETA. On resume, records
    past the checkpoint's epoch (written after it, before the crash) are dropped so the history stays exact. Every
    log() also rewrites curves.svg beside it (accuracy with teacher_acc as a line, and the loss/* terms; section 8)."""

    def __init__(self, out, total_epochs, start_epoch=0, teacher_acc=None):
        self.path = os.path.join(out, "metrics.jsonl")
        self.curves, self.teacher_acc = os.path.join(out, "curves.svg"), teacher_acc
        self.total, self.start_epoch, self.t0 = total_epochs, start_epoch, time.time()
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= start_epoch]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.history = [json.loads(line) for line in kept]

    def log(self, record):
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        write_curves(self.curves, self.history, self.teacher_acc)
        done = record["epoch"] - self.start_epoch
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - record["epoch"])
        parts = [f"epoch {record['epoch']}/{self.total}", f"acc {record['acc']:.2f}%"]
        parts += [f"{k} {v:.4g}" for k, v in record.items()
                  if isinstance(v, float) and k not in ("acc", "img_per_s", "elapsed_s")]
        if "img_per_s" in record:
            parts.append(f"{record['img_per_s']:.0f} img/s")
        parts.append(f"eta {eta / 60:.1f} min")
        print(" | ".join(parts), flush=True)


@torch.no_grad()
def evaluate(model, loader, normalize, device, amp="off", channels_last=False):
    """Top-1 accuracy in percent on real data: no grad, eval mode (restored after), autocast as in
    training, correct counts accumulated on the device and read once (SYNC: one per evaluation)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(normalize(x))
        correct += (logits.argmax(1) == y).sum()
        total += y.numel()
    model.train(was_training)
    return 100.0 * correct.item() / max(total, 1)


def acc_last_k(history, k):
    """TA-DFKD's acc_last[k]: mean accuracy over the last k evaluations (fewer if the run is shorter)."""
    accs = [r["acc"] for r in history][-k:]
    return sum(accs) / len(accs) if accs else float("nan")


def finish_run(out, method, dataset, teacher_acc, history, k, epochs, wall_s, seed, **extra):
    """Write summary.json (contract.md) and print the contract's final line. acc_max is test-selected."""
    accs = [r["acc"] for r in history]
    summary = {"method": method, "dataset": dataset, "teacher_acc": teacher_acc,
               "final_acc": accs[-1] if accs else float("nan"), "acc_max": max(accs) if accs else float("nan"),
               "acc_last_k": acc_last_k(history, k), "k": k, "epochs": epochs, "wall_s": wall_s, "seed": seed, **extra}
    tmp = os.path.join(out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out, "summary.json"))
    print(f"final acc {summary['final_acc']:.2f}% (acc_last[{k}] {summary['acc_last_k']:.2f}%, acc_max "
          f"{summary['acc_max']:.2f}%, teacher {teacher_acc:.2f}%) in {wall_s:.0f} s", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------------------
# 8. Figures: a small SVG writer of line, point and bar charts (curves.svg, the robustness figures) and readable
#    sample grids (PNG via torchvision). Plain text and torch only; no plotting dependency.
# ----------------------------------------------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
          "#000000", "#aec7e8")


def _esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _nice_ticks(lo, hi, n=5):
    """About n round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    return [round(first + i * step, 12) for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def _fmt(v):
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"


def svg_panel(x0, y0, w, h, series=(), title="", xlabel="", ylabel="", ylim=None, logy=False, hlines=(), bars=None,
              xlim=None, xticks=None):
    """SVG elements (a string) of one chart whose outer box is (x0, y0, w, h).

    series: dicts with x, y (lists), label (None: not in the legend), color, optional dash (SVG dasharray),
    markers (circles on the line; a single point is always a circle), id (written as data-id). xticks: (x, label) pairs instead of round numbers.
    hlines: dicts with y, label, color (drawn dashed). bars: (categories, series) draws grouped bars instead, each
    series' y holding one value per category. logy maps log10(y); non-positive values are dropped. Plot area: left
    58, top 26, bottom 44 px inside the box, right 12 px or, with a legend, 160 px (the legend sits there, outside
    the data). Elements carry class and data-* attributes (tests read them).
    """
    if bars is not None:
        cats, series = bars
        xlim = (-0.5, len(cats) - 0.5)
    legend = {}
    for s in list(series) + list(hlines):
        if s.get("label") is not None and s["label"] not in legend:
            legend[s["label"]] = (s["color"], s.get("dash", "6 4" if s in hlines else None))
    px0, px1, py0, py1 = x0 + 58, x0 + w - (160 if legend else 12), y0 + 26, y0 + h - 44
    f = (lambda v: math.log10(v)) if logy else (lambda v: v)
    ys = [f(v) for s in series for v in s["y"] if v is not None and math.isfinite(v) and (v > 0 or not logy)]
    ys += [f(l["y"]) for l in hlines if l["y"] is not None and (l["y"] > 0 or not logy)]
    if bars is not None and not logy:
        ys.append(0.0)
    lo, hi = ylim if ylim else (min(ys, default=0.0), max(ys, default=1.0))
    if not ylim and not logy:  # 4 % headroom, none below a zero baseline
        pad = 0.04 * ((hi - lo) or 1.0)
        lo, hi = lo - (pad if lo != 0 else 0.0), hi + pad
    if logy:
        if ylim:
            lo, hi = math.log10(lo), math.log10(hi)
        lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
        yt = list(range(lo, hi + 1))
    else:
        yt = _nice_ticks(lo, hi)
        if not ylim:
            lo, hi = min(yt[0], lo), max(yt[-1], hi)
        yt = [t for t in yt if lo - 1e-9 <= t <= hi + 1e-9]
    if xlim is None:
        xs = [v for s in series for v in s["x"]]
        xlim = (min(xs, default=0.0), max(xs, default=1.0))
        xlim = xlim if xlim[1] > xlim[0] else (xlim[0] - 1, xlim[0] + 1)

    def X(v):
        return px0 + (v - xlim[0]) / (xlim[1] - xlim[0]) * (px1 - px0)

    def Y(v):  # v already mapped by f
        return py1 - (v - lo) / ((hi - lo) or 1.0) * (py1 - py0)
    out = [f'<rect x="{px0}" y="{py0}" width="{px1 - px0}" height="{py1 - py0}" fill="none" stroke="#444"/>',
           f'<text x="{(px0 + px1) / 2}" y="{y0 + 16}" text-anchor="middle" font-weight="bold">{_esc(title)}</text>',
           f'<text x="{(px0 + px1) / 2}" y="{py1 + 36}" text-anchor="middle">{_esc(xlabel)}</text>',
           f'<text x="{x0 + 14}" y="{(py0 + py1) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 {x0 + 14} {(py0 + py1) / 2})">{_esc(ylabel)}</text>']
    for t in yt:
        lab = f"1e{t}" if logy else _fmt(t)
        out.append(f'<line x1="{px0}" x2="{px1}" y1="{Y(t):.2f}" y2="{Y(t):.2f}" stroke="#ddd"/>'
                   f'<text class="ytick" data-value="{10.0 ** t if logy else t}" x="{px0 - 5}" y="{Y(t):.2f}" '
                   f'text-anchor="end" dominant-baseline="middle">{lab}</text>')
    if bars is not None:
        for i, c in enumerate(cats):
            out.append(f'<text class="xtick" x="{X(i):.2f}" y="{py1 + 16}" text-anchor="middle">{_esc(c)}</text>')
        bw = 0.8 / max(len(series), 1)
        for j, s in enumerate(series):
            for i, v in enumerate(s["y"]):
                if v is None or not math.isfinite(v) or (logy and v <= 0):
                    continue
                top, base = Y(f(v)), Y(max(lo, 0.0) if not logy else lo)
                left, width = X(i - 0.4 + j * bw), bw * (px1 - px0) / len(cats)
                out.append(f'<rect class="bar" data-id="{_esc(s.get("id"))}" data-category="{_esc(cats[i])}" '
                           f'data-label="{_esc(s.get("label"))}" data-value="{v}" x="{left:.2f}" '
                           f'y="{min(top, base):.2f}" width="{width:.2f}" height="{abs(base - top):.2f}" '
                           f'fill="{s["color"]}"/>')
    else:
        whole = all(float(v).is_integer() for s in series for v in s["x"])  # epochs: no tick at 1.5
        auto = [(t, _fmt(t)) for t in _nice_ticks(*xlim)
                if xlim[0] - 1e-9 <= t <= xlim[1] + 1e-9 and (t.is_integer() or not whole)]
        for t, lab in xticks or auto:
            out.append(f'<text class="xtick" x="{X(t):.2f}" y="{py1 + 16}" text-anchor="middle">{_esc(lab)}</text>')
    for l in hlines:
        if l["y"] is not None and (l["y"] > 0 or not logy):
            yl = Y(f(l["y"]))
            out.append(f'<line class="hline" data-label="{_esc(l.get("label"))}" x1="{px0}" x2="{px1}" '
                       f'y1="{yl:.2f}" y2="{yl:.2f}" stroke="{l["color"]}" stroke-dasharray="6 4"/>')
    for s in series if bars is None else ():
        pts = [(X(a), Y(f(b))) for a, b in zip(s["x"], s["y"])
               if b is not None and math.isfinite(b) and (b > 0 or not logy)]
        attrs = f'class="series" data-id="{_esc(s.get("id"))}" data-label="{_esc(s.get("label"))}"'
        dots = "".join(f'<circle cx="{a:.2f}" cy="{b:.2f}" r="3.5"/>' for a, b in pts)
        if len(pts) > 1:
            dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
            out.append(f'<polyline {attrs} points="{" ".join(f"{a:.2f},{b:.2f}" for a, b in pts)}" fill="none" '
                       f'stroke="{s["color"]}" stroke-width="1.8"{dash}/>')
            if s.get("markers"):
                out.append(f'<g fill="{s["color"]}">{dots}</g>')
        else:
            out.append(f'<g {attrs} fill="{s["color"]}">{dots}</g>')
    for i, (lab, (color, dash)) in enumerate(legend.items()):  # legend: right of the plot area
        ly, dash = py0 + 8 + 16 * i, f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{px1 + 6}" x2="{px1 + 30}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2.5"'
                   f'{dash}/><text class="legend" x="{px1 + 33}" y="{ly}" dominant-baseline="middle">{_esc(lab)}</text>')
    return "\n".join(out)


def write_svg(path, panels, width, height):
    """Write an SVG document of the given panel strings atomically (tmp file + os.replace)."""
    body = "\n".join(panels)
    text = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
            f'{body}\n</svg>\n')
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_curves(path, history, teacher_acc=None, title=""):
    """curves.svg: (1) student test accuracy per epoch with the teacher's as a dashed line; (2) every `loss/*` term,
    on a log axis when they span more than 1.5 decades and none changes sign (a term that is always negative is
    then drawn negated, dashed, labelled '-loss/...')."""
    ep = [r["epoch"] for r in history]
    acc = [{"x": ep, "y": [r.get("acc") for r in history], "label": "student", "color": COLORS[0],
            "markers": len(ep) <= 60}]
    known = teacher_acc is not None and math.isfinite(teacher_acc)
    hl = [{"y": teacher_acc, "label": f"teacher {teacher_acc:.2f}%", "color": COLORS[1]}] if known else []
    keys = sorted({k for r in history for k in r if k.startswith("loss/")})
    losses = [{"x": [r["epoch"] for r in history if k in r], "y": [r[k] for r in history if k in r], "label": k,
               "color": COLORS[i % len(COLORS)], "dash": "2 2" if i >= len(COLORS) else None}
              for i, k in enumerate(keys)]
    finite = [[v for v in s["y"] if isinstance(v, (int, float)) and math.isfinite(v)] for s in losses]
    mags = [abs(v) for vs in finite for v in vs if v != 0]
    logy = (bool(mags) and all(max(vs, default=0) <= 0 or min(vs) >= 0 for vs in finite)
            and max(mags) / min(mags) > 10 ** 1.5)
    for s, vs in zip(losses, finite):
        if logy and vs and max(vs) <= 0:
            s.update(y=[-v for v in s["y"]], label="-" + s["label"], dash="6 3")
    write_svg(path, [svg_panel(0, 0, 520, 340, acc, f"{title} student test accuracy".strip(), "epoch", "accuracy (%)",
                               ylim=(0, 100), hlines=hl),
                     svg_panel(520, 0, 520, 340, losses, "loss terms", "epoch", "loss" + (" (log)" if logy else ""),
                               logy=logy)], 1040, 340)


# 3x5 bitmap digits and '(' ')' for labelling sample grids (one string of 15 bits per glyph, row-major).
_GLYPHS = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
           "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
           "8": "111101111101111", "9": "111101111001111", "(": "010100100100010", ")": "010001001001010",
           " ": "000000000000000"}


def _draw_text(canvas, text, top, left, scale, color=(0.0, 0.0, 0.0)):
    """Draw `text` (digits, parentheses, spaces) into canvas (3, H, W) with each font pixel a scale x scale block."""
    for i, ch in enumerate(text):
        g = torch.tensor([int(b) for b in _GLYPHS[ch]], dtype=torch.bool).view(5, 3)
        block = g.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        y, x = top, left + i * 4 * scale
        region = canvas[:, y:y + 5 * scale, x:x + 3 * scale]
        region[:, block] = torch.tensor(color).view(3, 1)


def save_sample_grid(path, x, labels=None, max_images=64, min_width=512):
    """Write a readable PNG of synthetic images x (N, C, H, W) in [0, 1] (any device/dtype).

    With labels (N,) (the teacher's predicted classes) there is one row per class present, labelled
    'class (count)', so collapse onto few classes shows as few, full rows; at most 64 images in all (the
    most populous 16 classes when more are present). Without labels: an 8-column grid. Images are upscaled by
    nearest neighbour so the grid is at least ~min_width px wide (each image at least ~64 px tall). Written
    atomically with torchvision.utils.save_image.
    """
    import torchvision.utils
    x = x.detach().float().cpu().clamp(0, 1)
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x[:, :3]
    n, _, h, w = x.shape
    if labels is not None:
        labels = torch.as_tensor(labels).detach().cpu().long().view(-1)[:n]
        classes, counts = labels.unique(return_counts=True)
        keep = counts.argsort(descending=True, stable=True)[:16]
        classes, counts = classes[keep].sort().values, counts[keep][classes[keep].argsort()]
        cols = min(16, max_images // len(classes), int(counts.max()))
        rows = [(int(c), int(k), x[labels == c][:cols]) for c, k in zip(classes, counts)]
    else:
        cols = 8
        rows = [(None, None, x[i:i + cols]) for i in range(0, min(n, max_images), cols)]
    s = max(1, math.ceil(min_width / (cols * w)), math.ceil(64 / h))  # and each image at least ~64 px tall
    ch, cw, pad = h * s, w * s, 2
    fs = max(2, min(6, ch // 12))  # font pixel size
    label_w = (4 * fs * max(len(f"{c} ({k})") for c, k, _ in rows) + 2 * fs) if labels is not None else 0
    canvas = torch.ones(3, len(rows) * (ch + pad) + pad, label_w + cols * (cw + pad) + pad)
    for r, (c, k, imgs) in enumerate(rows):
        top = pad + r * (ch + pad)
        if c is not None:
            _draw_text(canvas, f"{c} ({k})", top + (ch - 5 * fs) // 2, pad, fs)
        for j, img in enumerate(imgs):
            left = label_w + pad + j * (cw + pad)
            canvas[:, top:top + ch, left:left + cw] = img.repeat_interleave(s, 1).repeat_interleave(s, 2)
    tmp = f"{path}.tmp{os.getpid()}.png"
    torchvision.utils.save_image(canvas, tmp)  # a single (3, H, W) image: written as it is, no extra padding
    os.replace(tmp, path)
    return canvas.shape[1:]
