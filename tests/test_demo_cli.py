"""scripts/demo.py --only: a stage whose prerequisites have not run stops with a one-line error that
names the missing stage and its output, and writes nothing."""
import json
import os
import subprocess
import sys

import numpy as np
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


def _hand_made_evaluation(demo, n=6):
    """Per-input masked MSE and discriminator scores of every demo system: the teacher at 0.2 / 0.5 on
    every input; DPO-GT 0.01 lower on every input; GRPO-GT mixed (no clear change); the discriminator's
    GRPO raises the score while the error grows (hacking); the weighted students beside the plain one."""
    rng = np.random.default_rng(0)
    base = {k: (0.2, 0.5) for k in demo.SYSTEMS}
    base.update(fill=(0.3, 0.4), dpo_gt=(0.19, 0.5), sdpo_gt=(0.18, 0.5), lcm=(0.25, 0.45), lcm_labels=(0.24, 0.45),
                lcm_rewarded=(0.25, 0.55),
                dpo=(0.2, 0.52), rl=(0.23, 0.6), ppo_gt=(0.2, 0.5))
    per_input = {demo.SYSTEMS[k]: {"masked_mse": [m] * n, "discriminator_score": [d] * n} for k, (m, d) in base.items()}
    per_input[demo.SYSTEMS["rl_gt"]]["masked_mse"] = list(0.2 + rng.normal(0, 0.01, n))
    wins = [{"a": demo.SYSTEMS[k], "b": demo.SYSTEMS["teacher"], "win_rate": 0.6, "low": 0.45, "high": 0.73}
            for k in ("dpo_gt", "dpo", "lcm_labels", "lcm_rewarded")]
    wins += [{"a": demo.SYSTEMS["teacher"], "b": demo.SYSTEMS[k], "win_rate": 0.35, "low": 0.22, "high": 0.5}
             for k in ("sdpo_gt", "sdpo")]
    return {"per_input": per_input, "win_rates": wins}


def test_lead_table_and_hacking_rows_on_a_hand_made_evaluation(tmp_path):
    demo = _demo_module()
    evaluation = _hand_made_evaluation(demo)
    _write(tmp_path / "flow_rl" / "reward_history.json", {"evals": [{"per_sample": [{"reward": -0.7}] * 3},
                                                                     {"per_sample": [{"reward": r} for r in (-0.6, -0.65, -0.62)]}]})
    # PGMORL: a front of one policy exactly 1 above the start on both objectives on every test input;
    # reference (0, 0): hypervolume 2 x 3 = 6 against 1 x 2 = 2
    _write(tmp_path / "morl_gt" / "policies.json", {"objectives": ["gt", "preserve"], "reference": [0.0, 0.0], "test": {
        "inputs": 4, "start": [[1.0, 2.0]] * 4, "front": {"gen01_policy0": [[2.0, 3.0]] * 4}, "hypervolume_start": 2.0,
        "hypervolume_front": 6.0}})
    rows = {(r["method"], r["signal"]): r for r in demo.method_rows(str(tmp_path), evaluation)}
    first = rows["supervised remover vs the border fill", "GT (training triplets)"]
    assert (first["start"], first["end"], first["verdict"]) == (pytest.approx(0.3), pytest.approx(0.2), "better")
    assert rows["DPO", "candidate pairs judged against GT"]["verdict"] == "better"
    assert rows["DPO", "candidate pairs judged against GT"]["difference"] == pytest.approx(-0.01)
    assert rows["GRPO", "reward: minus the masked error against GT"]["verdict"] == "no clear change"
    assert rows["label-weighted LCM vs plain LCM", "each target's GT-based label"]["difference"] == pytest.approx(-0.01)
    flow = rows["Flow-GRPO (tiny FLUX-Fill, from random init)", "reward: minus the masked error against GT, plus preservation"]
    assert flow["difference"] == pytest.approx(0.7 - 0.6233333, abs=1e-6) and flow["verdict"] == "better"
    grpo = rows["GRPO", "reward: the discriminator"]
    assert grpo["measure"] == "discriminator score" and grpo["difference"] == pytest.approx(0.1) and grpo["verdict"] == "better"
    morl = rows["PGMORL (1 policy on the front)", "GT error and preserve"]
    assert (morl["start"], morl["end"], morl["difference"], morl["low"], morl["high"]) == (2.0, 6.0, 4.0, 4.0, 4.0)
    assert morl["verdict"] == "better" and morl["cells"][5] == "+4.00000 [+4.00000, +4.00000]"
    assert not any(m == "PGMORL (1 policy on the front)" and s != "GT error and preserve" for m, s in rows)  # no run, no row
    hacking = demo.hacking_lines(evaluation)
    line = next(x for x in hacking if x.startswith("| GRPO | reward: the discriminator |"))
    assert "+0.100 [+0.100, +0.100]" in line and "+0.0300 [+0.0300, +0.0300]" in line and "reward hacking" in line
    assert any(x.startswith("| DPO | candidate pairs judged against GT |") and "GT error fell, the score unchanged" in x for x in hacking)


