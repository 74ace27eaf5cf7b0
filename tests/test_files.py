"""Files a user can trust (issue 20, issue 15 point 5): every bad teacher or checkpoint is one `error:` line and exit
2, never a traceback; files we write carry a sha256 digest that refuses any changed byte; official whole-model
teachers in PyTorch's legacy (pre-1.6) format load without running code from the file; a killed run resumes.
"""
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import types
import warnings

import pytest
import torch

import common
from common import build_model, get_rng_state, load_checkpoint, load_teacher, prepare_run_dir, save_checkpoint, \
    save_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_SCRIPTS = [s for s in ("ta_dfkd.py", "ssd_kd.py", "dafl.py", "dfad.py", "cmi.py", "fast.py", "pre_dfkd.py")
                  if os.path.exists(os.path.join(ROOT, s))]


def call(fn, *args):
    """-> ("ok", result) or (exit code, stderr text); any other exception propagates and fails the test."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return "ok", fn(*args)
    except SystemExit as e:
        return e.code, err.getvalue()


def assert_one_line(code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and ";" in lines[0], (code, err)
    return lines[0]


def flip_bits(blob, rng, n):
    b = bytearray(blob)
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def legacy_module_file(path, backend=False, cuda=False):
    """A whole pickled DAFL-style `lenet.LeNet5` in PyTorch's legacy format, written while the class exists (as
    DAFL's teacher-train.py did) and removed afterwards. backend: each module also carries torch <= 1.0's `_backend`
    attribute (pickled as torch.nn.backends.thnn._get_thnn_function_backend); cuda: storages recorded as
    torch.cuda.FloatStorage on cuda:0, as a teacher saved on a GPU. Returns the model's state_dict."""
    lenet = types.ModuleType("lenet")
    lenet.LeNet5 = type("LeNet5", (common.LeNet5,), {"__module__": "lenet"})
    thnn = types.ModuleType("torch.nn.backends.thnn")

    def _get_thnn_function_backend():
        return None
    _get_thnn_function_backend.__module__ = thnn.__name__
    _get_thnn_function_backend.__qualname__ = "_get_thnn_function_backend"
    thnn._get_thnn_function_backend = _get_thnn_function_backend

    class Backend:
        def __reduce__(self):
            return (_get_thnn_function_backend, ())
    sys.modules.update({"lenet": lenet, thnn.__name__: thnn})
    try:
        torch.manual_seed(0)
        net = build_model("lenet5_half", 10, 1)
        net.__class__ = lenet.LeNet5
        if backend:
            for m in net.modules():
                m.__dict__["_backend"] = Backend()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Couldn't retrieve source code for container of type LeNet5"
            torch.save(net, path, _use_new_zipfile_serialization=False)
    finally:
        del sys.modules["lenet"], sys.modules[thnn.__name__]
    if cuda:
        blob = open(path, "rb").read()
        assert b"ctorch\nFloatStorage\n" in blob and b"X\x03\x00\x00\x00cpu" in blob
        blob = blob.replace(b"ctorch\nFloatStorage\n", b"ctorch.cuda\nFloatStorage\n")
        blob = blob.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        open(path, "wb").write(blob)
    return {k: v.clone() for k, v in net.state_dict().items()}


# ---- issue 15 point 5: legacy whole-model teachers ----------------------------------------------------------------

def test_legacy_pickled_module_loads_without_running_its_code(tmp_path):
    """A DAFL-era `torch.save(net)` file: torch's weights-only loader refuses it (the legacy format records module
    classes as persistent ids); ours reads the weights exactly, from CPU or CUDA storages, with torch <= 1.0's
    `_backend` attribute, in a process where the class `lenet.LeNet5` does not exist."""
    for i, (backend, cuda) in enumerate(((False, False), (True, True))):
        path = str(tmp_path / f"teacher{i}")
        want = legacy_module_file(path, backend, cuda)
        assert "lenet" not in sys.modules
        with pytest.raises(Exception, match="persistent_load|Weights only"):
            torch.load(path, weights_only=True)
        code, got = call(load_teacher, path, "mnist")
        assert code == "ok", got
        model, meta = got
        assert meta["source_format"] == "pickled-module" and meta["arch"] == "lenet5_half"
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    """A legacy-format file whose object is os.system(...): one line naming the class, and the command never ran."""
    import pickle
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        for obj in (common._LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}, Evil(), []):
            pickle.dump(obj, f, protocol=2)
    for fn in (load_teacher, load_checkpoint):
        line = assert_one_line(*call(fn, str(path)))
        assert "posix.system" in line or "os.system" in line
        assert "weights_only=False" not in line  # no unsafe advice for a class that is not an official model
    assert not marker.exists()


