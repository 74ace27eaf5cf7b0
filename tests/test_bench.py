"""Tests of bench.py and of bf16 / channels_last on the CPU (issue 14): the FLOP counter against a hand count, the
projection formula, bf16-vs-fp32 agreement of every method's own steps, paper-shape CIFAR-10 smoke runs with
--amp bf16 --channels-last, --amp fp16 refused off CUDA, and the device check's CPU dry run."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import bench
from common import build_model, save_teacher
from test_common import write_cifar, write_images

METHODS = [m for m in bench.available_methods()]
SCRIPTS = [m for m in METHODS if m != "teacher"] + ["train_teacher"]
RTOL = 0.05  # bf16 (8-bit mantissa) through WRN-16 forward + backward: measured <= 0.7 % on one step, bound 5 %


# ---------------------------------------------------------------------------------------------- FLOPs, projection
def test_flop_counter_matches_hand_count():
    """conv 3->4, 3x3, pad 1 on (2, 3, 8, 8), ReLU, linear 256->10, no input grad.
    Forward: conv 2*B*Cout*H*W*Cin*k*k = 2*2*4*64*3*9 = 27,648; linear 2*B*in*out = 2*2*256*10 = 10,240.
    Backward: linear grad-input + grad-weight = 2 * 10,240; conv grad-weight only (the input needs no grad)
    = 27,648. Total 2 * 27,648 + 3 * 10,240 = 86,016 (bias adds are not counted)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    x = torch.randn(2, 3, 8, 8)
    assert bench.count_flops(lambda: net(x)) == 27648 + 10240
    assert bench.count_flops(lambda: net(x).sum().backward()) == 2 * 27648 + 3 * 10240


def test_summary_composes_iteration_and_projects_iterations_times_time():
    """2 phases: G 1 call/iteration at 0.1 s (min 0.05, max 0.2), 3e9 FLOPs, 8 images out; S 10 calls at 0.02 s
    (0.01 / 0.05), 1e9 FLOPs, 16 distilled. Iteration: 0.1 + 10*0.02 = 0.3 s, range 0.15-0.7 s; 3e9 + 1e10 =
    13 GFLOP -> 13e9 / 0.3 / 1e12 = 0.04333 TFLOP/s, MFU at 0.5 peak = 8.667 %; synth 8 / 0.3, distilled 160 / 0.3
    per s. Schedule 1000 iterations -> 1000 * 0.3 s = 300 s = 0.08333 h."""
    phases = [dict(per_iter=1, per_schedule=1000, median_s=0.1, min_s=0.05, max_s=0.2, flops=3e9, synth=8,
                   distilled=0),
              dict(per_iter=10, per_schedule=10000, median_s=0.02, min_s=0.01, max_s=0.05, flops=1e9, synth=0,
                   distilled=16)]
    s = bench.summarize(phases, peak_tflops=0.5)
    assert s["ms_median"] == pytest.approx(300) and (s["ms_min"], s["ms_max"]) == pytest.approx((150, 700))
    assert s["gflop_per_iter"] == pytest.approx(13) and s["tflops"] == pytest.approx(13e9 / 0.3 / 1e12)
    assert s["mfu"] == pytest.approx(0.08667, rel=1e-3)
    assert (s["synth_img_s"], s["distilled_img_s"]) == pytest.approx((8 / 0.3, 160 / 0.3))
    assert s["projected_h"] == pytest.approx(1000 * 0.3 / 3600)


def test_bench_row_projection_equals_schedule_iterations_times_measured_iteration(tmp_path):
    """A real row (TA-DFKD, digits settings, batch 4): 8 epochs x 20 iterations of (10 S + 1 G); the projection is
    exactly schedule_iters x ms/iter, and every phase's FLOPs and the synthesised count are positive."""
    cfg = bench.make_cfg("digits", "cpu", "off", False, batch=4, tmp=str(tmp_path))
    row = bench.bench_one("ta_dfkd", cfg, warmup=0, iters=1, peaks={"fp32": 1.0})
    assert row["schedule_iters"] == 8 * 20 and [p["per_iter"] for p in row["phases"]] == [1, 10]
    assert row["projected_h"] * 3600 == pytest.approx(row["schedule_iters"] * row["ms_median"] / 1e3, rel=1e-9)
    assert all(p["flops"] > 0 for p in row["phases"]) and row["synth_img_s"] > 0
    # every student step draws >= 2 generator batches of B = 4 (spec: >= 2 rounds), the generator step one batch
    assert row["phases"][1]["synth"] >= 8 and row["phases"][0]["synth"] == 4


# ---------------------------------------------------------------------------------------------- bf16 == fp32
@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_on_cpu_matches_fp32_for_one_step(method):
    """From identical weights and inputs (digits settings, batch 8), one call of every step function under CPU bf16
    autocast gives finite losses within RTOL of fp32 (absolute 1e-3 for losses near 0, e.g. a masked L_adv)."""
    res = bench.amp_agreement(method, "digits", "cpu", batch=8)
    assert len(res) >= 1
    for phase, losses in res.items():
        for name, (f32, b16) in losses.items():
            assert math.isfinite(f32) and math.isfinite(b16), (phase, name)
            assert abs(b16 - f32) <= RTOL * abs(f32) + 1e-3, (phase, name, f32, b16)


