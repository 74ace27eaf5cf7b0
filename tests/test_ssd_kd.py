"""Tests for ssd_kd.py: hand-derived values from spec/ssd_kd.md section 8, properties, resume, bad input, digits run."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import ssd_kd
from common import bns_loss, build_model, register_bn_hooks


# --------------------------------------------------------------------------------------------------------------
# Eq. (3): modulating function
# --------------------------------------------------------------------------------------------------------------

def test_phi_worked_example():
    """Spec 8.2: B = 4 samples with classes [0,0,1,2], p_T = [0.5,0.9,0.2,1.0], gamma = 2, x ranging over B.
    Counts [2,1,1] over |B| = 4 -> diversity 1 - [2,2,1,1]/4 = [0.5,0.5,0.75,0.75];
    difficulty (1-p)^2 = [0.25,0.01,0.64,0]; phi = product = [0.125,0.005,0.48,0]."""
    c = torch.tensor([0, 0, 1, 2])
    p = torch.tensor([0.5, 0.9, 0.2, 1.0])
    counts = torch.bincount(c, minlength=3)
    phi = ssd_kd.modulating_phi(p, c, counts, 4, gamma=2.0)
    assert torch.allclose(phi, torch.tensor([0.125, 0.005, 0.48, 0.0]), atol=1e-6)
    div = ssd_kd.modulating_phi(p, c, counts, 4, gamma=2.0, difficulty=False)
    assert torch.allclose(div, torch.tensor([0.5, 0.5, 0.75, 0.75]))
    diff = ssd_kd.modulating_phi(p, c, counts, 4, gamma=2.0, diversity=False)
    assert torch.allclose(diff, torch.tensor([0.25, 0.01, 0.64, 0.0]), atol=1e-6)
    # spec 8.3: gamma = 0 makes phi the diversity term
    assert torch.allclose(ssd_kd.modulating_phi(p, c, counts, 4, gamma=0.0), div)


def test_phi_one_class_and_balanced():
    """Spec 8.1: every sample in B shares x's class -> diversity 1 - |B|/|B| = 0, so phi = 0 for any p, gamma.
    Spec 8.3: B balanced over K = 4 classes (2 each, |B| = 8), gamma = 0 -> phi = 1 - 2/8 = 1 - 1/K = 0.75.
    Empty B (fill 0): the diversity term is 1 (spec R b), so phi = (1-p)^gamma."""
    p = torch.tensor([0.1, 0.5, 0.99])
    c = torch.tensor([3, 3, 3])
    for gamma in (0.0, 1.0, 2.0, 5.0):
        assert torch.equal(ssd_kd.modulating_phi(p, c, torch.tensor([0, 0, 0, 7]), 7, gamma), torch.zeros(3))
    bal = ssd_kd.modulating_phi(p, torch.tensor([0, 1, 2]), torch.tensor([2, 2, 2, 2]), 8, 0.0)
    assert torch.allclose(bal, torch.full((3,), 0.75))
    empty = ssd_kd.modulating_phi(p, c, torch.zeros(4, dtype=torch.long), 0, 2.0)
    assert torch.allclose(empty, (1 - p) ** 2)


# --------------------------------------------------------------------------------------------------------------
# Eq. (4)-(6): priority sampling
# --------------------------------------------------------------------------------------------------------------

def test_sampling_probs_and_is_weights_worked_example():
    """Spec 8.5: delta = [1,1,2,4], alpha = 1, eps = 0 -> P = delta/8 = [1/8,1/8,1/4,1/2]; N P = [0.5,0.5,1,2];
    beta = 1: raw w = 1/(N P) = [2,2,1,0.5]; max-normalised w / 2 = [1,1,0.5,0.25]."""
    P = ssd_kd.sampling_probs(torch.tensor([1.0, 1.0, 2.0, 4.0]), alpha=1.0, eps=0.0)
    assert torch.allclose(P, torch.tensor([1 / 8, 1 / 8, 1 / 4, 1 / 2]))
    assert torch.allclose(ssd_kd.is_weights(P, 1.0, max_norm=False), torch.tensor([2.0, 2.0, 1.0, 0.5]))
    assert torch.allclose(ssd_kd.is_weights(P, 1.0, max_norm=True), torch.tensor([1.0, 1.0, 0.5, 0.25]))


def test_sampling_probs_properties():
    """Spec 8.4: P sums to 1 and is > 0 with eps > 0 (even for zero priorities); constant delta -> P = 1/N and
    w = 1 for every beta; beta = 0 -> w = 1; alpha = 0 -> uniform P."""
    delta = torch.tensor([0.0, 0.3, 2.0, 0.0, 7.5])
    P = ssd_kd.sampling_probs(delta, 0.6, 1e-6)
    assert abs(P.sum().item() - 1) < 1e-6 and (P > 0).all()
    Pc = ssd_kd.sampling_probs(torch.full((5,), 0.7), 0.6, 1e-6)
    assert torch.allclose(Pc, torch.full((5,), 0.2))
    for beta in (0.0, 0.4, 1.0):
        for norm in (False, True):
            assert torch.allclose(ssd_kd.is_weights(Pc, beta, norm), torch.ones(5))
    assert torch.equal(ssd_kd.is_weights(P, 0.0, False), torch.ones(5))
    assert torch.allclose(ssd_kd.sampling_probs(delta, 0.0, 1e-6), torch.full((5,), 0.2))


def test_priority_write_back_values_and_untouched():
    """Spec 8.6: delta = w * KL; w = 1 -> delta = KL; w = 0.5, KL = 0.3 -> 0.15. Entries not drawn are unchanged.
    A duplicate index keeps the larger of its two new values (order-free scatter)."""
    buf = ssd_kd.ReplayBuffer(6, (1, 2, 2), "cpu", "float32")
    buf.add(torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long), torch.arange(6.0), 0)
    idx = torch.tensor([1, 4, 4])
    w, kl = torch.tensor([0.5, 1.0, 1.0]), torch.tensor([0.3, 0.2, 0.9])
    buf.update_priorities(idx, w * kl)
    assert torch.allclose(buf.delta, torch.tensor([0.0, 0.15, 2.0, 3.0, 0.9, 5.0]))


def test_student_step_writes_back_only_sampled(tiny_ctx, monkeypatch):
    """Alg. 1 line 21 through student_step: after one KD step, exactly the drawn indices changed priority, and a
    drawn entry's new priority is w * KL with w <= 1 (max-normalised) and KL >= 0."""
    ctx = tiny_ctx
    drawn = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    before = ctx["buffer"].delta.clone()
    ssd_kd.student_step(ctx, beta=0.4)
    idx = drawn[0]
    mask = torch.zeros_like(before, dtype=torch.bool)
    mask[idx] = True
    after = ctx["buffer"].delta
    assert torch.equal(after[~mask], before[~mask])
    assert (after[mask] != before[mask]).all() and (after[mask] >= 0).all()


