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
