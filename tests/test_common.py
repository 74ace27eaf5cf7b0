"""Tests of common.py against spec/models.md and spec/bns.md (independent facts, not our own output)."""
import math
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
from common import (Normalize, bns_loss, build_model, evaluate, load_data, load_teacher,
                    random_crop_flip, register_bn_hooks, save_checkpoint, load_checkpoint, save_teacher)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# spec/models.md section 8: (params for C=10, C=100, C=200), state_dict keys, BN2d layers, BN channel sum, feature dim
SPEC_MODELS = {
    "resnet18": ((11_173_962, 11_220_132, 11_271_432), 122, 20, 4800, 512),
    "resnet34": ((21_282_122, 21_328_292, 21_379_592), 218, 36, 8512, 512),
    "wrn16_1": ((175_066, 180_916, 187_416), 82, 13, 464, 64),
    "wrn16_2": ((691_674, 703_284, 716_184), 83, 13, 912, 128),
    "wrn40_1": ((563_930, 569_780, 576_280), 226, 37, 1360, 64),
    "wrn40_2": ((2_243_546, 2_255_156, 2_268_056), 227, 37, 2704, 128),
    "vgg11": ((9_231_114, 9_277_284, 9_328_584), 58, 8, 2752, 512),
}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(SPEC_MODELS))
def test_model_params_keys_bn_and_shapes_match_spec(name):
    params, keys, n_bn, bn_ch, feat = SPEC_MODELS[name]
    for c, p in zip((10, 100, 200), params):
        assert n_params(build_model(name, c, 3)) == p
    m = build_model(name, 10, 3)
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(m.state_dict()) == keys and len(bns) == n_bn and sum(b.num_features for b in bns) == bn_ch
    logits, f = m(torch.randn(2, 3, 32, 32), return_features=True)
    assert logits.shape == (2, 10) and f.shape == (2, feat)
    if name.startswith(("vgg", "resnet")):  # spec: VGG and the adaptive-pool ResNet also take 64x64, same params
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_lenet_and_tiny_resnet_match_spec():
    assert n_params(build_model("lenet5", 10, 1)) == 61_706
    assert n_params(build_model("lenet5_half", 10, 1)) == 15_738
    assert len(build_model("lenet5", 10, 1).state_dict()) == 10
    logits, feat = build_model("lenet5", 10, 1)(torch.randn(2, 1, 32, 32), return_features=True)
    assert logits.shape == (2, 10) and feat.shape == (2, 120)
    tiny = build_model("resnet34_tiny", 200, 3)  # TA's ResNet_tiny: 21,379,656 params, 219 keys, conv1.bias
    assert n_params(tiny) == 21_379_656 and len(tiny.state_dict()) == 219
    assert "conv1.bias" in tiny.state_dict() and "layer2.0.downsample.0.weight" in tiny.state_dict()
    assert tiny(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    # a real ResNet-18 depth for the TinyImageNet student: [2,2,2,2] blocks, 20 BN layers
    r18t = build_model("resnet18_tiny", 200, 3)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in r18t.modules()) == 20