# --------------------------------------------------------------------------------------------------------------
# Replay buffer (Alg. 1 lines 14-15)
# --------------------------------------------------------------------------------------------------------------

def test_buffer_fifo_and_fill():
    """Spec 8.8: |B| = 5000, batches of 256. Fill after k insertions = min(256 k, 5000): 19 -> 4864, 20 -> 5000
    (5120 >= 5000). Image value = global insertion number, so B must hold exactly the newest 5000 numbers:
    after 20 insertions 120..5119 (the first 120 evicted), after 21 insertions 376..5375 (256 oldest removed)."""
    buf = ssd_kd.ReplayBuffer(5000, (1, 1, 1), "cpu", "float32")
    n = 0
    for k in range(21):
        x = torch.arange(n, n + 256, dtype=torch.float32).view(256, 1, 1, 1)
        buf.add(x, torch.zeros(256, dtype=torch.long), torch.ones(256), k)
        n += 256
        if k == 18:
            assert buf.fill == 4864
        if k == 19:
            assert buf.fill == 5000
            assert torch.equal(buf.images.flatten().sort()[0], torch.arange(120, 5120, dtype=torch.float32))
    assert buf.fill == 5000
    assert torch.equal(buf.images.flatten().sort()[0], torch.arange(376, 5376, dtype=torch.float32))
    assert (buf.birth == 0).sum() == 0 and (buf.birth == 1).sum() == 256 - 120  # batch 1: 120 of it evicted


def test_buffer_uint8_is_fast_png_quantisation():
    """Fast's PNG pool: clamp to [0,1], x255, truncate. 0.5 -> 127 (127.5 truncated), 1.2 -> 255, -0.1 -> 0."""
    buf = ssd_kd.ReplayBuffer(3, (1, 1, 1), "cpu", "uint8")
    buf.add(torch.tensor([0.5, 1.2, -0.1]).view(3, 1, 1, 1), torch.zeros(3, dtype=torch.long), torch.zeros(3), 0)
    assert buf.images.flatten().tolist() == [127, 255, 0]
    assert torch.allclose(buf.get(torch.tensor([0])).flatten(), torch.tensor([127 / 255]))


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------