def test_dpo_lcm_and_rl_sections_on_hand_made_runs(tmp_path):
    from types import SimpleNamespace

    demo = _demo_module()
    evaluation = _hand_made_evaluation(demo)
    for judge, out, steps, acc in (("gt", "dpo_gt", 37, 0.8125), ("discriminator", "dpo", 38, 0.625), ("gt", "sdpo_gt", 37, 0.75),
                                   ("discriminator", "sdpo", 38, 0.5)):
        _write(tmp_path / out / "final_metrics.json", {"metrics": {"val_preference_accuracy": acc}, "args": {"max_train_steps": steps}})
        _write(tmp_path / "pairs" / judge / "report.json", {"generated": {"pairs": 5, "min_margin": 0.005, "inputs_below_margin": 2}})
    _write(tmp_path / "pairs" / "heldout" / "meta.json", [{}] * 9)
    rows = [(demo.SYSTEMS[k], 0.2, 0.0, 0.5, 4 if "lcm" in k else 20) for k in demo.SYSTEMS]
    text = "\n".join(demo.dpo_report(str(tmp_path), SimpleNamespace(pair_inputs=7), rows, evaluation))
    assert "| DPO | GT | 5 (2 below 0.005) | 37 | 0.812 (9 pairs) | 0.600 [0.450, 0.730] | 0.500 (0.500) |" in text
    assert "| DPO | discriminator | 5 (2 below 0.005) | 38 | 0.625 (9 pairs) |" in text
    assert "| SDPO | GT | 5 (2 below 0.005) | 37 | 0.750 (9 pairs) | 0.650 [0.500, 0.780] |" in text
    # SDPO against DPO on the same pairs: GT-judged 0.18 vs DPO's 0.19 on every input
    assert "| SDPO vs DPO, GT-judged pairs | 0.1900 | 0.1800 | -0.0100 [-0.0100, -0.0100] | better |" in text
    assert "| SDPO vs DPO, discriminator-judged pairs | 0.2000 | 0.2000 | +0.0000 [+0.0000, +0.0000] | no clear change |" in text
    _write(tmp_path / "lcm" / "final_metrics.json", {"args": {"max_train_steps": 123}})
    lines = demo.lcm_report(str(tmp_path), rows, evaluation)
    assert "123 steps of 16" in lines[2]
    assert "- teacher (20 UNet calls): masked MSE 0.2000, discriminator 0.500" in lines
    assert ("- label-weighted LCM student, 4 steps: 0.2000, 0.500 (discriminator win rate against the 20-step teacher "
            "0.600 [0.450, 0.730])") in lines
    args = {"num_train_epochs": 6, "sample_batch_size": 8, "sample_batches_per_epoch": 2, "group_size": 4, "sample_steps": 10,
            "eta": 1.0, "learning_rate": 5e-3, "clip_range": 0.2, "eval_samples": 3}
    for out, end in (("rl_gt", -0.1), ("ppo_gt", -0.2), ("rl", 0.6)):
        _write(tmp_path / out / "final_metrics.json", {"args": args, "metrics": {
            "start_eval_sde_reward": -0.3, "eval_sde_reward": -0.25, "start_eval_reward": -0.2, "eval_reward": end, "eval_kl_to_start": 0.01}})
        _write(tmp_path / out / "reward_history.json", {"evals": [{"per_sample": [{"reward": -0.2}] * 3},
                                                                  {"per_sample": [{"reward": end}] * 3}]})
    text = "\n".join(demo.rl_report(str(tmp_path)))
    assert "6 epochs of 16 training inputs x 4 samples" in text
    assert "| GRPO, GT reward | -0.3000 -> -0.2500 | -0.2000 -> -0.1000 | +0.1000 [+0.1000, +0.1000] | 0.0100 |" in text
    assert "| GRPO, discriminator reward | -0.3000 -> -0.2500 | -0.2000 -> 0.6000 | +0.8000 [+0.8000, +0.8000] |" in text


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