def test_known_official_class_with_unknown_layer_gets_the_trusted_source_advice(tmp_path):
    """Only a file that really is a pickled official model gets the weights_only=False conversion, with the warning
    that it must come from a trusted source."""
    import pickle

    class Odd:
        pass
    Odd.__module__, Odd.__qualname__ = "mylayers", "Odd"
    sys.modules["mylayers"] = types.ModuleType("mylayers")
    sys.modules["mylayers"].Odd = Odd
    lenet = types.ModuleType("lenet")

    class LeNet5:
        pass
    LeNet5.__module__, LeNet5.__qualname__ = "lenet", "LeNet5"
    lenet.LeNet5 = LeNet5
    sys.modules["lenet"] = lenet
    try:
        net = LeNet5()
        net.__dict__.update(_modules={"odd": Odd()}, _parameters={}, _buffers={})
        path = tmp_path / "official"
        with open(path, "wb") as f:
            for obj in (common._LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}, net, []):
                pickle.dump(obj, f, protocol=2)
    finally:
        del sys.modules["lenet"], sys.modules["mylayers"]
    line = assert_one_line(*call(load_teacher, str(path)))
    assert "lenet.LeNet5" in line and "mylayers.Odd" in line and "weights_only=False" in line and "trust" in line


# ---- issue 20 acceptance 1: fuzzing both loaders ------------------------------------------------------------------

def test_fuzz_teacher_and_checkpoint_loaders(tmp_path):
    """1,100 generated files -- random bytes, truncations at random offsets, a real header followed by garbage, 1-7
    flipped bits -- made from four real files: our teacher, our checkpoint (both sealed), an official raw state_dict
    (zip format) and a legacy whole pickled module. Both loaders must give either a result or SystemExit(2) with one
    `error:` line, and every bit-flipped file of ours must be refused (the sha256 digest)."""
    warnings.simplefilter("ignore")
    net = build_model("lenet5_half", 10, 1)
    reals = {}
    save_teacher(str(tmp_path / "ours.pt"), net, "lenet5_half", "mnist", 10, 1, 32, (0.13,), (0.31,), 98.0)
    save_checkpoint(str(tmp_path / "ck.pt"), {"student": {"w": torch.randn(4, 3)}, "epoch": 3, "step": 30,
                                              "rng": get_rng_state(), "config": {"seed": 0, "lr": 0.1}})
    torch.save(net.state_dict(), tmp_path / "raw.pt")
    legacy_module_file(str(tmp_path / "legacy.pt"))
    for name in ("ours", "ck", "raw", "legacy"):
        reals[name] = (tmp_path / f"{name}.pt" if name != "legacy" else tmp_path / "legacy.pt").read_bytes()
    rng = random.Random(0)
    cases = [("random", rng.randbytes(rng.randint(1, 2000))) for _ in range(300)]
    cases += [("random-pickle", b"\x80\x02" + rng.randbytes(rng.randint(1, 500))) for _ in range(40)]
    for name, blob in reals.items():
        cases += [(f"trunc-{name}", blob[:rng.randrange(len(blob))]) for _ in range(50)]
        cases += [(f"head-{name}", blob[:rng.randint(1, 600)] + rng.randbytes(rng.randint(0, 1500))) for _ in range(30)]
        cases += [(f"flip-{name}", flip_bits(blob, rng, rng.randint(1, 7))) for _ in range(110)]
    assert len(cases) >= 1000
    outcomes = {}
    for i, (kind, blob) in enumerate(cases):
        path = str(tmp_path / f"case{i % 8}.pt")
        with open(path, "wb") as f:
            f.write(blob)
        for fn in (load_teacher, load_checkpoint):
            code, err = call(fn, path)
            if code != "ok":
                assert_one_line(code, err)
            outcomes.setdefault(kind, []).append(code)
    for name in ("ours", "ck"):
        assert all(code == 2 for code in outcomes[f"flip-{name}"] + outcomes[f"trunc-{name}"]), name
    assert "ok" in outcomes["flip-raw"]  # an official file has no digest: a flipped weight still loads, as before