def test_cpu_autocast_really_runs_bf16_and_losses_stay_fp32():
    """common.autocast acts on the CPU: a conv under it outputs bf16, and a method loss on bf16 logits is fp32."""
    import dafl
    from common import autocast
    conv = nn.Conv2d(3, 4, 3)
    with autocast("cpu", "bf16"):
        y = conv(torch.randn(1, 3, 8, 8))
        logits = torch.randn(4, 10).bfloat16()
        assert y.dtype == torch.bfloat16 and dafl.loss_kd(logits, logits).dtype == torch.float32
    with autocast("cpu", "off"):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- fp16 refused
@pytest.mark.parametrize("script", SCRIPTS + ["bench"])
def test_amp_fp16_on_cpu_exits_2_with_one_line(script, tmp_path, capsys):
    mod = __import__(script)
    argv = ["--amp", "fp16"] if script == "bench" else ["--amp", "fp16", "--device", "cpu", "--out",
                                                         str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "fp16" in err[0]


def test_emulated_bf16_cpu_warns_in_one_line_and_bench_times_fp32_only(monkeypatch, capsys):
    """Where oneDNN has no native bf16 (an AVX2-only CPU: ~50x slower than fp32), --amp bf16 still runs, after one
    warning line, and a plain `python bench.py` drops its bf16 variants with a note; an explicit --amp keeps them.
    With native bf16 there is no warning and all four variants stay."""
    import common
    monkeypatch.setattr(common, "cpu_bf16_native", lambda: False)
    common.check_amp("bf16", "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "--amp off" in err[0]
    common.check_amp("off", "cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(common, "cpu_bf16_native", lambda: True)
    common.check_amp("bf16", "cpu")
    assert capsys.readouterr().err == ""
    assert isinstance(bench.cpu_bf16_native(), bool)  # the real query answers on this machine

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda methods, kw, variants, *a, **k: (seen.update(v=variants, n=a[3])
                                                                                     or ([], "")))
    monkeypatch.setattr(bench, "parse_peaks", lambda text, device, dtypes=(): seen.update(d=set(dtypes)) or {})
    for native, argv, variants in ((False, [], [("off", False), ("off", True)]),
                                   (False, ["--amp", "off,bf16", "--channels-last", "0"], [("off", False),
                                                                                           ("bf16", False)]),
                                   (True, [], [("off", False), ("bf16", True), ("bf16", False), ("off", True)])):
        monkeypatch.setattr(bench, "cpu_bf16_native", lambda: native)
        bench.main(["--device", "cpu", "--methods", "teacher", *argv])
        assert seen["v"] == variants and seen["d"] == {"fp32" if a == "off" else a for a, _ in variants}
        assert any("bf16 not timed" in n for n in seen["n"]) == (not native and not argv)


def test_emulated_bf16_gets_no_peak_and_no_mfu(monkeypatch, tmp_path):
    """Emulated bf16 has no dense peak: on an AVX2 EPYC its big mm and conv ran at 0.5-0.65 GFLOP/s while the digits
    methods' small convs reached 2-5, so `--amp off,bf16` printed bf16 MFUs of 250-555 %. There the bf16 peak is not
    measured (minutes of emulated matmuls saved), its rows get no MFU, and the report says why; fp32 keeps both.
    With native bf16 both peaks are measured."""
    calls = []
    monkeypatch.setattr(bench, "measure_peak", lambda device, dt, n=None, reps=None: calls.append(dt) or 0.5)
    monkeypatch.setattr(bench, "cpu_bf16_native", lambda: False)
    peaks = bench.parse_peaks(None, torch.device("cpu"), ("fp32", "bf16"))
    assert peaks == {"fp32": 0.5, "bf16": None} and calls == [torch.float32]
    stats = [{"per_iter": 1, "per_schedule": 10, "median_s": 0.5, "min_s": 0.4, "max_s": 0.6, "flops": 1e12,
              "synth": 4, "distilled": 4}]
    assert bench.summarize(stats, peaks["bf16"])["mfu"] is None
    assert bench.summarize(stats, peaks["fp32"])["mfu"] == pytest.approx(4.0)  # 2 TFLOP/s against 0.5
    row = {"method": "dafl", "amp": "bf16", "channels_last": 0, "iteration": "1 joint step", "pair": "a->b",
           "batch": 4, "paper_batch": 4, "schedule": "1 it", "schedule_iters": 10, "paper_hours": {},
           "peak_mem_gib": None, **bench.summarize(stats, None)}
    md = bench.write_report(str(tmp_path), {"dataset": "digits", "device_name": "CPU", "torch": "x", "threads": 1,
                                            "when": "now", "peaks": peaks, "notes": []}, [row])
    assert "bf16 none (emulated on this CPU, so no MFU)" in md and "fp32 0.5 TFLOP/s" in md
    assert "| 2.000 | - | - |" in md  # TFLOP/s 2.000, MFU -, peak GiB -
    monkeypatch.setattr(bench, "cpu_bf16_native", lambda: True)
    assert bench.parse_peaks(None, torch.device("cpu"), ("fp32", "bf16")) == {"fp32": 0.5, "bf16": 0.5}
    assert bench.parse_peaks("bf16=3", torch.device("cpu"), ("bf16",)) == {"bf16": 3.0}


# ---------------------------------------------------------------------------------------------- paper-shape smoke
SMOKE = {  # CIFAR-10 paper architectures, latent sizes, generators and loss weights; batch and iterations cut down
    # batch 2: on a CPU without native bf16 (AVX2 only) bf16 is emulated at ~1 s per ResNet-34 image, forward and back
    "ta_dfkd": ["--epochs", "1", "--iters", "1", "--student-steps", "2", "--batch-size", "2"],
    "dafl": ["--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "2"],
    "dfad": ["--epochs", "1", "--iters-per-epoch", "1", "--student-steps", "2", "--batch-size", "2"],
    "ssd_kd": ["--epochs", "2", "--warmup", "1", "--batch-size", "2", "--synthesis-batch-size", "2",
               "--data-scale", "4", "--g-steps", "2", "--kd-steps", "2"],
    "fast": ["--epochs", "2", "--warmup", "1", "--batch-size", "2", "--synthesis-batch-size", "2", "--g-steps", "2",
             "--kd-steps", "2"],
    "cmi": ["--epochs", "1", "--g-steps", "2", "--kd-steps", "2", "--batch-size", "2", "--synthesis-batch-size", "2",
            "--bank-size", "16", "--n-neg", "8"],
    "pre_dfkd": ["--epochs", "1", "--iters-per-epoch", "1", "--kd-iters", "2", "--vae-iters", "1",
                 "--batch-size", "2", "--mem-batch-size", "2", "--vae-novel", "2"],
}
SMOKE_TEACHER = {"cmi": "wrn40_2"}  # CMI's official CIFAR-10 pair wrn40_2 -> wrn16_1; the others resnet34 -> resnet18


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar"))
    write_cifar(root, "cifar10", n_train=2, n_test=4)  # 5 x 2 = 10 training images, 4 test images
    return root


@pytest.mark.parametrize("method", [m for m in METHODS if m in SMOKE or m == "teacher"])
def test_paper_shape_smoke_bf16_channels_last(method, cifar_root, tmp_path, monkeypatch):
    """End to end to summary.json (teacher: the teacher file) on small CIFAR-10 files in the real format."""
    import torchvision
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    out = str(tmp_path / "run")
    if method == "teacher":
        import train_teacher
        meta = train_teacher.main(["--dataset", "cifar10", "--data-root", cifar_root, "--epochs", "1",
                                   "--batch-size", "8", "--amp", "bf16", "--channels-last", "1", "--device", "cpu",
                                   "--out", out + ".pt"])
        assert os.path.isfile(out + ".pt") and math.isfinite(meta["test_acc"])
        return
    arch = SMOKE_TEACHER.get(method, "resnet34")
    torch.manual_seed(0)
    teacher = str(tmp_path / f"{arch}.pt")
    save_teacher(teacher, build_model(arch, 10, 3), arch=arch, dataset="cifar10", num_classes=10, in_channels=3,
                 image_size=32, mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.2010], test_acc=10.0)
    mod = __import__(method)
    mod.main(["--dataset", "cifar10", "--data-root", cifar_root, "--teacher", teacher, "--out", out, "--device", "cpu",
              "--amp", "bf16", "--channels-last", "--save-images", "0", *SMOKE[method]])
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["dataset"] == "cifar10" and math.isfinite(summary["final_acc"])
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    cfg = config.get("args", config)
    assert cfg["amp"] == "bf16" and cfg["channels_last"] in (True, 1)


# ---------------------------------------------------------------------------------------------- device check
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The prepared device check at tiny sizes on the CPU: one report with a bench row per method x (fp32, bf16 +
    channels_last), the agreement table and the teacher, all finite."""
    folder = tmp_path / "jpeg"
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            write_images(str(folder / split / cls), n, 32, seed=len(cls) + n)
    out = str(tmp_path / "out")
    report = bench.gpu_check(str(folder), out, dry_run=True)
    assert os.path.isfile(os.path.join(out, "gpu_check.md")) and os.path.isfile(os.path.join(out, "gpu_check.json"))
    rows = [r for r in report["bench"] if "error" not in r]
    assert {(r["method"], r["amp"], r["channels_last"]) for r in rows} == \
        {(m, a, c) for m in METHODS for a, c in (("off", 0), ("bf16", 1))}
    assert all(r["ms_median"] > 0 and r["gflop_per_iter"] > 0 for r in rows)
    assert set(report["agreement"]) == set(METHODS)
    assert all(math.isfinite(v) for phases in report["agreement"].values() for losses in phases.values()
               for pair in losses.values() for v in pair)
    assert report["teacher"]["epochs"] == 1 and math.isfinite(report["teacher"]["test_acc"])
