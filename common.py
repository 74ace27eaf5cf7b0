"""Shared pieces of dfkd-ref: what every data-free KD method needs, each written once.

Contents, in reading order:
  1. errors            fail(): one line on stderr, exit code 2
  2. models            CIFAR ResNet-18/34, 64x64 ResNet-18/34, WRN-16/40-1/2, VGG-11-BN, LeNet-5(-half), build_model()
  3. generators        Generator (Fast/CMI/SSD-KD), DAFLGenerator (DAFL, DFAD), TAGenerator (TA-DFKD)
  4. BN statistics     BNStatsHook, register_bn_hooks(), bns_loss()     (spec/bns.md)
  5. data              load_data() for digits, mnist, cifar10, cifar100, tinyimagenet, folder; Normalize;
                       random_crop_flip() (batch augmentation on the device)
  6. teachers          save_teacher(), load_teacher() (ours and the official repos' formats), check_teacher_data()
  7. run plumbing      device, seeding, autocast, atomic checkpoints, RNG state, run directory, metric logger,
                       evaluate(), summary.json and the final line

State-dict key names follow the official implementations (spec/models.md), so published teachers load with
strict=True. Nothing here is method-specific: no loss other than the BN-statistics formula, no update step,
no schedule, no argparse.
"""
import json
import math
import os
import pickle
import random
import sys
import time
import warnings
import zipfile

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


def save_teacher(path, model, arch, dataset, num_classes, in_channels, image_size, mean, std, test_acc, **extra):
    save_checkpoint(path, {"format": TEACHER_FORMAT, "arch": arch, "dataset": dataset, "num_classes": num_classes,
                           "in_channels": in_channels, "image_size": image_size, "mean": list(mean),
                           "std": list(std), "test_acc": float(test_acc),
                           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra})


class _PickledModule(nn.Module):
    """Stand-in class for the official repos' pickled modules (resnet.ResNet, lenet.LeNet5, ...): unpickling only
    restores the module tree and its tensors, from which we take the state_dict. No code from the file runs."""


def _load_pickled_module(path):
    """Load a whole pickled nn.Module (DAFL/PRE `torch.save(net)`) with torch's weights-only unpickler, allowing only
    torch.nn layer classes and our stand-in for the official model classes."""
    import torch.serialization as ser
    shims = []
    for mod in ("resnet", "lenet", "networks.resnet", "networks.lenet", "network.resnet_8x", "network.lenet"):
        for cls in ("ResNet", "BasicBlock", "Bottleneck", "LeNet5", "LeNet5Half", "ResNet_tiny"):
            shims.append((_PickledModule, f"{mod}.{cls}"))
    layers = [nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear, nn.Sequential, nn.ReLU, nn.MaxPool2d,
              nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Tanh, nn.Flatten, nn.Identity, set]
    with ser.safe_globals(shims + layers):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.state_dict()


def _guess_arch(state):
    """The architecture whose state_dict has exactly these keys and shapes (num_classes / channels read off)."""
    head = next((state[k] for k in ("linear.weight", "fc.weight", "classifier.weight", "fc2.weight") if k in state), None)
    first = next((v for k, v in state.items() if k.endswith("weight") and v.ndim == 4), None)
    if head is None or first is None:
        return None, None, None
    num_classes, in_channels = head.shape[0], first.shape[1]
    for name in MODELS:
        ref = build_model(name, num_classes, in_channels).state_dict()
        if ref.keys() == state.keys() and all(ref[k].shape == state[k].shape for k in ref):
            return name, num_classes, in_channels
    return None, num_classes, in_channels