def test_our_files_are_sealed_and_unsealed_claims_are_not_trusted(tmp_path, capsys):
    """The log line says whether the recorded accuracy is digest-verified; a teacher of ours written before files
    were sealed loads, but its claimed accuracy is not reported as the teacher's (meta test_acc None)."""
    net = build_model("wrn16_1", 10, 1)
    path = str(tmp_path / "t.pt")
    save_teacher(path, net, "wrn16_1", "digits", 10, 1, 16, (0.3,), (0.4,), 97.25)
    _, meta = load_teacher(path, "digits")
    out = capsys.readouterr().out
    assert meta["test_acc"] == 97.25 and meta["digest"] == "verified" and "digest verified" in out
    assert "97.25%" in out and len(out.strip().splitlines()) == 1
    old = {"format": common.TEACHER_FORMAT, "arch": "wrn16_1", "dataset": "digits", "num_classes": 10,
           "in_channels": 1, "image_size": 16, "mean": [0.3], "std": [0.4], "test_acc": 97.25,
           "state_dict": net.state_dict()}
    torch.save(old, tmp_path / "old.pt")  # what save_teacher wrote before this change
    _, meta = load_teacher(str(tmp_path / "old.pt"), "digits")
    out = capsys.readouterr().out
    assert meta["test_acc"] is None and meta["claimed_test_acc"] == 97.25 and "NOT verified" in out
    # the same file with its digest removed (the zip comment zeroed) is refused: it says it was sealed
    blob = open(path, "rb").read()
    n = len(common._SEAL_MARK) + 64
    unsealed = blob[:-n - 2] + b"\0\0"
    open(tmp_path / "cut.pt", "wb").write(unsealed)
    assert "digest" in assert_one_line(*call(load_teacher, str(tmp_path / "cut.pt")))
    # what each kind of file is: empty, a directory, HTML, a run checkpoint, a tensor, no model
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "page.pt").write_bytes(b"<!DOCTYPE html><html>sign in</html>")
    save_checkpoint(str(tmp_path / "run.pt"), {"student": {}, "generator": {}, "epoch": 1})
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "nomodel.pt")
    for name, words in (("empty.pt", "empty"), ("", "directory"), ("page.pt", "HTML"), ("run.pt", "run's checkpoint"),
                        ("tensor.pt", "holding a Tensor"), ("nomodel.pt", "match none"), ("none.pt", "not found")):
        assert words in assert_one_line(*call(load_teacher, str(tmp_path / name)))


# ---- run directories: resume, locks, write errors -----------------------------------------------------------------