def test_rounds_section_on_hand_made_rounds(tmp_path):
    """make demo-rounds' report: each remover against the start and the rounds' data against the steps
    alone, paired, and the per-round figures of the round reports."""
    from types import SimpleNamespace

    demo = _demo_module()
    w = tmp_path
    for r in (1, 2):  # every stage's output exists: nothing runs
        for path in (f"rounds/inputs{r}/meta.json", f"rounds/remover{r}/unet/config.json", f"rounds/steps{r}/unet/config.json"):
            _write(w / path, {})
        _write(w / f"rounds/r{r}/report.json", {"true_success_rate": 0.25 * r, "discriminator_success_rate": 0.3, "success_rate": 0.4,
                                                 "kept_precision": 0.5, "audit_agreement": None, "train_entries": 100 * r})
    mse = {"start": [0.3, 0.3, 0.3], "after round 1": [0.2, 0.3, 0.25], "round 1: the same steps, original data": [0.3] * 3,
           "after round 2": [0.2, 0.2, 0.2], "round 2: the same steps, original data": [0.1, 0.1, 0.1]}
    _write(w / "rounds/evaluation/results.json", {"per_input": {k: {"masked_mse": v} for k, v in mse.items()}})
    args = SimpleNamespace(round_inputs=400, round_steps=200, eval_steps=20, backgrounds=["grid"], seed=0)
    lines = demo.rounds_part(str(w), "model", str(w / "remover"), "disc", "train.json", "held.json", args)
    text = "\n".join(lines)
    assert "| round 2 data + steps | rounds 1-2's kept results | masked MSE | 0.3000 | 0.2000 | -0.1000 [-0.1000, -0.1000] | better |" in text
    assert "| the rounds' data vs the steps alone | kept results | masked MSE | 0.1000 | 0.2000 | +0.1000 [+0.1000, +0.1000] | worse |" in text
    assert "| success rate, known answer (the remover of the round) | 25.0% | 50.0% |" in text
    assert "| people vs discriminator on the audit | - | - |" in text and "| training entries after the round | 100 | 200 |" in text


def test_lcm_epsilon_part_switches_the_prediction_type_and_compares_the_student(tmp_path):
    """make demo-lcm-epsilon: the epsilon model is the demo's model folder with only the scheduler's
    prediction type switched; the report compares the student with the teacher's 4 and 20 steps and
    its undistilled 4 LCM steps, paired."""
    from types import SimpleNamespace

    demo = _demo_module()
    w, model = tmp_path / "w", tmp_path / "w" / "models" / "toy"
    _write(model / "model_index.json", {"_class_name": "StableDiffusionXLInpaintPipeline"})
    _write(model / "scheduler" / "scheduler_config.json", {"prediction_type": "v_prediction", "num_train_timesteps": 1000})
    _write(model / "unet" / "config.json", {"sample_size": 4})
    d = w / "lcm_epsilon"
    for path in ("teacher/unet/config.json", "student/final_metrics.json"):  # the training stages have run
        _write(d / path, {})
    mse = {"teacher, 20 steps": [0.3, 0.3], "teacher, 4 steps": [0.4, 0.5], "teacher, 4 LCM steps undistilled": [0.25, 0.25],
           "student, 4 LCM steps": [0.2, 0.3]}
    _write(d / "evaluation" / "results.json", {"per_input": {k: {"masked_mse": v} for k, v in mse.items()}})
    args = SimpleNamespace(epsilon_steps=1500, epsilon_lcm_steps=200, eval_steps=20, heldout_samples=2, seed=0)
    lines = demo.lcm_epsilon_part(str(w), str(model), str(w / "remover"), "train.json", "held.json", args)
    eps = d / "model"
    assert json.load(open(eps / "scheduler" / "scheduler_config.json")) == {"prediction_type": "epsilon", "num_train_timesteps": 1000}
    assert json.load(open(eps / "unet" / "config.json")) == {"sample_size": 4} and not (d / "model.tmp").exists()
    text = "\n".join(lines)
    assert "| LCM distillation vs the teacher's 4 steps | the teacher | masked MSE | 0.4500 | 0.2500 | -0.2000 [-0.2000, -0.2000] | better |" in text
    assert "| LCM distillation vs 4 undistilled LCM steps | the teacher | masked MSE | 0.2500 | 0.2500 |" in text
    assert "| teacher, 20 steps | 0.3000 |" in text


