"""Figures: curves.svg from MetricLogger, the robustness study's SVG figures, readable sample grids.

Coordinates are checked against the axes the SVG itself draws (tick positions), so a point must land where a reader
would read its value off the axis."""
import json
import os
import xml.etree.ElementTree as ET

import pytest
import torch
from torchvision.io import read_image

import robustness
from common import MetricLogger, save_sample_grid

NS = "{http://www.w3.org/2000/svg}"


def parse(path):
    return ET.parse(path).getroot()  # raises on anything that is not well-formed XML


def points(el):
    return [tuple(map(float, p.split(","))) for p in el.get("points").split()]


def tick_y(ticks, value):
    return next(float(t.get("y")) for t in ticks if float(t.get("data-value")) == pytest.approx(value))


def panel_ticks(root, left, right):
    """The y ticks of the panel whose axis sits between x = left and x = right."""
    return [t for t in root.iter(NS + "text") if t.get("class") == "ytick" and left <= float(t.get("x")) < right]


def test_curves_svg_maps_accuracy_teacher_line_and_log_losses(tmp_path):
    out = str(tmp_path)
    log = MetricLogger(out, 3, teacher_acc=97.5)
    recs = [{"epoch": 1, "acc": 25.0, "loss/kd": 1e-3, "loss/g": 2.0, "loss/ie": -0.01},
            {"epoch": 2, "acc": 50.0, "loss/kd": 10 ** -1.5, "loss/g": 2.5, "loss/ie": -0.01},
            {"epoch": 3, "acc": 75.0, "loss/kd": 10.0, "loss/g": 3.0, "loss/ie": -0.01}]
    for r in recs:
        log.log(dict(r))
    root = parse(os.path.join(out, "curves.svg"))
    assert sorted(os.listdir(out)) == ["curves.svg", "metrics.jsonl"]  # the tmp file was replaced, not left
    series = {el.get("data-label"): el for el in root.iter(NS + "polyline")}
    assert set(series) == {"student", "loss/kd", "loss/g", "-loss/ie"}  # an always-negative term, negated
    # panel 1: y(acc) read off the 0 and 100 ticks; the teacher line at 97.5
    acc_ticks = panel_ticks(root, 0, 520)
    y0, y100 = tick_y(acc_ticks, 0), tick_y(acc_ticks, 100)
    pts = points(series["student"])
    assert [p[1] for p in pts] == pytest.approx([y0 + a / 100 * (y100 - y0) for a in (25, 50, 75)], abs=0.01)
    assert pts[0][0] < pts[1][0] < pts[2][0] and pts[1][0] - pts[0][0] == pytest.approx(pts[2][0] - pts[1][0])
    hline = next(el for el in root.iter(NS + "line") if el.get("class") == "hline")
    assert float(hline.get("y1")) == pytest.approx(y0 + 0.975 * (y100 - y0), abs=0.01)
    assert "97.50" in hline.get("data-label")
    # panel 2: 1e-3 .. 1e1 spans 4 decades -> log axis; 10^-1.5 lies halfway between the 1e-2 and 1e-1 ticks
    loss_ticks = panel_ticks(root, 520, 2000)
    assert sorted(float(t.get("data-value")) for t in loss_ticks) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    kd = points(series["loss/kd"])
    assert kd[0][1] == pytest.approx(tick_y(loss_ticks, 1e-3), abs=0.01)
    assert kd[1][1] == pytest.approx((tick_y(loss_ticks, 1e-2) + tick_y(loss_ticks, 1e-1)) / 2, abs=0.01)
    assert kd[2][1] == pytest.approx(tick_y(loss_ticks, 10.0), abs=0.01)
    assert [p[1] for p in points(series["-loss/ie"])] == pytest.approx([tick_y(loss_ticks, 1e-2)] * 3, abs=0.01)


def test_curves_linear_when_losses_do_not_span_decades_or_go_negative(tmp_path):
    log = MetricLogger(str(tmp_path), 2)  # no teacher_acc: backward compatible, no teacher line
    log.log({"epoch": 1, "acc": 10.0, "loss/generator": -0.5})
    log.log({"epoch": 2, "acc": 20.0, "loss/generator": -0.25})
    root = parse(os.path.join(str(tmp_path), "curves.svg"))
    assert not [el for el in root.iter(NS + "line") if el.get("class") == "hline"]
    ticks = panel_ticks(root, 520, 2000)
    (gen,) = [el for el in root.iter(NS + "polyline") if el.get("data-label") == "loss/generator"]
    (ya, yb) = [p[1] for p in points(gen)]
    t = sorted((float(e.get("data-value")), float(e.get("y"))) for e in ticks)
    (v0, p0), (v1, p1) = t[0], t[-1]
    assert ya == pytest.approx(p0 + (-0.5 - v0) / (v1 - v0) * (p1 - p0), abs=0.01)
    assert yb == pytest.approx(p0 + (-0.25 - v0) / (v1 - v0) * (p1 - p0), abs=0.01)


def write_run(root, method, teacher, teacher_acc, seed, accs, k=2):
    d = root / f"{method}-{teacher}-s{seed}"
    d.mkdir(parents=True)
    last = sum(accs[-k:]) / k
    (d / "summary.json").write_text(json.dumps(dict(
        method=method, dataset="digits", teacher_acc=teacher_acc, final_acc=accs[-1], acc_max=max(accs),
        acc_last_k=last, k=k, epochs=len(accs), wall_s=1.0, seed=seed)))
    (d / "config.json").write_text(json.dumps(dict(teacher=f"/t/{teacher}.pt", seed=seed)))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "acc": a}) + "\n" for i, a in enumerate(accs)))