def test_kd_tempered_value():
    """Spec 8.9: s = [0,0], t = [ln 3, 0]. T=1: p_t = [3/4,1/4], p_s = [1/2,1/2],
    KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812. T=20: p_t = softmax([ln3/20, 0]), KL * 400 = 0.150824.
    Identical logits give 0; swapping the arguments changes the value."""
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    assert abs(ssd_kd.loss_kd(s, t, 1.0).item() - (0.75 * math.log(1.5) + 0.25 * math.log(0.5))) < 1e-6
    q = torch.softmax(t / 20, 1)[0]
    expected = 400 * sum(qi * math.log(qi / 0.5) for qi in q.tolist())
    # fp32 cancellation in the KL of two near-uniform distributions (x400) costs ~1e-4 relative
    assert abs(ssd_kd.loss_kd(s, t, 20.0).item() - expected) < 5e-5 and abs(expected - 0.150824) < 1e-5
    assert ssd_kd.loss_kd(t, t, 20.0).item() == 0.0
    assert abs(ssd_kd.loss_kd(t, s, 1.0).item() - ssd_kd.loss_kd(s, t, 1.0).item()) > 1e-3


def test_loss_adv_mask():
    """Spec 8.10: no row with argmax_s == argmax_t -> 0; one agreeing row among n = 3 -> -KL_row / 3."""
    t = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    s_none = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    assert ssd_kd.loss_adv(s_none, t).item() == 0.0
    s_one = torch.tensor([[0.5, 0.0], [1.0, 0.0], [0.0, 3.0]])  # only row 0 agrees (class 0)
    p, q = torch.softmax(t[0], 0), torch.softmax(s_one[0], 0)
    kl0 = (p * (p / q).log()).sum().item()
    assert abs(ssd_kd.loss_adv(s_one, t).item() + kl0 / 3) < 1e-6