def test_run_directory_lock_resume_checks_and_write_errors(tmp_path):
    """A second run into a live --out is refused (lock naming the process); a lock left by a killed process is taken
    over; --resume of a run of another script or other flags names the differing flags; an --out or a checkpoint
    that cannot be written is one line, with the previous checkpoint kept."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(f"{__import__('socket').gethostname()} {os.getppid()}")  # a live process
    assert "in use by another run" in assert_one_line(*call(prepare_run_dir, str(out), False))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "run.lock").write_text(f"{__import__('socket').gethostname()} {dead.pid}")
    assert call(prepare_run_dir, str(out), False) == ("ok", None)
    assert (out / "run.lock").read_text().endswith(f" {os.getpid()}")
    # resume: a checkpoint made with other flags (or by another script) is refused before anything is written
    save_checkpoint(str(out / "checkpoint.pt"), {"epoch": 1, "config": {"seed": 0, "lr": 0.1, "epochs": 5}})
    args = types.SimpleNamespace(seed=0, lr=0.2, epochs=9, out=str(out))
    line = assert_one_line(*call(prepare_run_dir, str(out), True, args))
    assert "(lr differ" in line and "epochs" not in line
    args.lr = 0.1
    code, ck = call(prepare_run_dir, str(out), True, args)
    assert code == "ok" and ck["epoch"] == 1 and common.load_checkpoint(str(out / "checkpoint.pt")) is ck
    # unwritable places (as root, permissions do not stop us: a path through a regular file does)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot create --out" in assert_one_line(*call(prepare_run_dir, str(blocker / "sub"), False))
    assert "cannot write" in assert_one_line(*call(save_checkpoint, str(blocker / "ck.pt"), {"a": 1}))
    before = (out / "checkpoint.pt").read_bytes()
    os.mkdir(f"{out / 'checkpoint.pt'}.tmp{os.getpid()}")  # its temporary file cannot be created
    assert "previous" in assert_one_line(*call(save_checkpoint, str(out / "checkpoint.pt"), {"a": 1}))
    assert (out / "checkpoint.pt").read_bytes() == before


# ---- issue 20 acceptance 2: every method script's command line ----------------------------------------------------

DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback, warnings
sys.path.insert(0, os.getcwd())
warnings.simplefilter("always")
results = []
for script, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    sys.argv = [script] + argv
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")  # exactly what `python SCRIPT ARGV` executes
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException:
        code = "traceback"
        err.write(traceback.format_exc())
    results.append([script, argv, code, err.getvalue()])
print(json.dumps(results))
"""


def snapshot(root):
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(root) for f in fs}


