"""train_RORem_lcm.py and train_RORem_lcm_rewarded.py: only the LoRA trains, gradients are really
clipped, w is drawn from [w_min, w_max], the saved LoRA loads with an LCMScheduler, and reward
weighting behaves (keep-all equals plain LCM, keep-nothing skips every update)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train_RORem_lcm as tlcm
import train_RORem_lcm_rewarded as trew
from myutils.errors import UserError
from training import adapters, checkpoint, prepare, validation


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "4", "--report_to", "none", "--checkpointing_steps", "100", "--lora_rank", "4",
            "--learning_rate", "1e-3", "--num_ddim_timesteps", "10", *extra]


def test_lcm_lora_trains_only_lora_clips_and_loads_with_lcm_scheduler(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    from diffusers import LCMScheduler, UNet2DConditionModel

    from myutils.models import load_inpaint_pipeline

    seen_w, norms, saved = [], [], {}
    real_step, real_make, real_final = tlcm.consistency_step, prepare.make_optimizer, checkpoint.save_final
    monkeypatch.setattr(tlcm, "consistency_step", lambda *a: seen_w.append(a[6].clone()) or real_step(*a))

    def recording_optimizer(args, params, accelerator):
        opt = real_make(args, params, accelerator)
        opt.register_step_pre_hook(lambda *_: norms.append(torch.norm(torch.stack([p.grad.norm() for p in params
                                                                                   if p.grad is not None])).item()))
        return opt

    monkeypatch.setattr(prepare, "make_optimizer", recording_optimizer)
    monkeypatch.setattr(checkpoint, "save_final", lambda acc, args, model, save, **kw: (saved.setdefault("m", acc.unwrap_model(model)),
                                                                               real_final(acc, args, model, save, **kw)))
    sampled, real_sample = [], validation.sample_validation
    monkeypatch.setattr(validation, "sample_validation", lambda *a, **kw: sampled.append(kw) or real_sample(*a, **kw))
    out = str(tmp_path / "lcm")
    run_script(tlcm, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "3", "--w_min", "2", "--w_max", "5",
                           "--max_grad_norm", "1e-4", "--validation_steps", "3", "--num_validation_images", "2",
                           "--validation_inference_steps", "2", "--use_ema_target", "--lora_alpha", "8"))
    w = torch.cat(seen_w)
    assert ((w >= 2) & (w <= 5)).all() and w.std() > 0  # really drawn per sample from [w_min, w_max]
    assert len(norms) == 3 and all(n <= 1e-4 * 1.01 for n in norms)  # clipped before every optimizer step
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in saved["m"].state_dict().items() if "lora" not in k}
    assert all(torch.equal(trained[k].float(), base[k].float()) for k in base)
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert any("time_emb_proj" in k for k in lora) and any("conv1" in k for k in lora)  # the LCM-LoRA module list
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    assert os.path.isfile(os.path.join(out, "validation", "step-000003.png"))
    # the student is validated as inference_RORem_4S ships it: 4 LCM steps at strength 1 (all 4 run), not 3 of 4 at 0.99
    student = [kw for kw in sampled if kw.get("scheduler") is not None]
    assert student and all(kw["steps"] == 4 and kw["strength"] == 1.0 for kw in student)

    pipe = load_inpaint_pipeline(tiny_model_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(out)
    x, t = torch.randn(1, 9, 16, 16), torch.tensor([500])
    kw = {"encoder_hidden_states": torch.randn(1, 77, 64),
          "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.ones(1, 6) * 32}}
    with torch.no_grad():  # every trained layer arrives: the loaded pipeline computes what training ended with
        assert torch.allclose(pipe.unet(x, t, **kw).sample, saved["m"](x, t, **kw).sample, atol=1e-5)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused change stays in the base weights
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    from PIL import Image
    img, mask = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = pipe(prompt="", image=img, mask_image=mask, height=32, width=32, num_inference_steps=4, guidance_scale=1.0,
                  strength=1.0).images[0]
    assert result.size == (32, 32)


def test_rewarded_keep_all_equals_plain_and_keep_nothing_skips(tmp_path, tiny_model_dir, toy_meta, disc_dir, run_script):
    common = ["--max_train_steps", "2", "--w_min", "0", "--w_max", "1", "--seed", "3"]
    run_script(tlcm, _args(tiny_model_dir, toy_meta, str(tmp_path / "plain"), *common))
    run_script(trew, _args(tiny_model_dir, toy_meta, str(tmp_path / "all"), *common, "--discriminator_path", disc_dir,
                           "--weighting", "filter", "--reward_threshold=-1e9"))
    plain = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    kept = load_file(str(tmp_path / "all" / "pytorch_lora_weights.safetensors"))
    assert max((plain[k] - kept[k]).abs().max().item() for k in plain) < 1e-6  # weights all 1: the plain LCM loss
    scores = json.load(open(tmp_path / "all" / "data_scores.json"))
    assert len(scores) == 12 and all(isinstance(s, float) for s in scores)  # every training GT scored once

    run_script(trew, _args(tiny_model_dir, toy_meta, str(tmp_path / "none"), *common, "--discriminator_path", disc_dir,
                           "--weighting", "filter", "--reward_threshold", "1e9", "--report_to", "tensorboard", "--logging_steps", "1"))
    nothing = load_file(str(tmp_path / "none" / "pytorch_lora_weights.safetensors"))
    assert all(v.abs().max() == 0 for k, v in nothing.items() if "lora_B" in k or "lora.up" in k)  # no update at all
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "none" / "logs") for f in fs if f.startswith("events")]
    acc = EventAccumulator(logs[0])
    acc.Reload()
    assert [e.value for e in acc.Scalars("skipped_steps")] == [1, 2]
    assert [e.value for e in acc.Scalars("filtered_fraction")] == [1, 1]
    assert "loss" not in acc.Tags()["scalars"]  # never a NaN loss logged
    assert "scores" in acc.Tags()["histograms"]


def test_rewarded_sources_score_what_they_name(tmp_path, tiny_model_dir, toy_meta, disc_dir, run_script, monkeypatch):
    """One step from the same batch, noise and solver index under each --reward_source: `teacher`
    scores the teacher's guided x0, `student` the student's prediction (both on latents, against the
    source), `data` the cached GT scores; the softmax weights are B * softmax(score / T) of those, so
    the three sources weight the same batch differently."""
    from myutils.reward_utils import DiscriminatorReward

    seen = {}
    real_tensors, real_score, real_weights = tlcm.distillation_tensors, DiscriminatorReward.score_latents, tlcm.reward_weights

    def tensors(*a, **k):
        out = real_tensors(*a, **k)
        seen.setdefault("pred", out[0].detach().clone())
        seen.setdefault("teacher_x0", out[2].detach().clone())
        seen.setdefault("index", out[3]["index"].clone())
        return out

    def score(self, source, mask, edited, *a, **k):
        seen.setdefault("edited", edited.detach().clone())
        return real_score(self, source, mask, edited, *a, **k)

    def weights(scores, *a, **k):
        w = real_weights(scores, *a, **k)
        seen.setdefault("scores", scores.clone())
        seen.setdefault("weights", w.clone())
        return w

    monkeypatch.setattr(tlcm, "distillation_tensors", tensors)
    monkeypatch.setattr(DiscriminatorReward, "score_latents", score)
    monkeypatch.setattr(tlcm, "reward_weights", weights)
    runs = {}
    for source in ("data", "teacher", "student"):
        seen.clear()
        out = str(tmp_path / source)
        run_script(trew, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "1", "--discriminator_path", disc_dir,
                               "--reward_source", source, "--weighting", "softmax", "--reward_temperature", "0.05",
                               "--cache_latents"))
        runs[source] = dict(seen)
        assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
        assert os.path.exists(os.path.join(out, "data_scores.json")) == (source == "data")
    for source in ("data", "teacher", "student"):
        r = runs[source]
        assert torch.equal(r["index"], runs["data"]["index"])  # the same batch each time
        s = r["scores"].double()
        assert torch.allclose(r["weights"].double(), len(s) * torch.softmax(s / 0.05, 0), atol=1e-6)
    assert torch.equal(runs["teacher"]["edited"], runs["teacher"]["teacher_x0"])
    assert torch.equal(runs["student"]["edited"], runs["student"]["pred"])
    assert not torch.allclose(runs["teacher"]["teacher_x0"], runs["student"]["pred"], atol=1e-4)
    cached = json.load(open(tmp_path / "data" / "data_scores.json"))  # one score per training entry
    data = runs["data"]
    assert data["scores"].tolist() == pytest.approx([cached[i] for i in data["index"].tolist()])
    for a, b in (("teacher", "student"), ("teacher", "data"), ("student", "data")):
        assert (runs[a]["weights"] - runs[b]["weights"]).abs().max() > 1e-3, (a, b)


def test_labels_source_weights_by_each_entrys_own_score_without_a_discriminator(tmp_path, tiny_model_dir, toy_meta, run_script,
                                                                                 monkeypatch):
    """--reward_source labels: the scores are the training entries' meta.json scores (here 1 on even
    entries), the filter keeps exactly those; an entry without a score is named in a one-line error."""
    root = os.path.dirname(toy_meta)
    entries = [{**{k: os.path.join(root, v) for k, v in e.items()}, "score": int(i % 2 == 0)}
               for i, e in enumerate(json.load(open(toy_meta)))]
    (tmp_path / "scored.json").write_text(json.dumps(entries))
    seen = []
    real_weights = tlcm.reward_weights

    def weights(scores, *a, **k):
        seen.append((scores.clone(), real_weights(scores, *a, **k)))
        return seen[-1][1]

    real_tensors = tlcm.distillation_tensors
    indices = []

    def tensors(*a, **k):
        out = real_tensors(*a, **k)
        indices.append(out[3]["index"].cpu().clone())
        return out

    monkeypatch.setattr(tlcm, "reward_weights", weights)
    monkeypatch.setattr(tlcm, "distillation_tensors", tensors)
    run_script(trew, _args(tiny_model_dir, str(tmp_path / "scored.json"), str(tmp_path / "o"), "--max_train_steps", "2",
                           "--reward_source", "labels", "--weighting", "filter", "--reward_threshold", "0.5"))
    assert len(seen) == 2
    for (scores, w), index in zip(seen, indices):
        labels = torch.tensor([float(i % 2 == 0) for i in index.tolist()])
        assert torch.equal(scores.float(), labels)
        assert torch.allclose(w.float(), labels * len(labels) / labels.sum())  # the kept ones, weights B / kept
    assert not os.path.exists(tmp_path / "o" / "data_scores.json")
    (tmp_path / "unscored.json").write_text(json.dumps([entries[0], {k: v for k, v in entries[1].items() if k != "score"}]))
    with pytest.raises(UserError, match="unscored.json: entry 1: missing key 'score'"):
        run_script(trew, _args(tiny_model_dir, str(tmp_path / "unscored.json"), str(tmp_path / "u"), "--max_train_steps", "1",
                               "--reward_source", "labels"))


def test_weighting_curriculum_and_argument_errors(tmp_path, toy_meta):
    args = tlcm.parse_args(["--meta_path", toy_meta, "--output_dir", str(tmp_path), "--curriculum", "threshold",
                            "--reward_threshold", "0.7", "--curriculum_steps", "100"])
    assert tlcm.weighting_params(args, 0, 1000)[0] == 0.0
    assert tlcm.weighting_params(args, 50, 1000)[0] == pytest.approx(0.35)
    assert tlcm.weighting_params(args, 500, 1000)[0] == pytest.approx(0.7)  # strict after the curriculum
    with pytest.raises(UserError, match="--discriminator_path is required"):
        tlcm.parse_args(["--meta_path", toy_meta, "--output_dir", str(tmp_path)], rewarded=True)
    with pytest.raises(UserError, match="trains a LoRA"):
        tlcm.parse_args(["--meta_path", toy_meta, "--output_dir", str(tmp_path), "--no-use_lora"])
    with pytest.raises(UserError, match="--w_min"):
        tlcm.parse_args(["--meta_path", toy_meta, "--output_dir", str(tmp_path), "--w_min", "5", "--w_max", "1"])
    with pytest.raises(UserError, match="jpeg cannot be differentiated here"):
        tlcm.parse_args(["--meta_path", toy_meta, "--output_dir", str(tmp_path), "--reward_guidance", "jpeg=1"])
    with pytest.raises(UserError, match="--reward_guidance discriminator needs --discriminator_path"):
        tlcm.parse_args(["--meta_path", toy_meta, "--output_dir", str(tmp_path), "--reward_guidance", "discriminator=1"])


def test_reward_guidance_adds_minus_the_weighted_reward_of_the_one_step_prediction(tmp_path, tiny_model_dir, toy_meta, disc_dir,
                                                                                    run_script, monkeypatch):
    """RG-LCD: the loss each step backpropagates is the LCM loss minus beta x the reward of the
    student's prediction: the gt part by hand (the hole's mean squared error against GT's posterior-mean
    latents), the discriminator's as it scores those latents; with the LCM loss taken away, the
    guidance alone trains the LoRA."""
    from accelerate import Accelerator

    from myutils.sdxl_inpaint import posterior_mean_latents

    seen, lcm = [], []
    real_guidance, real_lcm = tlcm.guidance_reward, tlcm.per_sample_lcm_loss
    monkeypatch.setattr(tlcm, "guidance_reward", lambda args, reward, comps, batch, pred: seen.append(
        {"batch": batch, "pred": pred.detach(), "reward": reward, "vae": comps.vae, "out": real_guidance(args, reward, comps, batch, pred)})
        or seen[-1]["out"])
    monkeypatch.setattr(tlcm, "per_sample_lcm_loss", lambda *a: lcm.append(real_lcm(*a).detach()) or lcm[-1])
    losses = []
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: losses.append(loss.detach()) or loss.backward())
    common = ["--max_train_steps", "2", "--discriminator_path", disc_dir, "--weighting", "none",
              "--reward_guidance", "gt=2,discriminator=0.5"]
    run_script(tlcm, _args(tiny_model_dir, toy_meta, str(tmp_path / "rg"), *common))
    assert len(seen) == len(losses) == len(lcm) == 2
    assert not os.path.exists(tmp_path / "rg" / "data_scores.json")  # --weighting none: no weights, nothing scored for them
    for s, loss, lcm_losses in zip(seen, losses, lcm):
        b, pred = s["batch"], s["pred"]
        gt = posterior_mean_latents(b["params:GT"], s["vae"].config)
        hole = (b["mask_latent"] >= 0.5).float().expand_as(pred)
        gt_reward = -(((pred - gt) ** 2) * hole).sum((1, 2, 3)) / hole.sum((1, 2, 3))
        source = posterior_mean_latents(b["params:source"], s["vae"].config)
        disc = s["reward"].score_latents(source, b["mask_latent"], pred, b["original_size"], b["crop_top_left"])
        parts, total = s["out"]
        assert torch.allclose(parts["gt"], gt_reward, atol=1e-5) and torch.allclose(parts["discriminator"], disc, atol=1e-5)
        want = lcm_losses.mean() - (2 * gt_reward + 0.5 * disc).mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)

    monkeypatch.setattr(tlcm, "per_sample_lcm_loss", lambda pred, target, *a: 0.0 * pred.flatten(1).sum(1))
    run_script(tlcm, _args(tiny_model_dir, toy_meta, str(tmp_path / "guidance_only"), *common))
    w = load_file(str(tmp_path / "guidance_only" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in w.items() if "lora_B" in k or "lora.up" in k)


def test_four_step_inference_counts_unet_calls(tmp_path, tiny_model_dir, toy_meta, run_script):
    import inference_RORem_4S

    out = str(tmp_path / "lcm")
    run_script(tlcm, _args(tiny_model_dir, toy_meta, out, "--max_train_steps", "1"))
    root = os.path.dirname(toy_meta)
    entry = json.load(open(toy_meta))[0]
    base = ["--pretrained_model", tiny_model_dir, "--RORem_LoRA", out, "--image_path", os.path.join(root, entry["source"]),
            "--mask_path", os.path.join(root, entry["mask"]), "--resolution", "32"]
    assert inference_RORem_4S.main(base + ["--save_path", str(tmp_path / "r4.png")]) == 4
    assert os.path.isfile(tmp_path / "r4.png")
    assert inference_RORem_4S.main(base + ["--save_path", str(tmp_path / "r3.png"), "--strength", "0.99"]) == 3  # int(4 * 0.99)
    with pytest.raises(UserError, match="--RORem_LoRA is required"):
        inference_RORem_4S.main(base[:2] + base[4:] + ["--save_path", str(tmp_path / "x.png")])


def test_lcm_sweep_tabulates_teacher_plain_and_weighted(tmp_path, tiny_model_dir, toy_meta, disc_dir):
    import importlib.util

    from tests.test_build_preference_pairs import ROOT

    spec = importlib.util.spec_from_file_location("sweep_lcm", os.path.join(ROOT, "scripts", "sweep_lcm.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    argv = ["--output_root", str(tmp_path / "sweep"), "--thresholds", "0.5", "--temperatures", "--",
            *[a for a in _args(tiny_model_dir, toy_meta, "x") if a not in ("--output_dir", "x")], "--max_train_steps", "1",
            "--discriminator_path", disc_dir, "--validation_steps", "1", "--validation_inference_steps", "2",
            "--num_validation_images", "2", "--win_rate_samples", "3"]
    rows = sweep.main(argv)
    assert [r["run"] for r in rows] == ["teacher", "plain", "filter_0.5"]
    # the teacher: 2 steps at --validation_strength 0.99 run int(1.98) = 1 UNet call; the students all 4
    assert rows[0]["unet_calls"] == 1 and rows[1]["unet_calls"] == 4 and rows[2]["weighting"] == "filter, score >= 0.5"
    for row, run in zip(rows[1:], ("plain", "filter_0.5")):  # each row is its run's own final validation
        m = json.load(open(tmp_path / "sweep" / run / "final_metrics.json"))["metrics"]
        assert (row["win_rate"], row["score"], row["masked_mse"]) == (m["val_win_rate"], m["val_score"], m["val_masked_mse"])
        assert row["teacher_masked_mse"] == m["val_reference_masked_mse"] == rows[0]["masked_mse"]  # one teacher for all
    assert rows[0]["win_rate"] == 0.5 and rows[0]["score"] == rows[1]["teacher_score"]
    assert "| plain | plain LCM |" in open(tmp_path / "sweep" / "sweep_results.md").read()


def test_rewarded_lcm_resume_equals_a_straight_run(tmp_path, tiny_model_dir, toy_meta, disc_dir, run_script):
    """EMA target, optimizer state and the score memory are restored: with --score_every 4 the steps
    after the resume reuse scores the first run made (rescoring them changes the weights); with RG-LCD's
    guidance on top."""
    common = ["--w_min", "0", "--w_max", "2", "--discriminator_path", disc_dir, "--reward_source", "teacher", "--weighting", "softmax",
              "--use_ema_target", "--checkpointing_steps", "1", "--score_every", "4", "--reward_temperature", "0.01",
              "--reward_guidance", "preserve=1,gt=1"]
    run_script(trew, _args(tiny_model_dir, toy_meta, str(tmp_path / "straight"), *common, "--max_train_steps", "5"))
    half = str(tmp_path / "resumed")
    run_script(trew, _args(tiny_model_dir, toy_meta, half, *common, "--max_train_steps", "3"))
    memory = torch.load(os.path.join(half, "checkpoint-3", "custom_checkpoint_1.pkl"), weights_only=False)
    assert len(memory["scores"]) == len(memory["stamps"]) >= 8  # every sample trained on so far
    run_script(trew, _args(tiny_model_dir, toy_meta, half, *common, "--max_train_steps", "5", "--resume_from_checkpoint", "latest"))
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(half, "pytorch_lora_weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_distillation_step_on_a_tiny_unet_matches_diffusers_schedulers(tiny_model_dir, toy_meta, tmp_path):
    """The script's own student prediction and target, recomputed independently: the base UNet (LoRA
    off) for the guided teacher, diffusers' DDIM (trailing) step, LCMScheduler's boundary output."""
    from accelerate import Accelerator
    from diffusers import DDIMScheduler, LCMScheduler

    from myutils.data import RemovalDataset, read_meta
    from myutils.lcm_utils import DDIMSolver
    from myutils.rng import randint_per_sample, randn_per_sample, sample_generators
    from myutils.sdxl_inpaint import sample_latents, unet_input

    args = tlcm.parse_args(_args(tiny_model_dir, toy_meta, str(tmp_path), "--w_min", "2", "--w_max", "2",
                                 "--teacher_prompt", "sharp", "--teacher_negative_prompt", "blurry"))
    acc = Accelerator()
    comps = prepare.Components(args, acc, torch.float32, guidance_prompts=(args.teacher_prompt, args.teacher_negative_prompt))
    unet = comps.unet
    adapters.add_lora(unet, args, torch.float32)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # the student differs from its teacher
    ds = RemovalDataset(read_meta(toy_meta, "triplet"), "triplet", 32)
    batch = {k: torch.stack([torch.as_tensor(ds[i][k]) for i in range(2)])
             for k in ("source", "mask", "GT", "original_size", "crop_top_left", "index", "epoch")}
    sched = comps.noise_scheduler
    solver = DDIMSolver(sched.alphas_cumprod, 1000, args.num_ddim_timesteps)
    pred, target, _, b = tlcm.distillation_tensors(unet, acc, comps, batch, args, solver, None, ("GT", "masked"))

    gens = sample_generators(b, args.seed)  # the same per-sample draws, in the script's order
    latents = sample_latents(b["params:GT"], comps.vae.config, gens)
    masked = sample_latents(b["params:masked"], comps.vae.config, gens)
    noise = randn_per_sample(gens, latents.shape[1:], "cpu")
    index = randint_per_sample(gens, args.num_ddim_timesteps, "cpu")
    ddim = DDIMScheduler.from_config(sched.config, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(args.num_ddim_timesteps)
    lcm = LCMScheduler.from_config(sched.config, clip_sample=False)
    size = (b["original_size"], b["crop_top_left"], (32, 32))
    with torch.no_grad():
        for i in range(2):
            start = int(solver.ddim_timesteps[index[i]])
            prev = max(start - 1000 // args.num_ddim_timesteps, 0)
            sl = slice(i, i + 1)
            kw = {c: cond.unet_kwargs(size[0][sl], size[1][sl], size[2])
                  for c, cond in (("s", comps.condition), ("c", comps.guidance[0]), ("u", comps.guidance[1]))}
            x = sched.add_noise(latents[sl], noise[sl], torch.tensor([start]))
            inp = lambda z: unet_input(z, b["mask_latent"][sl], masked[sl])  # noqa: E731
            lcm.set_timesteps(timesteps=[start])
            want_pred = lcm.step(unet(inp(x), start, **kw["s"]).sample, start, x).denoised
            unet.disable_adapters()
            c, u = unet(inp(x), start, **kw["c"]).sample, unet(inp(x), start, **kw["u"]).sample
            unet.enable_adapters()
            x_prev = ddim.step(c + 2.0 * (c - u), start, x, eta=0.0).prev_sample
            lcm.set_timesteps(timesteps=[prev])
            want_target = lcm.step(unet(inp(x_prev), prev, **kw["s"]).sample, prev, x_prev).denoised
            assert torch.allclose(pred[sl], want_pred, atol=1e-4)
            assert torch.allclose(target[sl], want_target, atol=1e-4)
