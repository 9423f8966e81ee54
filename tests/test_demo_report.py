"""toy_world/report.py: the paired intervals and verdicts the demo's lead table is made of, against
values computed by hand."""
import math

import numpy as np
import pytest

from toy_world.report import hacking_reading, lead_table, method_row, paired_difference, verdict


def test_paired_difference_by_hand():
    # differences 1, 2, 3: mean 2, sample std 1, half width 1.96 / sqrt(3)
    mean, low, high = paired_difference([0, 0, 0], [1, 2, 3])
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2 - 1.959964 / math.sqrt(3), 2 + 1.959964 / math.sqrt(3)))
    # pairing matters: the same values unpaired would overlap, paired they do not
    a, b = [0.50, 0.10, 0.90, 0.30], [0.49, 0.09, 0.88, 0.29]
    mean, low, high = paired_difference(a, b)
    assert mean == pytest.approx(-0.0125) and high < 0
    assert np.isnan(paired_difference([1.0], [2.0])[1])
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([], [])


@pytest.mark.parametrize("low, high, lower_is_better, want", [
    (-0.3, -0.1, True, "better"), (-0.3, -0.1, False, "worse"), (0.1, 0.2, True, "worse"), (0.1, 0.2, False, "better"),
    (-0.1, 0.1, True, "no clear change"), (float("nan"), float("nan"), True, "no interval")])
def test_verdict_follows_the_interval_and_the_direction(low, high, lower_is_better, want):
    assert verdict(low, high, lower_is_better) == want


def test_method_row_and_table_cells():
    row = method_row("DPO", "pairs judged against GT", "masked MSE", [0.2, 0.3, 0.4], [0.1, 0.2, 0.3], True)
    assert row["start"] == pytest.approx(0.3) and row["end"] == pytest.approx(0.2) and row["difference"] == pytest.approx(-0.1)
    assert row["verdict"] == "better" and row["inputs"] == 3  # every input exactly 0.1 lower: zero-width interval below 0
    assert row["cells"] == ["DPO", "pairs judged against GT", "masked MSE", "0.3000", "0.2000", "-0.1000 [-0.1000, -0.1000]", "better"]
    table = lead_table([row])
    assert table[0].startswith("| method | signal | held-out measure | start | end | paired difference [95% CI] | verdict |")
    assert table[2] == "| DPO | pairs judged against GT | masked MSE | 0.3000 | 0.2000 | -0.1000 [-0.1000, -0.1000] | better |"


def test_hacking_reading():
    up, down, flat = ({"verdict": v} for v in ("better", "worse", "no clear change"))
    assert hacking_reading(up, down).startswith("reward hacking")
    assert hacking_reading(up, flat).startswith("score up, GT error not better")
    assert hacking_reading(up, up) == "both improved: no sign of hacking"
    assert hacking_reading(down, down) == "the score fell and the GT error grew"
    assert hacking_reading(down, up) == "the score fell while the GT error fell"
    assert hacking_reading(down, flat) == "the score fell, the GT error unchanged"
    assert hacking_reading(flat, down) == "GT error grew without a clear score gain"
    assert hacking_reading(flat, up) == "GT error fell, the score unchanged"
    assert hacking_reading(flat, flat) == "no clear change in either"


def test_rl_signal_bench_separates_signal_from_noise_by_hand():
    """bench/bench_rl_signal.py: estimates g + e_i with mutually orthogonal e_i of equal norm give
    exactly |g|^2 from the cross terms and |e|^2 * samples as the noise per sample."""
    import importlib.util
    import os

    import torch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_rl_signal", os.path.join(root, "bench", "bench_rl_signal.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    g = torch.zeros(8, dtype=torch.float64)
    g[0] = 1.0  # |g|^2 = 1
    e = torch.zeros(4, 8, dtype=torch.float64)
    for i in range(4):  # orthogonal to g and to each other, |e|^2 = 9
        e[i, i + 1] = 3.0
    signal, stderr, noise, cosine = bench.signal_and_noise(g + e, samples_each=10)
    assert signal == pytest.approx(1.0) and stderr == pytest.approx(0.0, abs=1e-12)  # every leave-one-out gives 1
    assert noise == pytest.approx(90.0)  # 10 samples per estimate: per-sample variance 10 x 9
    assert cosine == pytest.approx(1 / 10)  # (g + e_i).(g + e_j) / |g + e|^2 = 1 / (1 + 9)
    # one dimension, estimates 1, 2, 3: cross products 2, 3, 6 (mean 11/3); leaving one out gives 6, 3, 2,
    # so the jackknife error is sqrt(2/3 x ((7/3)^2 + (2/3)^2 + (5/3)^2)) = sqrt(52) / 3
    signal, stderr, _, _ = bench.signal_and_noise(torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64), samples_each=1)
    assert signal == pytest.approx(11 / 3) and stderr == pytest.approx(52 ** 0.5 / 3)