def test_draft_part_trains_beside_grpo_and_rg_lcd_and_compares_each_with_its_start(tmp_path, monkeypatch):
    """make demo-draft: what it runs (the stages stood in for by a fake run that writes each one's output):
    DRaFT with GRPO's two rewards from the same remover, seed and data; AlignProp on the main demo's plain
    LCM student's own LoRA; RG-LCD as that student's very distillation plus the guidance. The report:
    each row against its own start, paired, in the measure of its signal, and both measures per run."""
    from types import SimpleNamespace

    demo = _demo_module()
    w = tmp_path / "w"
    names = demo.DRAFT_SYSTEMS
    mse = {"teacher": 0.20, "rl_gt": 0.21, "draft_gt": 0.18, "rl": 0.22, "draft": 0.19, "lcm": 0.16, "draft_lcm_gt": 0.14,
           "draft_lcm": 0.17, "rg_lcd_gt": 0.15, "rg_lcd": 0.16}
    score = {"teacher": 0.5, "rl_gt": 0.45, "draft_gt": 0.5, "rl": 0.4, "draft": 0.6, "lcm": 0.45, "draft_lcm_gt": 0.5,
             "draft_lcm": 0.55, "rg_lcd_gt": 0.45, "rg_lcd": 0.45}
    noise = [0.0, 0.01, -0.01]
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        out = cmd[cmd.index("--output_dir") + 1]
        if cmd[0] == "evaluate_RORem.py":
            systems = dict(a.split("=", 1) for a in cmd[cmd.index("--system") + 1::2] if "=" in a)
            assert set(systems) == set(names.values())
            _write(tmp_path / "w" / "draft_evaluation" / "results.json", {"per_input": {
                names[k]: {"masked_mse": [mse[k] + e for e in noise], "discriminator_score": [score[k] + e for e in noise]}
                for k in names}})
        else:
            _write(type(tmp_path)(out) / "final_metrics.json", {})

    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr(demo, "LOG_DIR", [str(w / "logs")])  # as main() sets it: the two lanes' stages log there
    args = SimpleNamespace(seed=3, lcm_steps=80, eval_steps=20, heldout_samples=3, rg_lcd_beta_gt=0.001, rg_lcd_beta=0.002)
    text = "\n".join(demo.draft_part(str(w), args))
    by_out = {c[c.index("--output_dir") + 1].split("/")[-1]: c for c in calls}
    assert set(by_out) == {"rl_gt", "rl", "lcm", "draft_gt", "draft", "draft_lcm_gt", "draft_lcm", "rg_lcd_gt", "rg_lcd",
                           "draft_evaluation"}

    def value(cmd, flag):
        return cmd[cmd.index(flag) + 1] if flag in cmd else None

    for draft, grpo in (("draft_gt", "rl_gt"), ("draft", "rl")):  # the same start, data, seed and held-out set as GRPO
        for flag in ("--pretrained_unet", "--meta_path", "--validation_meta_path", "--seed", "--pretrained_model_name_or_path"):
            assert value(by_out[draft], flag) == value(by_out[grpo], flag), (draft, flag)
    assert value(by_out["draft_gt"], "--reward") == value(by_out["rl_gt"], "--reward") == "gt=1"
    assert value(by_out["draft"], "--reward") == "discriminator=1"  # GRPO's (configs/toy_ddpo.yaml's) reward
    assert value(by_out["draft_lcm"], "--student_lora") == f"{w}/lcm"
    plain = [a for a in by_out["lcm"] if a != f"{w}/lcm"]
    for rg, guidance in (("rg_lcd_gt", "gt=0.001"), ("rg_lcd", "discriminator=0.002")):
        cmd = by_out[rg]
        assert value(cmd, "--reward_guidance") == guidance
        assert [a for a in cmd if a not in (f"{w}/{rg}", "--reward_guidance", guidance)] == plain  # the same distillation
    assert "| DRaFT-1 | reward: GT error (latents) | masked MSE | 0.2000 | 0.1800 | -0.0200 [-0.0200, -0.0200] | better |" in text
    assert "| DRaFT-1 vs GRPO | the GT error | masked MSE | 0.2100 | 0.1800 | -0.0300 [-0.0300, -0.0300] | better |" in text
    assert "| RG-LCD vs plain LCM | guidance: the discriminator | discriminator score | 0.450 | 0.450 | +0.000 [+0.000, +0.000] |" in text
    assert ("| DRaFT-1 | reward: the discriminator (its gradient) | +0.100 [+0.100, +0.100] | -0.0100 [-0.0100, -0.0100] | "
            "both improved: no sign of hacking |") in text
    assert "| LCM student + AlignProp, GT reward | 0.1400 | 0.500 |" in text
    assert text.count("| DRaFT-1 vs GRPO |") == 1  # a comparison of two methods: in the lead table, not read for hacking