def load_teacher(path, dataset=None, device="cpu", arch=None):
    """Load a teacher -> (model in eval mode, frozen, on device; meta dict).

    Accepts: ours (save_teacher); a raw state_dict (DFAD, TA-DFKD); a dict with 'state_dict' or 'model' (Fast/CMI);
    a whole pickled module (DAFL, PRE). Strips 'module.' (DataParallel) and '_orig_mod.' (torch.compile) prefixes,
    renames Fast's LeNet keys, infers the architecture from keys and shapes unless `arch` is given, loads strictly.
    Official files carry no normalisation: it is taken from the dataset, with CIFAR-100 raw state_dicts (DAFL, DFAD,
    TA) getting the CIFAR-10 constants their code trained with (spec/models.md 6).
    """
    if not os.path.isfile(path):
        hint = "train one with: python train_teacher.py" + (f" --dataset {dataset}" if dataset else "")
        fail(f"teacher checkpoint {path} not found; {hint}, or pass --teacher PATH")
    fmt = "raw"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            fail(f"teacher checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0]}); re-download or "
                 f"re-train it")
        try:
            obj, fmt = _load_pickled_module(path), "pickled-module"
        except Exception:
            fail(f"{path} is a whole pickled model whose classes cannot be loaded safely; convert it once in the "
                 f"official repo: torch.save(torch.load('{path}', weights_only=False).state_dict(), 'teacher_sd.pt')")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        fail(f"teacher checkpoint {path} is corrupt or truncated ({type(e).__name__}); re-download or re-train it")
    if not isinstance(obj, dict):
        fail(f"{path} holds a {type(obj).__name__}, not a model checkpoint; pass a state_dict or a dfkd-ref teacher")
    meta = {}
    if obj.get("format") == TEACHER_FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        state, fmt = obj["state_dict"], "dfkd-ref"
    elif "state_dict" in obj or "model" in obj:
        state, fmt = obj.get("state_dict", obj.get("model")), "wrapped"
    else:
        state = obj
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        fail(f"{path} holds no state_dict of tensors; pass a teacher saved by train_teacher.py or an official one")
    clean = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    if "features.0.weight" in clean:  # Fast/CMI LeNet naming
        clean = {next((new + k[len(old):] for old, new in FAST_LENET_RENAME.items() if k.startswith(old)), k): v
                 for k, v in clean.items()}
    guessed, num_classes, in_channels = _guess_arch(clean)
    arch = arch or meta.get("arch") or guessed
    if arch is None:
        fail(f"{path}: its keys and shapes match none of {', '.join(MODELS)}; rename its keys to one of these "
             f"architectures (README: Loading an official teacher checkpoint)")
    model = build_model(arch, meta.get("num_classes", num_classes), meta.get("in_channels", in_channels))
    try:
        model.load_state_dict(clean, strict=True)
    except RuntimeError as e:
        fail(f"{path} does not fit architecture {arch} ({str(e).splitlines()[0]}); check that the file is an "
             f"unmodified checkpoint of {arch}, or re-save it with train_teacher.py")
    if fmt != "dfkd-ref":
        ds = dataset or "unknown"
        if ds == "cifar100" and fmt in ("raw", "pickled-module"):
            mean, std = NORMALIZATION["cifar10"]  # DAFL/DFAD/TA/PRE trained CIFAR-100 on the CIFAR-10 constants
        else:
            mean, std = NORMALIZATION.get(ds, (None, None))
        meta = {"arch": arch, "dataset": ds, "num_classes": num_classes, "in_channels": in_channels,
                "image_size": None, "mean": mean, "std": std, "test_acc": None}
    meta["source_format"] = fmt
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


# ----------------------------------------------------------------------------------------------------------
# 7. Run plumbing
# ----------------------------------------------------------------------------------------------------------


def pick_device(name=None):
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            fail(f"--device {name} asked for but CUDA is not available; drop --device or pass --device cpu")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def autocast(device, amp):
    """bf16/fp16 autocast on CUDA for `--amp bf16|fp16`; a no-op on the CPU and for `--amp off`."""
    enabled = amp != "off" and torch.device(device).type == "cuda"
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16, enabled=enabled)


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


def save_checkpoint(path, obj):
    """Atomic save: write a temporary file in the same folder, fsync, then os.replace, so a crash never leaves a
    half-written checkpoint where a good one was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a run checkpoint (weights_only: no code in it runs). Missing or corrupt -> one line, exit 2."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} not found; start without --resume, or point --out at the run to continue")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it to start over, or restore it")


def prepare_run_dir(out, resume):
    """Check the run directory before anything is written: a used --out needs --resume, --resume needs a run."""
    used = any(os.path.exists(os.path.join(out, f)) for f in ("checkpoint.pt", "metrics.jsonl", "summary.json"))
    if resume and not os.path.exists(os.path.join(out, "checkpoint.pt")):
        fail(f"--resume given but {out}/checkpoint.pt does not exist; drop --resume to start a new run")
    if used and not resume:
        fail(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    os.makedirs(out, exist_ok=True)


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
            fail(f"loss {k} became {v} at step {step}; lower the learning rate or resume from the last checkpoint")


class MetricLogger:
    """metrics.jsonl (one JSON object per evaluation) plus one human line with throughput and ETA. On resume, records
    past the checkpoint's epoch (written after it, before the crash) are dropped so the history stays exact."""

    def __init__(self, out, total_epochs, start_epoch=0):
        self.path = os.path.join(out, "metrics.jsonl")
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
    """Top-1 accuracy in percent on real data: no grad, eval mode (restored after), autocast on CUDA, correct counts
    accumulated on the device and read once (SYNC: one per evaluation)."""
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
