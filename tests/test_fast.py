"""Tests for fast.py: hand-derived values from spec/fast.md section 8, meta-gradient equivalences, resume, bad input,
and one reduced-budget digits run."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import fast
from common import Generator, build_model, register_bn_hooks, save_teacher


# --------------------------------------------------------------------------------------------------------------
# Losses (spec 8.1-8.4, 8.10)
# --------------------------------------------------------------------------------------------------------------

def test_kd_tempered_value():
    """Spec 8.1, in fp64: s = [0, 0], t = [ln 3, 0]. T = 1: p_t = [3/4, 1/4], p_s = [1/2, 1/2],
    KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308120. T = 20: p_t = softmax([ln 3 / 20, 0]) = [0.5137292, 0.4862708],
    400 * KL = 0.1508117. Identical logits give 0; swapping teacher and student changes the value."""
    s, t = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[math.log(3), 0.0]], dtype=torch.float64)
    assert abs(fast.loss_kd(s, t, 1.0).item() - 0.1308120) < 1e-7
    assert abs(0.75 * math.log(1.5) + 0.25 * math.log(0.5) - 0.1308120) < 1e-7
    p = torch.softmax(t / 20, 1)[0].tolist()
    assert abs(p[0] - 0.5137292) < 1e-7 and abs(p[1] - 0.4862708) < 1e-7
    assert abs(fast.loss_kd(s, t, 20.0).item() - 0.1508117) < 1e-7
    assert fast.loss_kd(t, t, 20.0).item() == 0.0
    assert abs(fast.loss_kd(t, s, 1.0).item() - 0.1308120) > 1e-3
    # fp32 inputs (the training path): within the spec's fp32 tolerance of the exact value
    assert abs(fast.loss_kd(s.float(), t.float(), 20.0).item() - 0.1508117) < 5e-5


def test_loss_adv_worked_example():
    """Spec 8.2: teacher rows [[2,0,0],[0,1,0]], student [[1,0,0],[1,0,0]]: per-row KL(p_t || p_s) =
    [0.0988860, 0.3641753]; argmax agrees only in row 0 (mask [1, 0]), mean over both rows -> -0.0988860 / 2 =
    -0.0494430; times adv 1.33 = -0.0657592. No agreeing row -> 0."""
    t = torch.tensor([[2.0, 0, 0], [0, 1, 0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 0, 0], [1, 0, 0]], dtype=torch.float64)
    kl = fast.kl_rows(s, t)
    assert torch.allclose(kl, torch.tensor([0.0988860, 0.3641753], dtype=torch.float64), atol=1e-7)
    assert abs(fast.loss_adv(s, t).item() + 0.0494430) < 1e-7
    assert abs(1.33 * fast.loss_adv(s, t).item() + 0.0657592) < 1e-7
    assert fast.loss_adv(torch.tensor([[0.0, 1, 0], [1, 0, 0]]), t.float()).item() == 0.0


def test_loss_oh_value():
    """Spec 8.3: CE([2, 0, 0], y = 1) = log(e^2 + 1 + 1) - 0 = ln 9.3890561 = 2.2395448."""
    v = fast.loss_oh(torch.tensor([[2.0, 0, 0]], dtype=torch.float64), torch.tensor([1])).item()
    assert abs(v - 2.2395448) < 1e-7 and abs(math.log(math.exp(2) + 2) - 2.2395448) < 1e-7


def test_bn_momentum_blend():
    """Spec 8.4: one channel, running mean 0, var 1, inputs {1, 3}: mu = 2, biased var = 1, so
    R_BN = |1 - 1| + |0 - 2| = 2. With state (0, 1), rho = 0.9: blended (0.1*2 + 0.9*0, 0.1*1 + 0.9*1) = (0.2, 1.0),
    R_BN = 0.2. update_mmt with stats (1, 1) then (5, 1): state (1, 1), then (0.9 + 0.5, 0.9 + 0.1) = (1.4, 1.0).
    Spec 8.10: a BN-free teacher has no hooks, R_BN = 0; spec 8.15: wrn16_x 13 terms, wrn40_2 37."""
    bn = nn.BatchNorm2d(1).eval()
    hooks = register_bn_hooks(bn)
    bn(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1))
    assert hooks[0].mean.item() == 2.0 and hooks[0].var.item() == 1.0
    assert abs(fast.loss_bn(hooks, [None], 0.9).item() - 2.0) < 1e-6
    mmt = [[torch.zeros(1), torch.ones(1)]]
    assert abs(fast.loss_bn(hooks, mmt, 0.9).item() - 0.2) < 1e-6
    state = [None]
    for m in (1.0, 5.0):
        state = fast.update_bn_mmt([SimpleNamespace(mean=torch.tensor([m]), var=torch.tensor([1.0]))], state, 0.9)
    assert abs(state[0][0].item() - 1.4) < 1e-6 and abs(state[0][1].item() - 1.0) < 1e-6
    assert fast.loss_bn([], [], 0.9) == 0
    assert len(register_bn_hooks(build_model("wrn16_1", 10))) == 13
    assert len(register_bn_hooks(build_model("wrn16_2", 10))) == 13
    assert len(register_bn_hooks(build_model("wrn40_2", 10))) == 37


# --------------------------------------------------------------------------------------------------------------
# Method pieces: best-of-k, REPTILE, reset_l0, pool (spec 8.7, 8.9, 8.11, 8.14)
# --------------------------------------------------------------------------------------------------------------

def test_select_best_worked_example_and_no_sync(monkeypatch):
    """Spec 8.9: pre-step losses [753.57, 2601.33, 871.02] (k = 3) -> iteration 0's batch is output. Losses [5, 3, 4]
    -> iteration 1; a tie [3, 3] keeps the earlier batch (strictly lower). Then again with every tensor-to-host
    conversion (.item(), bool(), float(), int(), .tolist(), .cpu(), .numpy()) made to raise: no host sync."""
    def run(losses):
        best = None
        for i, v in enumerate(losses):
            best = fast.select_best(best, torch.full((2, 1, 2, 2), float(i)), torch.tensor(v), i)
        return best
    x, loss, idx = run([753.57, 2601.33, 871.02])
    assert torch.all(x == 0) and idx.item() == 0 and abs(loss.item() - 753.57) < 1e-3
    x, _, idx = run([5.0, 3.0, 4.0])
    assert torch.all(x == 1) and idx.item() == 1
    x, _, idx = run([3.0, 3.0])
    assert torch.all(x == 0) and idx.item() == 0

    def sync(*a, **k):
        raise AssertionError("host sync in select_best")
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    x, loss, idx = run([753.57, 2601.33, 871.02])
    monkeypatch.undo()
    assert torch.all(x == 0) and idx.item() == 0


def test_reptile_first_step_by_hand():
    """Spec 8.7: REPTILE from theta = [1, -2, 0.5] toward theta' = [0.9, -1, 0.5], fresh meta Adam lr 0.01,
    betas (0.5, 0.999): g = 67 (theta - theta') = [6.7, -67, 0]; Adam's first step is lr * g / (|g| + eps) =
    lr * sign(g), so theta -> [0.99, -1.99, 0.5], the same with factor 67 or 1 (the factor is inert)."""
    for factor in (67.0, 1.0):
        meta, clone = nn.Module(), nn.Module()
        meta.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        clone.w = nn.Parameter(torch.tensor([0.9, -1.0, 0.5]))
        opt = torch.optim.Adam(meta.parameters(), lr=0.01, betas=(0.5, 0.999))
        fast.reptile_grad(meta, clone, factor)
        assert torch.allclose(meta.w.grad, factor * torch.tensor([0.1, -1.0, 0.0]), atol=1e-6)
        opt.step()
        assert torch.allclose(meta.w.detach(), torch.tensor([0.99, -1.99, 0.5]), atol=1e-6)


def test_reset_l0_values():
    """Spec 8.14: after reset_l0, l1.0.weight ~ N(0, 0.02) (8192 x 256 entries: std 0.02 to 1 %), l1.0.bias = 0,
    conv_blocks.0 (BN, 128 channels) weight ~ N(0, 0.02) (|mean| < 0.01, std within 25 %), bias 0; the rest of the
    generator is untouched. --reset-l0-gamma 1 centres the BN weight at 1 instead."""
    torch.manual_seed(0)
    g = Generator(256, 64, 32, 3)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    fast.reset_l0(g)
    w, gamma = g.l1[0].weight, g.conv_blocks[0].weight
    assert abs(w.std().item() - 0.02) < 2e-4 and torch.all(g.l1[0].bias == 0)
    assert abs(gamma.mean().item()) < 0.01 and 0.015 < gamma.std().item() < 0.025
    assert torch.all(g.conv_blocks[0].bias == 0)
    reset = {"l1.0.weight", "l1.0.bias", "conv_blocks.0.weight", "conv_blocks.0.bias"}
    assert all(torch.equal(v, before[k]) for k, v in g.state_dict().items() if k not in reset)
    fast.reset_l0(g, gamma_mean=1.0)
    assert abs(g.conv_blocks[0].weight.mean().item() - 1.0) < 0.01


def test_pool_png_quantisation_and_state():
    """Spec 8.11: Fast's PNG path truncates: 0.999 -> 254 (254.745) -> 0.996078; 0.5 -> 127 (127.5) -> 0.498039;
    1.0 -> 255; 0.0039 -> 0 (0.9945); out of range clamps. state_dict keeps only the filled rows and restores them."""
    pool = fast.ImagePool(8, (1, 1, 1), "cpu")
    pool.add(torch.tensor([0.999, 0.5, 1.0, 0.0039, 1.3, -0.2]).view(6, 1, 1, 1))
    assert pool.n == 6 and pool.images.flatten()[:6].tolist() == [254, 127, 255, 0, 255, 0]
    got = pool.get(torch.arange(2)).flatten().tolist()
    assert abs(got[0] - 0.996078) < 1e-6 and abs(got[1] - 0.498039) < 1e-6
    other = fast.ImagePool(8, (1, 1, 1), "cpu")
    other.load_state_dict(pool.state_dict())
    assert other.n == 6 and torch.equal(other.images, pool.images) and len(pool.state_dict()["images"]) == 6


# --------------------------------------------------------------------------------------------------------------
# Defaults (spec 2, 8.5, 8.6, 8.16)
# --------------------------------------------------------------------------------------------------------------

def test_presets_and_paper_defaults():
    """Spec 2: Fast2 / Fast5 / Fast10 = (lr_g, lr_z) (5e-3, 0.015) / (3e-3, 0.01) / (2e-3, 0.01), meta lr = lr_g * k
    = 0.01 / 0.015 / 0.02 (spec 8.6); default preset Fast5 [spec R]; the script's schedule; explicit flags win."""
    for k, want in ((2, (5e-3, 0.015, 0.01)), (5, (3e-3, 0.01, 0.015)), (10, (2e-3, 0.01, 0.02))):
        a = fast.parse_args(["--dataset", "cifar10", "--g-steps", str(k)])
        assert a.g_steps == k and all(abs(x - y) < 1e-12 for x, y in zip((a.lr_g, a.lr_z, a.lr_meta), want))
    a = fast.parse_args(["--dataset", "cifar100"])
    assert a.g_steps == 5 and a.meta == "maml" and a.last_k == 20
    assert (a.epochs, a.warmup, a.batch_size, a.synthesis_batch_size, a.kd_steps) == (220, 20, 256, 256, 400)
    assert (a.lr, a.weight_decay, a.t_max, a.eta_min, a.T, a.bn_mmt) == (0.2, 1e-4, 200, 2e-4, 20.0, 0.9)
    assert (a.nz, a.ngf, a.reset_l0_at, a.crop_padding, a.flip, a.reset_l0_gamma) == (256, 64, 140, 4, 1, 0.0)
    a = fast.parse_args(["--dataset", "cifar10", "--g-steps", "2", "--lr-g", "1e-3"])
    assert (a.lr_g, a.lr_z, abs(a.lr_meta - 2e-3) < 1e-12) == (1e-3, 0.015, True)
    d = fast.parse_args([])  # digits: the ratios of C10 (spec 10)
    assert (d.epochs, d.warmup, d.reset_l0_at, d.t_max, d.crop_padding, d.flip) == (22, 2, 14, 20, 2, 0)


def test_pair_weights_from_parsed_arguments():
    """Spec 2: (adv, bn, oh) per pair of fast_cifar.sh, resolved into the parsed arguments from the teacher's arch;
    digits' wrn16_2 -> wrn16_1 takes the WRN row [spec R]; an explicit --adv is kept."""
    table = {("resnet34", "resnet18"): (1.33, 10.0, 0.5), ("vgg11", "resnet18"): (1.0, 10.0, 0.5),
             ("wrn40_2", "wrn16_1"): (1.1, 10.0, 0.4), ("wrn40_2", "wrn40_1"): (1.1, 10.0, 0.4),
             ("wrn40_2", "wrn16_2"): (1.1, 10.0, 0.4), ("wrn16_2", "wrn16_1"): (1.1, 10.0, 0.4)}
    for (t, s), want in table.items():
        a = fast.resolve_pair(fast.parse_args(["--dataset", "cifar10", "--student", s]), t)
        assert (a.adv, a.bn, a.oh) == want, (t, s)
    a = fast.resolve_pair(fast.parse_args(["--dataset", "cifar10"]), "resnet34")
    assert a.student == "resnet18"
    a = fast.resolve_pair(fast.parse_args(["--dataset", "cifar10", "--adv", "2.0"]), "vgg11")
    assert (a.student, a.adv, a.bn, a.oh) == ("resnet18", 2.0, 10.0, 0.5)


def test_student_lr_at_chosen_epochs(tiny_ctx):
    """Spec 8.5 with the scheduler build() makes from the CIFAR defaults (T_max 200, eta_min 2e-4, stepped after
    epochs >= warmup = 20): lr of epoch 0, 19, 20 = 0.2; 21 -> 2e-4 + 0.1998 (1 + cos(pi/200)) / 2 = 0.1999877;
    70 -> 0.17074; 120 -> 0.1001; 219 -> 2.123e-4."""
    a = fast.parse_args(["--dataset", "cifar10", "--student", "wrn16_1", "--synthesis-batch-size", "1"])
    ctx = fast.build(a, tiny_ctx["teacher"], tiny_ctx["data"], torch.device("cpu"))
    lrs = {}
    for epoch in range(a.epochs):
        lrs[epoch] = ctx["opt_s"].param_groups[0]["lr"]
        if epoch >= a.warmup:
            ctx["opt_s"].step(), ctx["sched_s"].step()
    assert lrs[0] == lrs[19] == lrs[20] == 0.2
    for e, want, tol in ((21, 0.1999877, 1e-7), (70, 0.17074, 1e-5), (120, 0.1001, 1e-7), (219, 2.123e-4, 1e-7)):
        assert abs(lrs[e] - want) < tol, (e, lrs[e])


# --------------------------------------------------------------------------------------------------------------
# Synthesis on a tiny setup: meta-gradients, reset call, frozen teacher
# --------------------------------------------------------------------------------------------------------------

def make_ctx(meta="maml", g_steps=3, reset_at=0):
    torch.manual_seed(0)
    args = fast.parse_args(["--synthesis-batch-size", "8", "--batch-size", "8", "--g-steps", str(g_steps),
                            "--lr-g", "1e-2", "--lr-z", "1e-2", "--nz", "8", "--ngf", "4", "--epochs", "6",
                            "--warmup", "1", "--student", "wrn16_1", "--meta", meta, "--crop-padding", "1",
                            "--reset-l0-at", str(reset_at)])
    args.adv, args.bn, args.oh = 1.1, 10.0, 0.4
    teacher = build_model("wrn16_1", 10, 1).eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial running statistics
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
    data = SimpleNamespace(in_channels=1, image_size=8, num_classes=10, mean=(0.5,), std=(0.25,))
    ctx = fast.build(args, teacher, data, torch.device("cpu"))
    ctx["data"] = data
    for call in (1, 2):  # the momentum state exists and adv is on from call 1 (warmup 1)
        x, _ = fast.synthesize(ctx, call)
        ctx["pool"].add(x)
    return ctx


@pytest.fixture
def tiny_ctx():
    return make_ctx()


def spy_clone(monkeypatch, ctx, record):
    """Wrap clone_generator: keep the clone and record every gradient that reaches its parameters."""
    real = fast.clone_generator

    def spy(gen):
        clone = real(gen)
        record["clone"] = clone
        for i, p in enumerate(clone.parameters()):
            p.register_hook(lambda g, i=i: record.setdefault("grads", []).append((i, g.clone())))
        return clone
    monkeypatch.setattr(fast, "clone_generator", spy)


def test_maml_meta_gradient_is_sum_of_inner_gradients(tiny_ctx, monkeypatch):
    """Spec 8.8 (fomaml_grad): after one call the meta-generator's .grad equals the sum over the k = 3 inner
    iterations of the clone's gradient at that iterate (recorded independently by tensor hooks); the meta Adam
    steps exactly once per call."""
    ctx, rec, steps = tiny_ctx, {}, []
    spy_clone(monkeypatch, ctx, rec)
    ctx["opt_g"].step = lambda *a, **k: steps.append(1)  # keep .grad as accumulated
    before = [p.detach().clone() for p in ctx["generator"].parameters()]
    fast.synthesize(ctx, 3)
    params = list(ctx["generator"].parameters())
    assert len(rec["grads"]) == 3 * len(params) and steps == [1]
    for i, p in enumerate(params):
        assert torch.allclose(p.grad, sum(g for j, g in rec["grads"] if j == i), atol=1e-6), i
        assert torch.equal(p.detach(), before[i])  # only the (disabled) meta step may move the meta-generator


def test_reptile_meta_gradient_in_synthesize(monkeypatch):
    """Spec 8.8 (reptile_grad): after one REPTILE call the meta .grad equals 67 (theta_before - theta'_k), theta'_k
    the clone after its last inner step; one meta step per call."""
    ctx, rec, steps = make_ctx("reptile"), {}, []
    spy_clone(monkeypatch, ctx, rec)
    ctx["opt_g"].step = lambda *a, **k: steps.append(1)
    before = [p.detach().clone() for p in ctx["generator"].parameters()]
    fast.synthesize(ctx, 3)
    assert steps == [1]
    for p, p0, pf in zip(ctx["generator"].parameters(), before, rec["clone"].parameters()):
        assert not torch.equal(pf.detach(), p0)
        assert torch.allclose(p.grad, 67.0 * (p0 - pf.detach()), atol=1e-6)


def test_non_meta_updates_generator_in_place(monkeypatch):
    """--meta none (Fast's fast.py): no clone and no meta optimiser; the generator itself moves each call."""
    ctx = make_ctx("none")
    monkeypatch.setattr(fast, "clone_generator", lambda g: pytest.fail("--meta none must not clone"))
    before = [p.detach().clone() for p in ctx["generator"].parameters()]
    fast.synthesize(ctx, 3)
    assert ctx["opt_g"] is None
    assert all(not torch.equal(p.detach(), b) for p, b in zip(ctx["generator"].parameters(), before))


@pytest.mark.parametrize("meta,calls", [("maml", [4]), ("reptile", [4]), ("none", [])])
def test_reset_l0_fires_at_its_call(monkeypatch, meta, calls):
    """Spec 8.16: reset_l0 fires iff call == reset_l0_at (1-based), on the meta-generator; Fast's non-meta
    synthesizer never calls it (OFFICIAL)."""
    ctx, seen = make_ctx(meta, g_steps=2, reset_at=4), []
    monkeypatch.setattr(fast, "reset_l0", lambda g, gm=0.0: seen.append((call, g is ctx["generator"], gm)))
    for call in range(3, 7):
        fast.synthesize(ctx, call)
    assert [c for c, is_meta, _ in seen] == calls and all(is_meta and gm == 0.0 for _, is_meta, gm in seen)


def test_teacher_unchanged_and_gradient_free(tiny_ctx):
    """The teacher is frozen: after synthesis (gradients flow through it to x) and KD steps, its state_dict
    (weights and BN running stats) is bit-identical, it stays in eval mode and holds no .grad."""
    ctx = tiny_ctx
    before = {k: v.clone() for k, v in ctx["teacher"].state_dict().items()}
    fast.synthesize(ctx, 3)
    for _ in range(2):
        fast.student_step(ctx, torch.arange(8))
    assert all(torch.equal(before[k], v) for k, v in ctx["teacher"].state_dict().items())
    assert not ctx["teacher"].training
    assert all(p.grad is None and not p.requires_grad for p in ctx["teacher"].parameters())


# --------------------------------------------------------------------------------------------------------------
# End to end on digits: resume, bad input, accuracy
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A random (untrained) digits-shaped WRN-16-1 teacher with non-trivial BN statistics: enough for plumbing."""
    torch.manual_seed(1)
    model = build_model("wrn16_1", 10, 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    path = str(tmp_path_factory.mktemp("teacher") / "random_wrn16_1.pt")
    save_teacher(path, model, "wrn16_1", "digits", 10, 1, 16, (0.3,), (0.4,), 10.0)
    return path


SMALL = ["--epochs", "4", "--warmup", "1", "--synthesis-batch-size", "16", "--batch-size", "12", "--kd-steps", "3",
         "--g-steps", "2", "--ngf", "8", "--save-every", "2", "--save-images", "0", "--reset-l0-at", "3",
         "--student", "wrn16_1"]


@pytest.mark.parametrize("meta", ["maml", "reptile"])
def test_resume_equals_uninterrupted(random_teacher, tmp_path, meta):
    """4 epochs uninterrupted == 2 epochs (--stop-after 2) + --resume: identical student, meta-generator, both
    optimisers, pool, BN momentum state and per-eval accuracies. reset_l0 fires after the resume (call 3); KD
    batches of 12 over pools of 32 / 48 / 64 wrap the shuffle. The logged lr is the lr used in that epoch: 0.2 in
    the warmup epoch and the first KD epoch, then 2e-4 + 0.1998 (1 + cos(pi e / 3)) / 2: 0.15005, 0.05015."""
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    flags = SMALL + ["--teacher", random_teacher, "--meta", meta]
    fast.main(flags + ["--out", full])
    assert fast.main(flags + ["--out", half, "--stop-after", "2"]) is None
    fast.main(flags + ["--out", half, "--resume"])
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (full, half))
    for k in ("student", "generator"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    for k in ("opt_g", "opt_s"):
        sa, sb = a[k]["state"], b[k]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i]
                                              if torch.is_tensor(sa[i][n])), k
    assert a["pool"]["n"] == b["pool"]["n"] == 64 and torch.equal(a["pool"]["images"], b["pool"]["images"])
    assert all(torch.equal(x, y) for m, n in zip(a["bn_mmt"], b["bn_mmt"]) for x, y in zip(m, n))
    assert [r["acc"] for r in a["history"]] == [r["acc"] for r in b["history"]]
    recs = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    for want, rec in zip((0.2, 0.2, 0.15005, 0.05015), recs):
        assert abs(rec["lr"] - want) < 1e-7
    for key in ("acc_max", "acc_last_10", "loss/kd", "loss/bn", "loss/oh", "loss/adv", "loss/inv", "pool/size",
                "gen/best_iter", "gen/adv_agree", "time/synth_s", "time/kd_s", "img_per_s", "elapsed_s"):
        assert key in recs[-1], key
    assert [r["pool/size"] for r in recs] == [16, 32, 48, 64] and recs[0]["loss/adv"] == 0.0
    s = json.load(open(os.path.join(half, "summary.json")))
    assert s["method"] == "fast" and s["final_acc"] == recs[-1]["acc"] and s["synth_s"] > 0 and s["kd_s"] > 0


@pytest.mark.parametrize("flags,needle", [(["--amp", "fp16"], "fp16"), (["--g-steps", "3"], "--g-steps"),
                                           (["--warmup", "22"], "--warmup"), (["--kd-steps", "0"], "--kd-steps"),
                                           (["--student", "nonet"], "nonet")])
def test_bad_input_exits_2(random_teacher, tmp_path, capsys, flags, needle):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        fast.main(["--teacher", random_teacher, "--out", out] + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not os.path.exists(out)


@pytest.mark.slow
def test_digits_accuracy(digits_teacher, tmp_path):
    """Reduced-budget digits run: 12 epochs with warmup 1 (default 22 / 2), cosine over the 11 KD epochs, reset_l0
    at call 8 (the same 60 % rule); everything else default (Fast5, MAML). Measured with teachers/digits_wrn16_2.pt
    (99.63 %), CPU, OMP_NUM_THREADS=1: final 97.22 % (seed 0) and 98.52 % (seed 1), acc_last[10] 93.07 / 94.46 %;
    the threshold leaves room for the freshly trained fixture teacher."""
    summary = fast.main(["--teacher", digits_teacher, "--out", str(tmp_path / "run"), "--epochs", "12",
                         "--warmup", "1", "--save-images", "0"])
    assert summary["final_acc"] >= 90.0, summary