def test_hypervolume_change_by_hand():
    """Start (1, 1), one policy at (2, 2) on every input, reference (0, 0): areas 1 and 4, change 3 in
    every resample; a policy identical to the start changes nothing; mixed inputs give an interval."""
    from toy_world.report import hypervolume_change

    start = [[1.0, 1.0]] * 5
    assert hypervolume_change(start, [[[2.0, 2.0]] * 5], [0.0, 0.0], draws=50) == pytest.approx((3.0, 3.0, 3.0))
    assert hypervolume_change(start, [start], [0.0, 0.0], draws=50) == pytest.approx((0.0, 0.0, 0.0))
    # two policies, each better on one objective: the union's area, 2x1 + 1x2 - 1x1 = 3, minus the start's 1
    two = [[[2.0, 1.0]] * 5, [[1.0, 2.0]] * 5]
    assert hypervolume_change(start, two, [0.0, 0.0], draws=50)[0] == pytest.approx(2.0)
    noisy = [[[1.0 + d, 1.0]] for d in (-0.5, 0.5, -0.5, 0.5, 0.2)]  # per input, mean 1.04 on the first objective
    change, low, high = hypervolume_change(start, [[v[0] for v in noisy]], [0.0, 0.0], draws=400)
    assert change == pytest.approx(0.04) and low < 0 < high
    with pytest.raises(ValueError, match="one objective vector per test input"):
        hypervolume_change(start, [[[1.0, 1.0]] * 4], [0.0, 0.0])


def test_rl_signal_bench_runs_on_a_demo_layout(tmp_path, tiny_model_dir, toy_meta, disc_dir, capsys, monkeypatch):
    """The bench on a folder laid out as a finished demo (tiny models, 12 toy inputs): one table row per
    reward, each from its own epochs, with the demo's sample count taken from rl/final_metrics.json."""
    import importlib.util
    import json
    import os
    import shutil
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_rl_signal", os.path.join(root, "bench", "bench_rl_signal.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    w = tmp_path / "demo"
    shutil.copytree(tiny_model_dir, w / "models" / "toy_sdxl_inpaint")
    shutil.copytree(os.path.join(tiny_model_dir, "unet"), w / "remover" / "unet")
    shutil.copytree(disc_dir, w / "discriminator")
    for part in ("train", "heldout"):
        shutil.copytree(os.path.dirname(toy_meta), w / "data" / part)
    (w / "rl").mkdir()
    (w / "rl" / "final_metrics.json").write_text(json.dumps({"args": {
        "sample_batch_size": 8, "sample_batches_per_epoch": 2, "group_size": 4, "num_train_epochs": 6}}))
    monkeypatch.setattr(sys, "argv", ["bench_rl_signal.py", "--work_dir", str(w), "--epochs", "2"])
    bench.main()
    out = capsys.readouterr().out
    assert "demo's online RL: 6 epochs x 64 samples = 384 samples" in out
    rows = [line for line in out.splitlines() if line.startswith("| gt |") or line.startswith("| discriminator |")]
    assert len(rows) == 2 and all(r.split(" | ")[1:3] == ["2", "64"] for r in rows)


def test_an_interval_touching_zero_is_no_clear_change():
    assert verdict(-0.3, 0.0, True) == "no clear change" and verdict(0.0, 0.3, True) == "no clear change"


def test_the_95_percent_intervals_cover_the_truth_95_percent_of_the_time():
    """Coverage by simulation, against the truth the simulation knows: 2000 experiments of 40 paired
    inputs for paired_difference, 100 for the bootstrap of hypervolume_change (one policy, two objectives,
    the start at the origin: its change is (m0 - r0)(m1 - r1) - r0 r1 for the policy's mean m)."""
    from toy_world.report import hypervolume_change

    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        _, low, high = paired_difference(np.zeros(40), rng.normal(0.2, 1.0, 40))
        hits += low <= 0.2 <= high
    assert 0.93 <= hits / 2000 <= 0.96
    reference, m = np.array([-1.0, -1.0]), np.array([0.5, 0.3])
    truth = (m[0] - reference[0]) * (m[1] - reference[1]) - reference[0] * reference[1]
    hits = 0
    for rep in range(100):
        front = rng.normal(m, 0.4, size=(40, 2))
        _, low, high = hypervolume_change(np.zeros((40, 2)), [front], reference, draws=200, seed=rep)
        hits += low <= truth <= high
    assert 0.85 <= hits / 100 <= 1.0
