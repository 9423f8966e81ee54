"""scripts/demo.py --only: a stage whose prerequisites have not run stops with a one-line error that
names the missing stage and its output, and writes nothing."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_a_stage_without_its_prerequisites_fails_clearly(tmp_path):
    work = tmp_path / "demo"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--work_dir", str(work), "--only", "DPO"],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"stage 'data' has not run ({work}/data/heldout/meta.json is missing)" in out.stderr
    assert not work.exists()
