"""Nothing already written is lost and nothing of the wrong kind is taken: a run never replaces
another script's or another model's run, every folder we save says what model it holds and each
reader checks it, outputs are not overwritten unasked, and a run that trained nothing does not save
its start as the final model."""
import hashlib
import importlib.util
import json
import os
import shutil

import pytest

import inference_RORem
import inference_RORem_4S
import train_RORem
import train_RORem_lcm as tlcm
from myutils.errors import UserError
from myutils.models import MODEL_RECORD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "2", "--report_to", "none", "--validation_steps", "0", "--max_train_steps", "2",
            "--use_lora", "--lora_rank", "4", "--learning_rate", "1e-3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
            *extra]


def _lcm(model, meta, out, *extra):
    return [*_train(model, meta, out, *extra), "--num_ddim_timesteps", "10"]


def _digests(folder):
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(folder) for f in fs}


def _convert():
    spec = importlib.util.spec_from_file_location("convert_lora", os.path.join(ROOT, "scripts", "convert_lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, toy_meta):
    """A supervised remover LoRA run and an LCM student run, each 2 steps (a checkpoint each)."""
    from conftest import reset_accelerate

    root = tmp_path_factory.mktemp("runs")
    remover, student = str(root / "remover"), str(root / "student")
    for module, argv in ((train_RORem, _train(tiny_model_dir, toy_meta, remover)), (tlcm, _lcm(tiny_model_dir, toy_meta, student))):
        reset_accelerate()
        module.main([str(a) for a in argv])
    reset_accelerate()
    return remover, student


def test_each_saved_folder_says_what_model_it_holds(two_runs):
    remover, student = two_runs
    for folder, kind, script in ((remover, "remover", "train_RORem.py"), (student, "lcm_student", "train_RORem_lcm.py")):
        for where in (folder, os.path.join(folder, "checkpoint-2")):
            record = json.load(open(os.path.join(where, MODEL_RECORD)))
            assert (record["kind"], record["script"], record["model"]["use_lora"]) == (kind, script, True), where


def test_a_run_never_replaces_another_scripts_or_another_models_run(two_runs, tmp_path, tiny_model_dir, toy_meta, run_script):
    remover, _ = two_runs
    folder = str(tmp_path / "run")
    shutil.copytree(remover, folder)
    before = _digests(folder)
    # another script resuming this run's folder would replace its final LoRA and final_metrics.json
    with pytest.raises(UserError, match=r"--output_dir .*: holds a train_RORem.py run \(remover\); train_RORem_lcm.py would "
                                        r"replace or misread it: give another --output_dir"):
        run_script(tlcm, _lcm(tiny_model_dir, toy_meta, folder, "--resume_from_checkpoint", "latest"))
    # the same script from another model (the same weights in another folder are another model to it)
    other = str(tmp_path / "other_model")
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(UserError, match=r"holds a run with --pretrained_model_name_or_path .*, this one has "
                                        r"--pretrained_model_name_or_path .*other_model"):
        run_script(train_RORem, _train(other, toy_meta, folder, "--resume_from_checkpoint", "latest"))
    # nor from another script's checkpoint named outright
    with pytest.raises(UserError, match=r"--resume_from_checkpoint .*checkpoint-2: holds a train_RORem.py run"):
        run_script(tlcm, _lcm(tiny_model_dir, toy_meta, str(tmp_path / "new"), "--resume_from_checkpoint",
                              os.path.join(folder, "checkpoint-2")))
    assert _digests(folder) == before  # nothing it held was touched
    assert not os.path.exists(tmp_path / "new" / "pytorch_lora_weights.safetensors")


def test_readers_refuse_a_model_of_another_kind(two_runs, tiny_model_dir, disc_dir, tmp_path, toy_meta, run_script):
    import train_RORem_draft

    remover, student = two_runs
    from test_app import _inputs

    _inputs(tmp_path)
    one = ["--pretrained_model", tiny_model_dir, "--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "m.png",
           "--resolution", "32", "--save_path", tmp_path / "out.png"]
    with pytest.raises(UserError, match=r"--RORem_LoRA .*: a remover \(the full sampler's UNet or LoRA\) \(made by train_RORem.py\), "
                                        r"but --RORem_LoRA takes a 4-step LCM student LoRA"):
        inference_RORem_4S.main([str(a) for a in one + ["--RORem_LoRA", remover]])
    with pytest.raises(UserError, match=r"a 4-step LCM student LoRA \(made by train_RORem_lcm.py\), but --RORem_LoRA takes a remover"):
        inference_RORem.main([str(a) for a in one + ["--lora_path", os.path.join(student, "checkpoint-2"), "--inference_steps", "2"]])
    with pytest.raises(UserError, match=r"--student_lora .*: a remover .* but --student_lora takes a 4-step LCM student LoRA"):
        run_script(train_RORem_draft, _train(tiny_model_dir, toy_meta, str(tmp_path / "draft"), "--student_lora", remover,
                                             "--reward", "gt=1", "--sample_steps", "2"))
    from myutils.reward_utils import load_reward_model

    with pytest.raises(UserError, match=r"--RORem_discriminator .*: a remover .* but --RORem_discriminator takes a discriminator"):
        load_reward_model(tiny_model_dir, remover, 32)
    with pytest.raises(UserError, match=r"lora .*: a discriminator \(its folder holds cls_pred_branch.pt\), not a remover LoRA"):
        _convert().main([disc_dir, str(tmp_path / "converted")])
    assert not os.path.exists(tmp_path / "out.png") and not os.path.exists(tmp_path / "converted")
    # what the scripts take still works: the student in 4 steps, the remover with the full sampler
    inference_RORem_4S.main([str(a) for a in one + ["--RORem_LoRA", student]])
    inference_RORem.main([str(a) for a in one + ["--lora_path", remover, "--inference_steps", "2", "--overwrite"]])


def test_convert_lora_never_overwrites_unasked_nor_writes_through_a_link_or_into_a_file(two_runs, tmp_path, capsys):
    _, student = two_runs
    convert = _convert()
    out = tmp_path / "peft"
    written = convert.main([student, str(out)])
    assert json.load(open(out / MODEL_RECORD))["kind"] == "lcm_student"  # still an LCM student after conversion
    first = open(written, "rb").read()
    with pytest.raises(UserError, match=r"pytorch_lora_weights.safetensors: exists; --overwrite replaces it"):
        convert.main([student, str(out)])
    assert open(written, "rb").read() == first
    assert convert.main([student, str(out), "--overwrite"]) == written
    first = open(written, "rb").read()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"output_dir .*a_file: a file, not a folder"):
        convert.main([student, str(tmp_path / "a_file")])
    copy = tmp_path / "copy"
    shutil.copytree(student, copy)
    os.symlink(copy, tmp_path / "link")
    before = _digests(str(copy))
    with pytest.raises(UserError, match=r"the output would overwrite the input"):
        convert.main([str(copy), str(tmp_path / "link"), "--overwrite"])
    assert _digests(str(copy)) == before and open(written, "rb").read() == first


def test_one_image_inference_does_not_replace_a_file_unasked(two_runs, tiny_model_dir, tmp_path):
    from test_app import _inputs

    _inputs(tmp_path)
    (tmp_path / "out.png").write_bytes(b"an earlier result")
    argv = ["--pretrained_model", tiny_model_dir, "--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "m.png",
            "--resolution", "32", "--inference_steps", "2", "--save_path", tmp_path / "out.png"]
    with pytest.raises(UserError, match=r"--save_path .*out.png: exists; --overwrite replaces it"):
        inference_RORem.main([str(a) for a in argv])
    assert (tmp_path / "out.png").read_bytes() == b"an earlier result"
    inference_RORem.main([str(a) for a in argv + ["--overwrite"]])
    assert (tmp_path / "out.png").read_bytes() != b"an earlier result"


def test_a_run_whose_every_step_was_non_finite_fails_and_saves_no_final_model(tmp_path, tiny_model_dir, toy_meta, run_script,
                                                                              monkeypatch):
    from training.loop import TrainingRun

    real = TrainingRun.record_loss
    monkeypatch.setattr(TrainingRun, "record_loss", lambda self, loss: real(self, loss * float("nan")))
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"the loss was not finite at any of the 2 steps of this run \(steps 1-2\), so nothing "
                                        r"was trained and no final model is saved"):
        run_script(train_RORem, _train(tiny_model_dir, toy_meta, str(out)))
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "final_metrics.json").exists()


