"""scripts/gpu_check.sh, the one GPU check, in its dry mode: every run it makes on a GPU runs here on the
simulated GPU (toy_world/sim_gpu.py), in an environment that mirrors the GPU machine's image
(scripts/gpu_image_env.sh: Python 3.12, torch 2.11, the image's library versions) with the wheels
scripts/fetch_gpu_wheels.sh fetches installed the way the check installs them there. Every command
passes in fp16 and bf16 and resumed, the host waits for the GPU at most once per steady training
step (LCM on live scores: twice), and the README's table of those counts is this run's."""
import json
import os
import re
import subprocess
import sys

import torch
from safetensors.torch import save_file

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402

TRAINING = ["train_RORem.py", "train_RORem_dpo.py", "train_RORem_kto.py", "train_RORem_lcm.py", "train_RORem_lcm_rewarded.py",
            "train_RORem_discriminator.py", "train_RORem_ddpo.py", "train_RORem_morl.py", "train_RORem_draft.py"]
COMMANDS = ["DeepSpeed ZeRO-2", "SDPO", "train_RORem_kto (", "weighted by live teacher scores", "train_RORem_lcm_rewarded",
            "DRaFT-2", "ReFL", "AlignProp", "PPO", "GRPO", "pairwise", "Flow-GRPO", "train_RORem_morl",
            "inference_RORem (meta.json", "inference_RORem (one image)", "inference_RORem_4S", "inference_RORem_discriminator (batch)",
            "inference_RORem_discriminator (one image)", "evaluate_RORem", "data_round", "build_preference_pairs", "app_RORem"]
TWO_READS = ("weighted by live teacher scores",)  # the score memory is the host's (README)


def mirror_python(tmp_path):
    """The mirror of the GPU image (built once per checkout: .venv-gpu-image, git-ignored)."""
    env = os.path.join(ROOT, ".venv-gpu-image")
    if not os.path.isfile(os.path.join(env, "constraints.txt")):  # written last: a half-built one is rebuilt
        subprocess.run(["bash", "scripts/gpu_image_env.sh"], cwd=ROOT, check=True, timeout=1500)
    return os.path.join(env, "bin", "python")


def test_dry_run_in_the_gpu_image_runs_every_command_and_holds_the_sync_table(tmp_path):
    python = mirror_python(tmp_path)
    # fetched now, from this clone by the machine's own python3 (no .venv needed), for the mirror's Python
    wheels = tmp_path / "wheels"
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                             text=True).stdout.strip()
    fetched = subprocess.run(["bash", "scripts/fetch_gpu_wheels.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, WHEELS=str(wheels), PYTHON="python3", PYTHON_VERSION=version))
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    size = sum(f.stat().st_size for f in wheels.iterdir())
    assert size < 40 * 2 ** 20  # the device tool carries at most 64 MiB with the whole tree
    env = dict(os.environ, PYTHON=python, OUT=str(tmp_path / "out"), WHEELS=str(wheels), GPU_CHECK_SITE=str(tmp_path / "site"))
    env.pop("PYTHONPATH", None)
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    report = json.load(open(tmp_path / "out" / "gpu_check.json"))
    rows = report["rows"]
    assert res.returncode == 0 and all(r["status"] == "ok" for r in rows), \
        [(r["name"], r["precision"], r["status"]) for r in rows if r["status"] != "ok"] or res.stdout[-3000:] + res.stderr[-2000:]
    assert re.search(r"torch 2\.11\.0.*transformers 5\.17\.0, accelerate 1\.15\.0", report["environment"]), report["environment"]
    tiny = [r for r in rows if r["part"] in ("tiny", "inference")]
    names = " ".join(r["name"] for r in tiny)
    for what in COMMANDS:
        assert what in names, what
    for script in TRAINING:  # each training script in part 1, in both precisions and resumed, and its shipped config in part 2
        for p in ("fp16", "bf16"):
            assert any(r["name"].startswith(script[:-3] + " ") and r["precision"] == p for r in tiny), (script, p)
            assert any(r["name"].startswith(script[:-3] + " ") and r["name"].endswith(", resumed") and r["precision"] == p
                       for r in tiny) or script == "train_RORem_lcm.py", (script, p)
        assert any(r["name"].startswith(script + " ") for r in rows if r["part"] == "real"), script
    for r in rows:  # the host waits for the GPU once per steady step (twice where the README says why), resumed too
        if r.get("syncs_per_step") is not None:
            allowed = 2 if any(w in r["name"] for w in TWO_READS) else 1
            assert r["syncs_per_step"] <= allowed, (r["name"], r["precision"], r["syncs_per_step"])
    measured = [r for r in rows if r["part"] == "tiny" and r.get("syncs_per_step") is not None]
    assert len({r["name"] for r in measured}) >= 9  # most trainers have steady steps in these short runs
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert gpu_check.readme_with_sync_table(readme, rows) == readme, "README's host-sync table is not this run's: " \
        "run python scripts/gpu_check.py --update_readme <out>/gpu_check.json"
    real = [r for r in rows if r["part"] == "real"]
    assert all(r["s_per_step"] and r["s_per_step"] > 0 for r in real)  # measured, from the first step on (RL: sampling included)
    assert [r for r in real if r["plan"]] and "64 px" in " ".join(r["note"] for r in real)
    table = open(tmp_path / "out" / "gpu_check.md").read()
    assert "| real | train_RORem_dpo.py (dpo_config.yaml) |" in table and "## Host syncs per optimizer step" in table
    assert os.path.isfile(tmp_path / "out" / "gpu_check.log") and not os.path.exists(tmp_path / "out" / "work")


def test_a_non_finite_output_is_a_failure(tmp_path):
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


def test_the_sync_table_is_written_between_the_readme_markers():
    rows = [{"part": "tiny", "name": "train_X (a)", "precision": "fp16", "syncs_per_step": 1},
            {"part": "tiny", "name": "train_X (a)", "precision": "bf16", "syncs_per_step": 1},
            {"part": "tiny", "name": "train_X (a), resumed", "precision": "bf16", "syncs_per_step": 5},
            {"part": "inference", "name": "inference_Y", "precision": "fp16", "syncs_per_step": None}]
    text = "before\n" + gpu_check.README_SYNCS[0] + "old\n" + gpu_check.README_SYNCS[1] + "after\n"
    assert gpu_check.readme_with_sync_table(text, rows) == ("before\n" + gpu_check.README_SYNCS[0] +
                                                            "| training command (tiny models, simulated GPU) | fp16 | bf16 |\n|---|---|---|\n"
                                                            "| train_X (a) | 1 | 1 |\n" + gpu_check.README_SYNCS[1] + "after\n")