def test_robustness_figures_have_one_series_per_method_and_teacher(tmp_path):
    runs = tmp_path / "runs"
    accs = {("dafl", "tA"): [50, 90, 80, 70], ("dafl", "tB"): [40, 60, 60, 60],
            ("ta_dfkd", "tA"): [60, 95, 95, 95], ("ta_dfkd", "tB"): [70, 94, 94, 94],
            ("fast", "tA"): [30, 80, 90, 90]}  # a method outside robustness.METHODS, run on one teacher only
    tacc = {"tA": 99.0, "tB": 98.0}
    for (m, t), a in accs.items():
        for seed in (0, 1):
            write_run(runs, m, t, tacc[t], seed, [v - seed for v in a])
    out = tmp_path / "report"
    robustness.main(["--collect", str(runs), "--out", str(out)])
    md = (out / "results.md").read_text()
    for name in ("fig1_curves.svg", "fig7_gap.svg", "fig8_drop.svg"):
        assert f"({name})" in md and (out / name).exists()
    fig1 = parse(out / "fig1_curves.svg")
    ids = sorted(el.get("data-id") for el in fig1.iter(NS + "polyline"))
    assert ids == sorted(f"{m}/{t}/s{s}" for m, t in accs for s in (0, 1))
    colour = {el.get("data-id"): el.get("stroke") for el in fig1.iter(NS + "polyline")}
    assert colour["dafl/tA/s0"] == colour["ta_dfkd/tA/s1"] != colour["dafl/tB/s0"]  # one colour per teacher
    fig7 = parse(out / "fig7_gap.svg")
    bars = {(el.get("data-category"), el.get("data-id")): el for el in fig7.iter(NS + "rect")
            if el.get("class") == "bar"}
    assert set(bars) == set(accs)
    # gap = teacher - best seed's peak: dafl tA 99 - 90 = 9, ta_dfkd tB 98 - 94 = 4; bar heights in proportion
    h = {key: float(el.get("height")) for key, el in bars.items()}
    assert float(bars[("dafl", "tA")].get("data-value")) == pytest.approx(9.0)
    assert h[("dafl", "tA")] / h[("ta_dfkd", "tB")] == pytest.approx(9.0 / 4.0, rel=1e-3)
    fig8 = parse(out / "fig8_drop.svg")
    lines = {el.get("data-id"): el for el in fig8.iter(NS + "polyline")}
    dots = {el.get("data-id"): el for el in fig8.iter(NS + "g") if el.get("class") == "series"}
    assert set(lines) == {"dafl", "ta_dfkd"} and set(dots) == {"fast"}  # fast: one teacher -> a single point
    assert len(points(lines["dafl"])) == 2


def test_sample_grid_rows_per_class_upscaled_and_labelled(tmp_path):
    # 10 images of class 3 (grey 0.5), 5 of class 7 (0.75), 1 of class 0 (left half 0.25, right half black),
    # shuffled; 8x8 pixels, bf16 input
    labels = torch.tensor([3] * 10 + [7] * 5 + [0])
    x = torch.tensor([0.5] * 10 + [0.75] * 5 + [0.25]).view(16, 1, 1, 1).repeat(1, 1, 8, 8)
    x[15, :, :, 4:] = 0.0
    x = x.to(torch.bfloat16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "g.png")
    save_sample_grid(path, x[perm], labels[perm])
    img = read_image(path)
    assert img.shape[0] == 3 and img.shape[2] >= 512
    g = img[0].long()

    def band(value):  # the rows and, on the band's middle row, the runs of pixels that hold `value`
        rows = (g == value).any(1).nonzero().flatten()
        mid = g[(rows[0] + rows[-1]) // 2] == value
        runs = int((mid[1:] & ~mid[:-1]).sum() + mid[0])
        return rows, runs, int(mid.sum())
    (r0, n0, w0), (r3, n3, w3), (r7, n7, w7) = band(64), band(128), band(191)
    assert (n0, n3, n7) == (1, 10, 5)  # one image per column, all of a class in its own row
    assert r0[-1] < r3[0] and r3[-1] < r7[0]  # rows in class order, not overlapping
    assert all(len(r) == r[-1] - r[0] + 1 for r in (r0, r3, r7))  # each row one contiguous band
    cell = len(r3)
    assert cell >= 64 and cell % 8 == 0 and w3 == 10 * cell and w7 == 5 * cell and len(r0) == cell  # squares
    assert w0 == cell // 2  # nearest neighbour: the half-grey image stays exactly half grey, no blended edge
    for r in (r0, r3, r7):  # a black class label left of each row's first image
        assert (g[r[0]:r[-1] + 1, :cell // 2] == 0).any()


def test_sample_grid_caps_at_64_images(tmp_path):
    x = torch.rand(100, 3, 32, 32)
    save_sample_grid(str(tmp_path / "a.png"), x)  # no labels: 8 columns, 8 rows
    a = read_image(str(tmp_path / "a.png"))
    assert a.shape[2] >= 512 and abs(a.shape[1] - a.shape[2]) <= 2  # 8 x 8 square cells
    save_sample_grid(str(tmp_path / "b.png"), x, torch.zeros(100, dtype=torch.long))  # one class: one row of 16
    b = read_image(str(tmp_path / "b.png"))
    assert b.shape[2] > 16 * 64 > b.shape[1] and b.shape[1] < 80