def test_every_method_script_refuses_bad_files_in_one_line(tmp_path):
    """Through each method script's command line: a garbage teacher, a bit-flipped teacher of ours, a corrupt
    checkpoint.pt with --resume, --resume of a directory without a run, of another script's run or of a finished
    run, and a student that cannot take the teacher's inputs (LeNet-5 on 16x16 digits): each exactly one stderr
    line and exit 2, and every file that existed before is byte-for-byte unchanged (no file added either). One
    interpreter runs the scripts as __main__ (torch is imported once); one case also runs as a separate
    `python ta_dfkd.py` process to show the two agree."""
    rng = random.Random(1)
    good = str(tmp_path / "teacher.pt")
    save_teacher(good, build_model("wrn16_2", 10, 1), "wrn16_2", "digits", 10, 1, 16, (0.25,), (0.3,), 95.0)
    (tmp_path / "garbage.pt").write_bytes(rng.randbytes(3000))
    (tmp_path / "flipped.pt").write_bytes(flip_bits(open(good, "rb").read(), rng, 3))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"seed": 0}\n')
    (run / "metrics.jsonl").write_text('{"epoch": 1, "acc": 50.0}\n')
    save_checkpoint(str(run / "checkpoint.pt"), {"student": {"w": torch.randn(64)}, "epoch": 1, "config": {}})
    (run / "checkpoint.pt").write_bytes(flip_bits((run / "checkpoint.pt").read_bytes(), rng, 2))
    foreign = tmp_path / "foreign"
    save_checkpoint(str(foreign / "checkpoint.pt"), {"epoch": 1, "config": {"some_other_flag": 1}})
    (foreign / "metrics.jsonl").write_text('{"epoch": 1, "acc": 50.0}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    finished = tmp_path / "finished"  # ta_dfkd, dafl, dfad, pre_dfkd used to resume it and rewrite summary.json
    save_checkpoint(str(finished / "checkpoint.pt"), {"epoch": 1, "config": {}})
    (finished / "summary.json").write_text('{"final_acc": 50.0}\n')
    cases, expect = [], []
    for script in METHOD_SCRIPTS:
        for argv, words in ((["--teacher", str(tmp_path / "garbage.pt"), "--out", str(tmp_path / "new")],
                             "not a PyTorch file"),
                            (["--teacher", str(tmp_path / "flipped.pt"), "--out", str(tmp_path / "new")], "damaged"),
                            (["--teacher", good, "--out", str(run), "--resume"], "damaged"),
                            (["--teacher", good, "--out", str(empty), "--resume"], "does not exist"),
                            (["--teacher", good, "--out", str(foreign), "--resume"], "other settings"),
                            (["--teacher", good, "--out", str(finished), "--resume"], "holds a finished run"),
                            (["--teacher", good, "--out", str(tmp_path / "new"), "--student", "lenet5"],
                             "cannot take 1x16x16")):  # ta_dfkd, cmi, fast, ssd_kd: a traceback, a run dir left
            cases.append([script, argv])
            expect.append(words)
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for (script, argv, code, err), words in zip(results, expect):
        line = assert_one_line(code, err)
        assert words in line, (script, argv, line)
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()
    p = subprocess.run([sys.executable, "ta_dfkd.py", *cases[1][1]], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == results[1][3].strip()


def test_argparse_errors_are_one_line_in_every_script():
    """A flag argparse itself rejects (unknown flag, bad choice, non-integer) used to print the usage block first:
    15-20 lines. Every script routes it through common.fail: one line, exit 2, naming the flag."""
    scripts = METHOD_SCRIPTS + ["train_teacher.py", "robustness.py", "bench.py"]
    cases = [[s, argv] for s in scripts for argv in (["--no-such-flag"], ["--amp", "xyz"], ["--seed", "one"])
             if s not in ("robustness.py", "bench.py")]
    cases += [[s, argv] for s in ("robustness.py", "bench.py") for argv in (["--no-such-flag"], ["--jobs", "one"]
              if s == "robustness.py" else ["--iters", "one"])]  # no --amp choice or --seed: other argparse errors
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for script, argv, code, err in json.loads(r.stdout.strip().splitlines()[-1]):
        line = assert_one_line(code, err)
        assert argv[0] in line and f"python {script} --help" in line, (script, argv, line)


def test_unusable_learning_rates_are_one_line(tmp_path):
    """`dafl.py --lr-student 1e38 --lr-generator 1e38` ended in a traceback (Adam's update overflows float32) and
    nan passed every "> 0" check; each method script now refuses both before anything is written."""
    flag = {"dafl.py": "--lr-student", "dfad.py": "--lr-student"}
    cases = [[s, [flag.get(s, "--lr-g"), v, "--out", str(tmp_path / "new")]] for s in METHOD_SCRIPTS
             for v in ("1e38", "nan", "inf")]
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for script, argv, code, err in json.loads(r.stdout.strip().splitlines()[-1]):
        line = assert_one_line(code, err)
        assert argv[0] in line and "learning rate" in line, (script, argv, line)
    assert not (tmp_path / "new").exists()


# ---- a run killed with SIGKILL resumes with the default checkpoint interval --------------------------------------

@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(digits_teacher, tmp_path):
    """ta_dfkd.py with its digits defaults (save_every 1; before this change 8 of 8 epochs, so a killed run had no
    checkpoint), shortened to 4 epochs x 3 iterations: killed with SIGKILL as soon as its first checkpoint exists,
    then `--resume`d, it ends with exactly the uninterrupted run's accuracies. The uninterrupted run goes on beside
    the killed one and its resume (one thread each, so the two share 2 cores without changing either's numbers)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "ta_dfkd.py", "--teacher", digits_teacher, "--epochs", "4", "--iters", "3",
            "--save-images", "0"]
    full = subprocess.Popen(base + ["--out", str(tmp_path / "a")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        b = tmp_path / "b"
        proc = subprocess.Popen(base + ["--out", str(b)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while not (b / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (b / "checkpoint.pt").exists() and not (b / "summary.json").exists()  # killed mid-run
        assert int((b / "run.lock").read_text().split()[1]) == proc.pid  # left behind by the killed process
        resumed = subprocess.run(base + ["--out", str(b), "--resume"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed" in resumed.stdout and not (b / "run.lock").exists()
        _, full_err = full.communicate(timeout=300)
    finally:
        full.kill()  # a no-op once it has ended; stops it if an assertion above failed
    assert full.returncode == 0, full_err
    sa, sb = (json.load(open(tmp_path / d / "summary.json")) for d in ("a", "b"))
    assert (sa["final_acc"], sa["acc_max"], sa["acc_last_k"]) == (sb["final_acc"], sb["acc_max"], sb["acc_last_k"])
    accs = [[json.loads(line)["acc"] for line in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert accs[0] == accs[1] and len(accs[0]) == 4