def test_generators_match_spec():
    """spec/models.md section 3 parameter counts and key facts."""
    g = common.Generator(nz=256)
    assert n_params(g) == 2_328_899 and len(g.state_dict()) == 21 and g.l1[0].weight.shape == (8192, 256)
    assert n_params(common.Generator(nz=512)) == 4_426_051
    x = g(torch.randn(4, 256))
    assert x.shape == (4, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert n_params(common.DAFLGenerator(nz=100, nc=1)) == 1_049_985
    assert n_params(common.DAFLGenerator(nz=1000, nc=3)) == 8_423_939
    assert n_params(common.DAFLGenerator(nz=256, nc=3, bn_eps=1e-5)) == 2_329_091
    d = common.DAFLGenerator(nz=100, nc=1)
    assert d.conv_blocks1[1].eps == 0.8 and not d.conv_blocks2[5].affine  # the eps=0.8 quirk, non-affine final BN
    assert d(torch.randn(8, 100)).shape == (8, 1, 32, 32)
    ta = common.TAGenerator()
    assert n_params(ta) == 8_423_939 and ta.l1.weight.shape == (8192, 1000)
    assert n_params(common.TAGenerator(img_size=64)) == 33_024_515
    assert ta.conv_blocks0[0].eps == 1e-5 and ta.conv_blocks1[1].eps == 0.8


def official_resnet_keys(blocks):
    """CIFAR ResNet key names written out from spec/models.md 1.1, independently of our classes."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for li, n in enumerate(blocks, 1):
        for j in range(n):
            p = f"layer{li}.{j}"
            keys += [f"{p}.conv1.weight"] + [f"{p}.bn1.{b}" for b in bn] + [f"{p}.conv2.weight"] + \
                    [f"{p}.bn2.{b}" for b in bn]
            if li > 1 and j == 0:
                keys += [f"{p}.shortcut.0.weight"] + [f"{p}.shortcut.1.{b}" for b in bn]
    return keys + ["linear.weight", "linear.bias"]


def official_wrn_keys(depth, widen):
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"]
    n = (depth - 4) // 6
    for g in (1, 2, 3):
        for i in range(n):
            p = f"block{g}.layer.{i}"
            keys += [f"{p}.bn1.{b}" for b in bn] + [f"{p}.conv1.weight"] + [f"{p}.bn2.{b}" for b in bn] + \
                    [f"{p}.conv2.weight"]
            if i == 0 and (g > 1 or widen > 1):
                keys.append(f"{p}.convShortcut.weight")
    return keys + [f"bn1.{b}" for b in bn] + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("name,keys", [("resnet34", official_resnet_keys([3, 4, 6, 3])),
                                       ("resnet18", official_resnet_keys([2, 2, 2, 2])),
                                       ("wrn16_1", official_wrn_keys(16, 1)), ("wrn40_2", official_wrn_keys(40, 2))])
@pytest.mark.parametrize("wrap", ["raw", "module", "state_dict", "compiled"])
def test_official_state_dict_loads_strictly(tmp_path, name, keys, wrap):
    ref = build_model(name, 10, 3).state_dict()
    assert set(ref) == set(keys)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(ref[k].shape, generator=g) if ref[k].is_floating_point() else ref[k].clone())
             for k in keys}
    saved = {"raw": state, "module": {"module." + k: v for k, v in state.items()},
             "state_dict": {"state_dict": state, "best_acc1": 95.7},
             "compiled": {"_orig_mod." + k: v for k, v in state.items()}}[wrap]
    torch.save(saved, tmp_path / "t.pth")
    model, meta = load_teacher(str(tmp_path / "t.pth"), "cifar10")
    assert meta["arch"] == name and meta["num_classes"] == 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_cifar100_raw_teacher_gets_cifar10_constants_and_fast_lenet_renames(tmp_path):
    """spec/models.md 6: DAFL/DFAD/TA CIFAR-100 teachers were trained on the CIFAR-10 constants; Fast's dict format
    uses CIFAR-100 statistics. 1.5: Fast's LeNet keys features.{0,3,6} / fc.{0,2} map onto conv1..3 / fc1, fc2."""
    sd = build_model("resnet18", 100, 3).state_dict()
    torch.save(sd, tmp_path / "raw.pt")
    torch.save({"state_dict": sd}, tmp_path / "fast.pth")
    assert load_teacher(str(tmp_path / "raw.pt"), "cifar100")[1]["mean"] == common.NORMALIZATION["cifar10"][0]
    assert load_teacher(str(tmp_path / "fast.pth"), "cifar100")[1]["mean"] == common.NORMALIZATION["cifar100"][0]
    lenet = build_model("lenet5", 10, 1).state_dict()
    rename = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "fc1": "fc.0", "fc2": "fc.2"}
    fast = {rename[k.split(".")[0]] + "." + k.split(".")[1]: v for k, v in lenet.items()}
    torch.save(fast, tmp_path / "lenet.pth")
    model, meta = load_teacher(str(tmp_path / "lenet.pth"), "mnist")
    assert meta["arch"] == "lenet5" and torch.equal(model.conv3.weight, lenet["conv3.weight"])


