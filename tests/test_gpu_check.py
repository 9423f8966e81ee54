"""scripts/gpu_check.sh, the one GPU check, in its CPU dry mode: every run it makes on a GPU runs here
too (small, fp32), the table and JSON are written, and a non-finite output counts as a failure."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from tests.conftest import ROOT

TRAINING = ["train_RORem.py", "train_RORem_dpo.py", "train_RORem_kto.py", "train_RORem_lcm.py", "train_RORem_lcm_rewarded.py",
            "train_RORem_discriminator.py", "train_RORem_ddpo.py", "train_RORem_morl.py", "train_RORem_draft.py"]


def test_dry_run_runs_every_script_and_writes_the_table(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    rows = json.load(open(tmp_path / "out" / "gpu_check.json"))["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    names = " ".join(r["name"] for r in rows)
    for script in TRAINING:  # each training script in part 1 (tiny models) and part 2 (its shipped config)
        assert any(r["name"].startswith(script[:-3] + " ") for r in rows if r["part"] == "tiny"), script
        assert any(r["name"].startswith(script + " ") for r in rows if r["part"] == "real"), script
    for what in ("DeepSpeed ZeRO-2", "Flow-GRPO", "inference_RORem (", "inference_RORem_4S", "inference_RORem_discriminator",
                 "evaluate_RORem", "train_RORem_lcm_rewarded", "train_RORem_ddpo (PPO"):
        assert what in names, what
    real = [r for r in rows if r["part"] == "real"]
    assert all(r["s_per_step"] and r["s_per_step"] > 0 for r in real)  # measured, from the first step on (RL: sampling included)
    assert [r for r in real if r["plan"]]  # the planner's prediction beside the measurement
    assert "64 px" in " ".join(r["note"] for r in real)  # LoRA DPO at the larger size too
    table = open(tmp_path / "out" / "gpu_check.md").read()
    assert "| real | train_RORem_dpo.py (dpo_config.yaml) |" in table and "planner GiB" in table
    assert os.path.isfile(tmp_path / "out" / "gpu_check.log") and not os.path.exists(tmp_path / "out" / "work")


def test_a_non_finite_output_is_a_failure(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_check

    save_file({"w": torch.ones(3)}, str(tmp_path / "good.safetensors"))
    assert gpu_check.finite_outputs(str(tmp_path / "good.safetensors"))
    (tmp_path / "bad").mkdir()
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "bad" / "x.safetensors"))
    assert not gpu_check.finite_outputs(str(tmp_path / "bad"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "final_metrics.json").write_text(json.dumps({"metrics": {"val_masked_mse": float("inf")}}))
    assert not gpu_check.finite_outputs(str(tmp_path / "m"))
    assert not gpu_check.finite_outputs(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert not gpu_check.finite_outputs(str(tmp_path / "empty"))  # nothing written is not a pass