def test_values_a_method_cannot_mean_are_refused(tmp_path, tiny_model_dir, toy_meta, run_script):
    from myutils.lcm_utils import DDIMSolver
    from myutils.reward_utils import parse_reward_spec

    # 5000 solver steps of 1000 timesteps made every solver timestep -1 and trained at loss 283
    with pytest.raises(UserError, match=r"--num_ddim_timesteps 5000: at most the scheduler's 1000 training timesteps"):
        run_script(tlcm, [*_train(tiny_model_dir, toy_meta, str(tmp_path / "lcm")), "--num_ddim_timesteps", "5000"])
    with pytest.raises(ValueError):
        DDIMSolver([0.5] * 1000, 1000, 5000)
    for spec, message in (("discriminator=1,discriminator=2", "'discriminator' is named twice"),
                          ("gt=nan", "weight of 'gt' must be a finite number >= 0, got nan"),
                          ("gt=-1", "weight of 'gt' must be a finite number >= 0, got -1"),
                          ("gt=0,preserve=0", "every weight is 0")):
        with pytest.raises(UserError, match=message):
            parse_reward_spec(spec)
    with pytest.raises(UserError, match=r"^--reward_guidance: weight of 'gt' is not a number"):
        tlcm.parse_args(_train(tiny_model_dir, toy_meta, "o", "--reward_guidance", "gt=x"))


def test_scores_that_contradict_each_other_are_named(tmp_path, toy_meta, caplog):
    from myutils.data import read_meta
    from myutils.data import check_scores_agree

    base = json.load(open(toy_meta))[:3]
    folder = os.path.dirname(os.path.abspath(toy_meta))
    meta = [{**{k: os.path.join(folder, e[k]) for k in ("source", "mask", "GT")}, "score": s} for e in base for s in (1, 0)]
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"every result is scored both good and bad \(e.g. .*entry 0 and entry 1"):
        check_scores_agree(read_meta(str(path), "scored"))
    path.write_text(json.dumps(meta + [{**meta[0], "GT": meta[2]["GT"], "score": 1}]))
    check_scores_agree(read_meta(str(path), "scored"))
    assert "6 of 7 entries score the same result both good and bad" in caplog.text