def test_bn_momentum_blend():
    """spec/bns.md 5 and spec 8.11-8.12: with no state the term equals common.bns_loss (plain Eq. 1); after call 1
    state = s1; after call 2 state = 0.9 s1 + 0.1 s2. With state (m_bar, v_bar) and batch (m, v) the term is
    ||rv - (0.1 v + 0.9 v_bar)|| + ||rm - (0.1 m + 0.9 m_bar)||; rho = 1 makes it independent of the batch.
    A batch whose mean and biased variance equal the running stats gives 0."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    hooks = register_bn_hooks(bn)
    x1, x2 = torch.randn(8, 3, 4, 4) * 2 + 1, torch.randn(8, 3, 4, 4) - 1
    bn(x1)
    s1 = (x1.mean((0, 2, 3)), x1.var((0, 2, 3), unbiased=False))
    assert torch.allclose(ssd_kd.loss_bn(hooks, [None], 0.9), bns_loss(hooks))
    mmt = ssd_kd.update_bn_mmt(hooks, [None], 0.9)
    assert torch.allclose(mmt[0][0], s1[0]) and torch.allclose(mmt[0][1], s1[1])
    bn(x2)
    s2 = (x2.mean((0, 2, 3)), x2.var((0, 2, 3), unbiased=False))
    want = (torch.linalg.vector_norm(bn.running_var - (0.1 * s2[1] + 0.9 * s1[1]))
            + torch.linalg.vector_norm(bn.running_mean - (0.1 * s2[0] + 0.9 * s1[0])))
    assert torch.allclose(ssd_kd.loss_bn(hooks, mmt, 0.9), want, atol=1e-5)
    mmt2 = ssd_kd.update_bn_mmt(hooks, mmt, 0.9)
    assert torch.allclose(mmt2[0][0], 0.9 * s1[0] + 0.1 * s2[0], atol=1e-6)
    assert torch.allclose(mmt2[0][1], 0.9 * s1[1] + 0.1 * s2[1], atol=1e-6)
    l_a = ssd_kd.loss_bn(hooks, mmt, 1.0)
    bn(x1)
    assert torch.allclose(ssd_kd.loss_bn(hooks, mmt, 1.0), l_a)
    bn.running_mean.copy_(s1[0]), bn.running_var.copy_(s1[1])
    assert ssd_kd.loss_bn(hooks, [None], 0.9).item() < 1e-5
    assert len(register_bn_hooks(build_model("wrn40_2", 10))) == 37  # spec 8.11: one term per BN, summed


# --------------------------------------------------------------------------------------------------------------
# Generator / student updates on a tiny setup
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_ctx():
    """A tiny 8x8 one-channel setup: wrn16_1 as teacher (random, frozen) and student, small generator, B filled."""
    torch.manual_seed(0)
    args = ssd_kd.parse_args(["--synthesis-batch-size", "8", "--batch-size", "8", "--data-scale", "16",
                              "--g-steps", "3", "--nz", "8", "--ngf", "4", "--epochs", "3", "--warmup", "1",
                              "--student", "wrn16_1"])
    args.adv, args.bn, args.oh = 1.1, 10.0, 0.4
    teacher = build_model("wrn16_1", 10, 1).eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial running statistics
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)

    class D:
        in_channels, image_size, num_classes, mean, std = 1, 8, 10, (0.5,), (0.25,)
    ctx = ssd_kd.build(args, teacher, D, torch.device("cpu"))
    for e in range(2):
        x, _ = ssd_kd.synthesize(ctx, e + 1)
        ssd_kd.insert_batch(ctx, x, e)
    return ctx


def test_meta_gradient_is_sum_of_inner_gradients(tiny_ctx, monkeypatch):
    """Spec 8.18 (Fast fomaml_grad): after one synthesize() call the meta-generator's .grad equals the sum over
    the g_steps = 3 inner iterations of the clone's gradients (recorded independently by tensor hooks)."""
    ctx = tiny_ctx
    recorded = []
    real_deepcopy = ssd_kd.copy.deepcopy

    def spy(obj, *a):
        clone = real_deepcopy(obj, *a)
        if obj is not ctx["generator"]:  # deepcopy recurses through the patched name
            return clone
        for i, p in enumerate(clone.parameters()):
            p.register_hook(lambda g, i=i: recorded.append((i, g.clone())))
        return clone
    monkeypatch.setattr(ssd_kd.copy, "deepcopy", spy)
    ctx["opt_g"].step = lambda *a, **k: None  # keep .grad as accumulated (the step itself is Adam's business)
    ssd_kd.synthesize(ctx, 3)
    params = list(ctx["generator"].parameters())
    assert len(recorded) == 3 * len(params)
    for i, p in enumerate(params):
        want = sum(g for j, g in recorded if j == i)
        assert torch.allclose(p.grad, want, atol=1e-6), i


def test_teacher_unchanged_and_gradient_free(tiny_ctx):
    """The teacher is frozen: after synthesis (gradients flow through it to x) and KD steps, its state_dict
    (weights and BN running stats) is bit-identical, it stays in eval mode and holds no .grad."""
    ctx = tiny_ctx
    before = {k: v.clone() for k, v in ctx["teacher"].state_dict().items()}
    ssd_kd.synthesize(ctx, 3)
    for _ in range(2):
        ssd_kd.student_step(ctx, 0.4)
    after = ctx["teacher"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not ctx["teacher"].training
    assert all(p.grad is None and not p.requires_grad for p in ctx["teacher"].parameters())


def test_per_pair_and_paper_defaults():
    """Spec 2: Fast's per-pair (adv, bn, oh); C10 schedule; kd_steps = ceil(2*5000/256) = 40; meta lr = lr_g *
    g_steps = 3e-3 * 5 = 0.015 (Fast5). Spec 8.15: cosine T_max 200, eta_min 2e-4, stepped only after KD epochs:
    lr 0.2 at epoch 20, 2e-4 + 0.5 (0.2 - 2e-4)(1 + cos(pi 100/200)) = 0.1001 at epoch 120, ~2.123e-4 at 219."""
    assert ssd_kd.pair_weights("resnet34", "resnet18") == (1.33, 10.0, 0.5)
    assert ssd_kd.pair_weights("vgg11", "resnet18") == (1.0, 10.0, 0.5)
    for s in ("wrn16_1", "wrn40_1", "wrn16_2"):
        assert ssd_kd.pair_weights("wrn40_2", s) == (1.1, 10.0, 0.4)
    a = ssd_kd.parse_args(["--dataset", "cifar10"])
    assert (a.epochs, a.warmup, a.batch_size, a.synthesis_batch_size, a.data_scale) == (220, 20, 256, 256, 5000)
    assert a.kd_steps == 40 and abs(a.lr_meta - 0.015) < 1e-12 and (a.T, a.bn_mmt, a.nz) == (20.0, 0.9, 256)
    assert (a.gamma, a.alpha, a.beta, a.beta_end, a.eps) == (2.0, 0.6, 0.4, 1.0, 1e-6) and a.reset_l0_at == 140
    assert ssd_kd.parse_args(["--dataset", "cifar10", "--data-scale", "50000"]).kd_steps == 391
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=a.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.cos_tmax, eta_min=2e-4)
    lrs = {}
    for epoch in range(220):
        lrs[epoch] = opt.param_groups[0]["lr"]
        if epoch >= a.warmup:
            opt.step(), sched.step()
    assert lrs[20] == 0.2 and abs(lrs[120] - 0.1001) < 1e-6 and abs(lrs[219] - 2.123e-4) < 1e-7


