"""scripts/demo.py --only: a stage whose prerequisites have not run stops with a one-line error that
names the missing stage and its output, and writes nothing."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_a_stage_without_its_prerequisites_fails_clearly(tmp_path):
    work = tmp_path / "demo"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--work_dir", str(work), "--only", "DPO"],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"stage 'data' has not run ({work}/data/heldout/meta.json is missing)" in out.stderr
    assert not work.exists()


def test_demo_report_reads_a_win_rate_in_either_orientation():
    """The report takes DPO's and the student's win rates from evaluate_RORem.py's pairs, which are
    stored one way round only; the other way must equal the metric computed with the sides swapped."""
    import importlib.util

    import numpy as np

    from myutils.metrics import win_rate

    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "scripts", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rng = np.random.default_rng(0)
    a, b = rng.random(40), rng.random(40)
    b[:5] = a[:5]  # some ties
    p, (low, high) = win_rate(a, b)
    evaluation = {"win_rates": [{"a": "A", "b": "C", "win_rate": 0.1, "low": 0.0, "high": 0.2},
                                {"a": "A", "b": "B", "win_rate": p, "low": low, "high": high}]}
    assert demo.win_of(evaluation, "A", "B") == (p, low, high)  # the row of that pair, not the first
    q, (qlow, qhigh) = win_rate(b, a)  # computed the other way round from the scores themselves
    assert (q, qlow, qhigh) != (p, low, high)
    assert np.allclose(demo.win_of(evaluation, "B", "A"), (q, qlow, qhigh))
    with pytest.raises(KeyError, match="B against C"):
        demo.win_of(evaluation, "B", "C")


def test_training_stages_resume_what_an_interrupted_demo_left(monkeypatch):
    """A training stage cut short has checkpoints but no final output; rerun, it continues (a new run
    into a folder with checkpoints is refused), other tools run as given."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "scripts", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    calls = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    demo.run(["train_RORem.py", "--output_dir", "x"])
    demo.run(["evaluate_RORem.py", "--output_dir", "y"])
    assert calls[0][-2:] == ["--resume_from_checkpoint", "latest"] and "--resume_from_checkpoint" not in calls[1]


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "scripts", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def _write(path, doc):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("low", [0.41, 0.53])
def test_dpo_report_on_hand_made_runs(tmp_path, low):
    """The DPO section reads the run's final metrics, the pair builder's report and the evaluation: each
    number lands in its row, and the verdict follows the win-rate interval (above 0.5 or not)."""
    from types import SimpleNamespace

    demo = _demo_module()
    _write(tmp_path / "dpo" / "final_metrics.json", {"metrics": {"val_preference_accuracy": 0.8125}, "args": {"max_train_steps": 37}})
    _write(tmp_path / "pairs" / "train" / "report.json", {"natural": {"pairs": 11}, "generated": {"pairs": 5, "min_margin": 0.05,
                                                                                               "inputs_below_margin": 2, "inputs": 7}})
    _write(tmp_path / "pairs" / "heldout" / "meta.json", [{}] * 9)
    teacher, dpo = "trained remover (teacher)", "DPO LoRA on the trained remover"
    rows = [(teacher, 0.02, 0.0, 0.4321, 20), (dpo, 0.019, 0.0, 0.4567, 20)]
    evaluation = {"win_rates": [{"a": teacher, "b": dpo, "win_rate": 1 - 0.62, "low": 1 - 0.71, "high": 1 - low}]}  # stored reversed
    text = "\n".join(demo.dpo_report(str(tmp_path), SimpleNamespace(heldout_samples=24), rows, evaluation))
    assert "Pairs: 11 natural" in text and "5 generated" in text and "margin > 0.05; 2 of 7 inputs" in text and "37 steps" in text
    assert "| preference accuracy (9 natural pairs, 2 noises x 5 timesteps) | 0.500 | 0.812 |" in text
    assert f"(24 inputs, the evaluation) [95% CI] | 0.500 | 0.620 [{low:.3f}, 0.710] |" in text
    assert "| mean discriminator score (the evaluation) | 0.432 | 0.457 |" in text
    assert ("DPO wins more often than its start" in text) == (low > 0.5)
    assert ("**DPO does not clearly beat its start here**" in text) == (low <= 0.5)


def test_lcm_report_on_hand_made_runs(tmp_path):
    demo = _demo_module()
    _write(tmp_path / "lcm" / "final_metrics.json", {"args": {"max_train_steps": 123}})
    names = ("trained remover (teacher)", "trained remover, 4 LCM steps, not distilled", "LCM student, 4 steps",
             "reward-weighted LCM student, 4 steps")
    rows = [(names[0], 0.0251, 0.0, 0.61, 20), (names[1], 0.0302, 0.0, 0.42, 4), (names[2], 0.0275, 0.0, 0.55, 4),
            (names[3], 0.0266, 0.0, 0.58, 4)]
    evaluation = {"win_rates": [{"a": names[3], "b": names[0], "win_rate": 0.45, "low": 0.33, "high": 0.57}]}
    lines = demo.lcm_report(str(tmp_path), rows, evaluation)
    assert "123 steps of 16" in lines[2]
    assert "- teacher (20 UNet calls): masked MSE 0.0251, discriminator 0.610" in lines
    assert "- the same teacher run for 4 LCM steps without distillation: 0.0302, 0.420" in lines
    assert "- plain LCM student, 4 steps: 0.0275, 0.550" in lines
    assert ("- reward-weighted LCM student, 4 steps: 0.0266, 0.580 (discriminator win rate against the 20-step teacher "
            "0.450 [0.330, 0.570])") in lines


def test_a_work_dir_holds_one_choice_of_backgrounds(tmp_path):
    """Every stage reuses what the work_dir holds, so --backgrounds is recorded with the data and another
    choice in the same work_dir is refused (a work_dir from before the record is the smooth toy)."""
    import json

    from types import SimpleNamespace

    demo = _demo_module()
    w = str(tmp_path / "w")
    demo.check_backgrounds(w, ["stripes", "grid"])  # nothing there yet: nothing written either
    assert not (tmp_path / "w").exists()
    calls = []
    demo.run = lambda cmd: calls.append(cmd)
    demo.write_toy_data(w, SimpleNamespace(backgrounds=["stripes", "grid"], train_samples=20, heldout_samples=4))
    assert json.load(open(tmp_path / "w" / "data" / "backgrounds.json")) == ["stripes", "grid"]
    assert all(c[-3:] == ["--backgrounds", "stripes", "grid"] for c in calls) and len(calls) == 2
    demo.check_backgrounds(w, ["stripes", "grid"])  # the same choice goes on
    with pytest.raises(SystemExit, match="holds a demo on --backgrounds stripes grid; choose another --work_dir for "
                                         "--backgrounds smooth"):
        demo.check_backgrounds(w, ["smooth"])
    old = tmp_path / "old"
    (old / "data" / "heldout").mkdir(parents=True)
    (old / "data" / "heldout" / "meta.json").write_text("[]")
    demo.check_backgrounds(str(old), ["smooth"])
    with pytest.raises(SystemExit, match="holds a demo on the smooth backgrounds"):
        demo.check_backgrounds(str(old), ["two_tone"])