def test_whole_pickled_official_module_loads_without_running_its_code(tmp_path):
    """DAFL saves `torch.save(net)`: a pickle referencing resnet.ResNet. We load it with torch's weights-only
    unpickler and a stand-in class, in a process where the official module does not even exist."""
    src = tmp_path / "official"
    src.mkdir()
    (src / "resnet.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        class BasicBlock(nn.Module):
            def __init__(self, i, o, s=1):
                super().__init__()
                self.conv1 = nn.Conv2d(i, o, 3, s, 1, bias=False); self.bn1 = nn.BatchNorm2d(o)
                self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False); self.bn2 = nn.BatchNorm2d(o)
                self.shortcut = nn.Sequential()
                if s != 1 or i != o:
                    self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o))
        class ResNet(nn.Module):
            def __init__(self, blocks=(2, 2, 2, 2), num_classes=10):
                super().__init__()
                self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); self.bn1 = nn.BatchNorm2d(64)
                inp = 64
                for li, (p, n, s) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), 1):
                    layers = []
                    for st in [s] + [1] * (n - 1):
                        layers.append(BasicBlock(inp, p, st)); inp = p
                    setattr(self, f"layer{li}", nn.Sequential(*layers))
                self.linear = nn.Linear(512, num_classes)
        """))
    code = f"import sys, torch; sys.path.insert(0, {str(src)!r}); import resnet; " \
           f"torch.manual_seed(0); torch.save(resnet.ResNet(), {str(tmp_path / 'teacher')!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "resnet" not in sys.modules
    model, meta = load_teacher(str(tmp_path / "teacher"), "cifar10")
    assert meta["arch"] == "resnet18" and meta["source_format"] == "pickled-module"
    torch.manual_seed(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bns_loss_hand_values():
    """spec/bns.md 10: fresh BN (running mean 0, var 1) fed zeros gives ||1_C||_2 = sqrt(C); running stats equal
    to the batch mean and *biased* variance give exactly 0; the unbiased variance leaves a gap; L identical
    layers give L times the gap."""
    bn = nn.BatchNorm2d(3).eval()
    hooks = register_bn_hooks(bn)
    bn(torch.zeros(4, 3, 2, 2))
    assert bns_loss(hooks).item() == pytest.approx(math.sqrt(3))
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    bn(x)
    assert bns_loss(hooks).item() == pytest.approx(0.0, abs=1e-5)
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=True))
    bn(x)
    gap = torch.linalg.vector_norm(x.var((0, 2, 3), unbiased=True) - x.var((0, 2, 3), unbiased=False)).item()
    assert bns_loss(hooks).item() == pytest.approx(gap, rel=1e-4) and gap > 0
    # by hand, C=1: input values {0, 2} -> mean 1, biased var 1; running (0, 4) -> |1-4| + |1-0| = 4
    one = nn.BatchNorm2d(1).eval()
    one.running_var.fill_(4.0)
    h = register_bn_hooks(one)
    one(torch.tensor([0.0, 2.0]).view(2, 1, 1, 1))
    assert bns_loss(h).item() == pytest.approx(4.0)
    stack = nn.Sequential(nn.BatchNorm2d(1), nn.BatchNorm2d(1)).eval()  # identity BNs (mean 0, var 1): same gap twice
    hs = register_bn_hooks(stack)
    stack(torch.tensor([0.0, 2.0]).view(2, 1, 1, 1))
    assert bns_loss(hs).item() == pytest.approx(2 * (abs(1 - 1) + abs(1 - 0)), rel=1e-3)
    # gradient flows to the input only, and the hook records fp32 statistics
    xg = torch.randn(4, 3, 2, 2, requires_grad=True)
    bn(xg)
    bns_loss(hooks).backward()
    assert xg.grad is not None and hooks[0].mean.dtype == torch.float32


def test_random_crop_flip_matches_a_naive_loop():
    torch.manual_seed(1)
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert torch.equal(random_crop_flip(x, 0, False), x)
    torch.manual_seed(3)
    out = random_crop_flip(x, 2, False)
    torch.manual_seed(3)
    dy, dx = torch.randint(0, 5, (2,)), torch.randint(0, 5, (2,))
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert torch.equal(out[i], xp[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5])
    flipped = random_crop_flip(x.repeat(64, 1, 1, 1), 0, True)
    n_flipped = sum(torch.equal(f, x[i % 2].flip(2)) for i, f in enumerate(flipped))
    assert 10 < n_flipped < 118  # about half of 128


def test_checkpoint_roundtrip_is_atomic_and_restores_rng(tmp_path):
    path = str(tmp_path / "ck.pt")
    torch.manual_seed(5)
    np.random.seed(5)
    state = {"w": torch.randn(3), "epoch": 7, "rng": common.get_rng_state()}
    save_checkpoint(path, state)
    expected = (torch.rand(3), np.random.rand(), __import__("random").random())
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"]) and back["epoch"] == 7
    common.set_rng_state(back["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1]
    assert __import__("random").random() == expected[2]
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind
    m = build_model("wrn16_1", 10, 1)
    save_teacher(str(tmp_path / "t.pt"), m, "wrn16_1", "digits", 10, 1, 16, (0.3,), (0.4,), 98.5)
    m2, meta = load_teacher(str(tmp_path / "t.pt"), "digits")
    assert meta["test_acc"] == 98.5 and meta["image_size"] == 16 and meta["mean"] == [0.3]
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_evaluate_counts_correct_predictions():
    class Fixed(nn.Module):  # predicts class 0 for every input
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).repeat(x.shape[0], 1)
    loader = [(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 0])), (torch.zeros(1, 1, 2, 2), torch.tensor([0]))]
    assert evaluate(Fixed(), loader, Normalize((0.0,), (1.0,)), torch.device("cpu")) == pytest.approx(75.0)


def test_digits_loader_shapes_and_split():
    data = load_data("digits", batch_size=100)
    assert data.num_classes == 10 and data.in_channels == 1 and data.image_size == 16
    assert data.train.dataset_size == 1257 and data.test.dataset_size == 540  # 1,797 images, 30 % test, stratified
    x, y = next(iter(data.test))
    assert x.shape == (512, 1, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    labels = torch.cat([y for _, y in data.test])
    from sklearn.datasets import load_digits
    totals = np.bincount(load_digits().target)
    for count, total in zip(torch.bincount(labels).tolist(), totals):  # stratified: 30 % of each class, +-1
        assert abs(count - 0.3 * total) <= 1


# ---------- loaders read small files written here in the real on-disk formats ----------

def write_cifar(root, name, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder)
    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(rng.integers(0, classes, n)),
                "filenames": [f"{i}.png" for i in range(n)]}
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if name == "cifar10" else ["train", "test"]
    written = {}
    for f in files:
        b = batch(n_test if "test" in f else n_train)
        written[f] = b
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(b, fh)
    meta = {"label_names": [str(i) for i in range(10)]} if name == "cifar10" else \
        {"fine_label_names": [str(i) for i in range(100)], "coarse_label_names": [str(i) for i in range(20)]}
    with open(os.path.join(folder, "batches.meta" if name == "cifar10" else "meta"), "wb") as fh:
        pickle.dump(meta, fh)
    return written, label_key


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_reads_python_pickles(tmp_path, monkeypatch, name):
    import torchvision
    written, label_key = write_cifar(str(tmp_path), name)
    # our files are in the real format but cannot have the official md5 sums
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    data = load_data(name, str(tmp_path), batch_size=8)
    assert data.num_classes == (10 if name == "cifar10" else 100) and data.in_channels == 3 and data.image_size == 32
    assert data.train.dataset_size == (100 if name == "cifar10" else 20)
    x, y = next(iter(data.test))
    test = written["test_batch" if name == "cifar10" else "test"]
    first = torch.tensor(test["data"][0]).view(3, 32, 32).float() / 255  # CIFAR rows are channel-major 3x32x32
    assert x.shape == (10, 3, 32, 32) and torch.allclose(x[0], first)
    assert y.tolist() == [int(v) for v in test[label_key]]


def test_mnist_loader_reads_raw_idx_files_and_resizes_to_32(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes())
    data = load_data("mnist", str(tmp_path), batch_size=4)
    x, y = next(iter(data.test))
    assert data.num_classes == 10 and x.shape == (6, 1, 32, 32) and y.tolist() == [0, 1, 2, 3, 4, 5]
    assert data.mean == (0.1307,)


def write_images(folder, n, size, mode="RGB", seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
        Image.fromarray(arr, mode).save(os.path.join(folder, f"img_{i}.JPEG" if mode == "RGB" else f"img_{i}.png"))


def test_tinyimagenet_loader_uses_val_annotations_and_sorted_wnids(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # unsorted in wnids.txt, as the real file
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        write_images(str(root / "train" / w / "images"), 2, 64)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    write_images(str(root / "val" / "images"), 3, 64, seed=1)
    for i, w in enumerate(["n02", "n03", "n01"]):
        lines.append(f"img_{i}.JPEG\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    data = load_data("tinyimagenet", str(tmp_path), batch_size=4, test_batch_size=8)
    assert data.num_classes == 3 and data.image_size == 64 and data.mean == common.NORMALIZATION["tinyimagenet"][0]
    x, y = next(iter(data.test))
    assert x.shape == (3, 3, 64, 64) and y.tolist() == [1, 2, 0]  # n01->0, n02->1, n03->2
    xt, yt = next(iter(data.train))
    assert xt.shape[1:] == (3, 64, 64)


def test_folder_loader_reads_imagefolder_and_computes_stats(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog"):
            write_images(str(tmp_path / split / c), n, 12, mode="L", seed=len(c) + n)
    data = load_data("folder", str(tmp_path), batch_size=4, test_batch_size=10)
    assert (data.num_classes, data.in_channels, data.image_size) == (2, 1, 12)
    x, y = next(iter(data.test))
    assert x.shape == (4, 1, 12, 12) and sorted(y.tolist()) == [0, 0, 1, 1]
    pixels = torch.cat([xb for xb, _ in data.train]).double()
    assert data.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-3)
    assert data.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-3)
    resized = load_data("folder", str(tmp_path), batch_size=4, image_size=8, in_channels=3, mean=(0.5,) * 3,
                        std=(0.5,) * 3)
    assert next(iter(resized.train))[0].shape[1:] == (3, 8, 8)


# ---------- the digits teacher and bad input through the real command line ----------

def test_digits_teacher_reaches_97_percent(digits_teacher):
    """Acceptance 1 of issue 3: the default recipe's teacher scores >= 97 % on 540 held-out real digits
    (measured 99.26 % in 33 s on 2 cores)."""
    model, meta = load_teacher(digits_teacher, "digits")
    data = load_data("digits")
    acc = evaluate(model, data.test, Normalize(meta["mean"], meta["std"]), torch.device("cpu"))
    assert acc >= 97.0 and acc == pytest.approx(meta["test_acc"])


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_truncated_resume_state_gives_one_line_and_leaves_file_untouched(tmp_path):
    out = tmp_path / "t.pt"
    state = tmp_path / "t.state.pt"
    save_checkpoint(str(state), {"epoch": 1, "model": build_model("wrn16_2", 10, 1).state_dict()})
    blob = state.read_bytes()[:5000]
    state.write_bytes(blob)
    r = run_script("train_teacher.py", "--out", str(out), "--resume")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "corrupt or truncated" in lines[0]
    assert state.read_bytes() == blob and not out.exists()


def test_truncated_teacher_and_class_mismatch_exit_2_untouched(tmp_path):
    teacher = tmp_path / "t.pt"
    save_teacher(str(teacher), build_model("wrn16_1", 10, 1), "wrn16_1", "digits", 10, 1, 16, (0.3,), (0.4,), 90.0)
    blob = teacher.read_bytes()
    teacher.write_bytes(blob[: len(blob) // 2])
    r = run_script("train_teacher.py", "--out", str(teacher))  # an existing teacher is read to report it
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert teacher.read_bytes() == blob[: len(blob) // 2]
    # class-count mismatch: a resume state for 10 classes, a folder dataset with 2 classes
    for split in ("train", "test"):
        for c in ("a", "b"):
            write_images(str(tmp_path / "data" / split / c), 2, 16, mode="L")
    state = tmp_path / "f.state.pt"
    save_checkpoint(str(state), {"epoch": 1, "arch": "wrn16_2", "num_classes": 10})
    before = state.read_bytes()
    r = run_script("train_teacher.py", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--arch",
                   "wrn16_2", "--out", str(tmp_path / "f.pt"), "--resume")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "10 classes" in line[0] and "2" in line[0]
    assert state.read_bytes() == before and not (tmp_path / "f.pt").exists()


def test_teacher_resume_equals_uninterrupted(tmp_path):
    """A teacher run stopped after epoch 1 of 3 and resumed ends with the same weights as an uninterrupted one. The
    learning rate drops after epoch 2, past the resume point, so a scheduler that is not restored misses the drop."""
    import train_teacher
    common_args = ["--epochs", "3", "--milestones", "2", "--batch-size", "256"]
    train_teacher.main(common_args + ["--out", str(tmp_path / "a.pt")])
    a = load_teacher(str(tmp_path / "a.pt"), "digits")[0].state_dict()
    # interrupted run: the same recipe but only 1 epoch written to the state file, then --resume for the rest
    train_teacher.main(common_args + ["--stop-after", "1", "--out", str(tmp_path / "b.pt")])
    assert not (tmp_path / "b.pt").exists() and (tmp_path / "b.state.pt").exists()
    train_teacher.main(common_args + ["--out", str(tmp_path / "b.pt"), "--resume"])
    b = load_teacher(str(tmp_path / "b.pt"), "digits")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shared_flag_checks_fill_defaults_refuse_bad_values_and_name_the_run(capsys):
    """fill_defaults / check_positive / finish_run_args, which every method script's parse_args uses: None takes the
    paper value and a given value stays; a non-positive integer, a --stop-after outside the run and an unusable
    learning rate each exit 2 in one line naming the flag; the teacher and run directory get their default paths."""
    import argparse
    args = argparse.Namespace(dataset="digits", epochs=None, iters=3, stop_after=None, lr_g=1e-3, lr_s=0.1,
                              teacher=None, out=None, seed=4)
    common.fill_defaults(args, {"epochs": 8, "iters": 20})
    assert (args.epochs, args.iters) == (8, 3)
    common.check_positive(args, "epochs", "iters")
    assert common.finish_run_args(args, "m") is args
    assert args.teacher == os.path.join("teachers", "digits_wrn16_2.pt")
    assert args.out == os.path.join("runs", "m-digits-digits_wrn16_2-s4")
    for change, needle in (({"iters": 0}, "--iters must be >= 1"), ({"stop_after": 8}, "--stop-after 8 must lie in"),
                           ({"lr_s": float("nan")}, "--lr-s nan is not a usable"), ({"lr_g": 1e38}, "--lr-g 1e+38")):
        bad = argparse.Namespace(**{**vars(args), "out": None, **change})
        with pytest.raises(SystemExit) as e:
            common.check_positive(bad, "epochs", "iters")
            common.finish_run_args(bad, "m")
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert bad.out is None  # refused before a run directory is even named