# --------------------------------------------------------------------------------------------------------------
# End to end on digits: resume, bad input, accuracy
# --------------------------------------------------------------------------------------------------------------

SMALL = ["--epochs", "4", "--warmup", "1", "--synthesis-batch-size", "32", "--batch-size", "32", "--data-scale",
         "80", "--kd-steps", "3", "--g-steps", "2", "--save-every", "1", "--save-images", "0", "--reset-l0-at", "3"]


def test_resume_restores_buffer_exactly(digits_teacher, tmp_path):
    """4 epochs uninterrupted == 2 epochs (--stop-after 2) + --resume: identical student, generator, buffer
    (images, classes, priorities, births), BN momentum state and per-eval accuracies. |B| = 80 with 32 per epoch
    wraps the ring in epoch 3, and reset_l0 fires after the resume (call 3), so both paths are covered."""
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    ssd_kd.main(SMALL + ["--teacher", digits_teacher, "--out", full])
    assert ssd_kd.main(SMALL + ["--teacher", digits_teacher, "--out", half, "--stop-after", "2"]) is None
    ssd_kd.main(SMALL + ["--teacher", digits_teacher, "--out", half, "--resume"])
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (full, half))
    for k in ("student", "generator"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])
    assert a["buffer"]["inserted"] == b["buffer"]["inserted"] == 128
    for k in ("images", "cls", "delta", "birth"):
        assert torch.equal(a["buffer"][k], b["buffer"][k]), k
    assert all(torch.equal(x, y) for m, n in zip(a["bn_mmt"], b["bn_mmt"]) for x, y in zip(m, n))
    assert [r["acc"] for r in a["history"]] == [r["acc"] for r in b["history"]]
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (full, half))
    assert sa["final_acc"] == sb["final_acc"]
    rec = json.loads(open(os.path.join(full, "metrics.jsonl")).readlines()[-1])
    for key in ("acc_max", "acc_last_10", "loss/kd", "loss/bn", "loss/adv", "loss/task", "buffer/class_entropy",
                "buffer/prio_mean", "buffer/prio_std", "time/inversion_s", "time/distill_s", "img_per_s"):
        assert key in rec, key
    assert 0 <= rec["buffer/class_entropy"] <= math.log(10) + 1e-6 and rec["buffer/fill"] == 80


@pytest.mark.parametrize("flags,needle", [(["--amp", "fp16"], "fp16"), (["--warmup", "30"], "--warmup"),
                                           (["--data-scale", "0"], "--data-scale")])
def test_bad_input_exits_2(digits_teacher, tmp_path, capsys, flags, needle):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        ssd_kd.main(["--teacher", digits_teacher, "--out", out] + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not os.path.exists(out)


@pytest.mark.slow
def test_digits_accuracy(digits_teacher, tmp_path):
    """Reduced-budget digits run: 15 epochs with warmup 3 (default 30 / 5), cosine over the 12 KD epochs, reset_l0
    at call 10 (the same 60 % rule); everything else default. Measured (CPU, 2 seeds): final 92.78 % (seed 0) and
    92.59 % (seed 1); the threshold leaves room for the freshly trained fixture teacher."""
    summary = ssd_kd.main(["--teacher", digits_teacher, "--out", str(tmp_path / "run"), "--epochs", "15",
                           "--warmup", "3", "--cos-tmax", "12", "--reset-l0-at", "10", "--save-images", "0"])
    assert summary["final_acc"] >= 85.0, summary
