"""Each training script's input building and forward passes as they run on a GPU (fake CUDA, see
tests/fake_cuda.py): student, teacher, reference, discriminator, samplers and rewards, with the models
on "cuda" in fp16/bf16. Any CPU tensor meeting a CUDA one fails here as it would on the first step of
a real run (a time id built on the CPU, a draw from a generator of the wrong device, text encoders
left behind). Plus the dtype rules that only mixed precision shows: LoRA weights stay fp32 when
several adapters are added, and validation encodes and decodes with the VAE in fp32 under fp16."""
import json
import os

import pytest
import torch

import train_RORem
import train_RORem_ddpo
import train_RORem_discriminator
import train_RORem_dpo
import train_RORem_lcm
from myutils.data import RemovalDataset, read_meta, stack_samples, to_device
from training import adapters, prepare, rl_loop, validation
from tests.fake_cuda import CUDA, fake_accelerator, fake_cuda, on_cuda, on_host
from test_rorem_files import rorem_lcm_lora  # noqa: F401 (fixture: RORem's 4-step LoRA file)


def _batch(meta, kind, n=2):
    ds = RemovalDataset(read_meta(meta, kind), kind, 32)
    return stack_samples([ds[i] for i in range(n)])


def _common(model, out):
    return ["--pretrained_model_name_or_path", model, "--output_dir", out, "--resolution", "32", "--report_to", "none"]


@pytest.fixture(scope="module")
def pair_meta(tmp_path_factory, toy_meta):
    root = os.path.dirname(toy_meta)
    pairs = [{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"]),
              "preferred": os.path.join(root, e["GT"]), "rejected": os.path.join(root, e["source"])} for e in json.load(open(toy_meta))]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(pairs))
    return str(path)


def test_supervised_step_full_and_lora(tiny_model_dir, toy_meta, tmp_path):
    # a full fine-tune keeps fp32 weights (accelerate autocasts its forward, which fake CUDA cannot): fp32 here
    for extra, dtype in (([], torch.float32), (["--use_lora"], torch.float16), (["--use_lora"], torch.bfloat16)):
        args = train_RORem.parse_args(_common(tiny_model_dir, str(tmp_path)) + ["--meta_path", toy_meta, *extra])
        with fake_cuda():
            comps = prepare.Components(args, fake_accelerator(), dtype)
            if args.use_lora:
                adapters.add_lora(comps.unet, args, dtype)
            comps.unet.to(CUDA)  # what accelerator.prepare does
            on_cuda(train_RORem.diffusion_loss(comps.unet, comps, to_device(_batch(toy_meta, "triplet"), CUDA), 32, args.seed))


def test_dpo_policy_and_reference(tiny_model_dir, pair_meta, tmp_path):
    args = train_RORem_dpo.parse_args(_common(tiny_model_dir, str(tmp_path)) + ["--preference_data", pair_meta, "--use_lora"])
    with fake_cuda():
        comps = prepare.Components(args, fake_accelerator(), torch.float16)
        adapters.add_lora(comps.unet, args, torch.float16)
        comps.unet.to(CUDA)
        x, t, target, kw = train_RORem_dpo.pair_inputs(comps, to_device(_batch(pair_meta, "pair"), CUDA), 32, args.seed)
        pred = comps.unet(x, t, **kw).sample
        ref = train_RORem_dpo.reference_prediction(comps.unet, None, x, t, kw)
        on_cuda(x, t, target, pred, ref)  # (the loss reads its metrics with .item(), which fake tensors cannot)


def test_kto_policy_reference_and_labels(tiny_model_dir, toy_meta, tmp_path):
    import train_RORem_kto
    from myutils.sdxl_inpaint import noised_inputs
    from training.preference import reference_prediction

    scored = tmp_path / "scored.json"
    root = os.path.dirname(toy_meta)
    scored.write_text(json.dumps([{**{k: os.path.join(root, v) for k, v in e.items()}, "score": i % 2}
                                  for i, e in enumerate(json.load(open(toy_meta)))]))
    args = train_RORem_kto.parse_args(_common(tiny_model_dir, str(tmp_path)) + ["--meta_path", str(scored), "--use_lora"])
    with fake_cuda():
        comps = prepare.Components(args, fake_accelerator(), torch.bfloat16)
        adapters.add_lora(comps.unet, args, torch.bfloat16)
        comps.unet.to(CUDA)
        batch = to_device(_batch(str(scored), "scored"), CUDA)
        x, t, target, kw = noised_inputs(comps.noise_scheduler, comps.vae, comps.condition, batch, 32, args.seed)
        pred = comps.unet(x, t, **kw).sample
        ref = reference_prediction(comps.unet, None, x, t, kw)
        on_cuda(x, t, target, pred, ref, (batch["score"] >= 0.5).to(pred.device))  # the labels the loss takes


def test_lcm_student_teacher_target_and_reward(tiny_model_dir, toy_meta, disc_dir, tmp_path):
    from myutils.lcm_utils import DDIMSolver
    from myutils.reward_utils import load_reward_model
    from myutils.sdxl_inpaint import posterior_mean_latents

    args = train_RORem_lcm.parse_args(_common(tiny_model_dir, str(tmp_path)) + ["--meta_path", toy_meta, "--lora_rank", "4",
                                                                               "--discriminator_path", disc_dir,
                                                                               "--reward_guidance", "discriminator=1,gt=1,preserve=1"])
    with fake_cuda():
        acc = fake_accelerator()
        comps = prepare.Components(args, acc, torch.float16, guidance_prompts=(args.teacher_prompt, args.teacher_negative_prompt))
        adapters.add_lora(comps.unet, args, torch.float16)
        comps.unet.to(CUDA)
        sched = comps.noise_scheduler
        solver = DDIMSolver(sched.alphas_cumprod, sched.config.num_train_timesteps, args.num_ddim_timesteps).to(CUDA)
        keys = ("GT", "masked", "source")
        pred, target, teacher_x0, batch = train_RORem_lcm.distillation_tensors(
            comps.unet, acc, comps, to_device(_batch(toy_meta, "triplet"), CUDA), args, solver, None, keys)
        on_cuda(pred, target, teacher_x0)
        reward = load_reward_model(tiny_model_dir, disc_dir, 32, CUDA, torch.float16)
        source = posterior_mean_latents(batch["params:source"], comps.vae.config)  # what sample_scores hands the reward
        on_cuda(reward.score_latents(source, batch["mask_latent"], teacher_x0, batch["original_size"], batch["crop_top_left"]))
        parts, total = train_RORem_lcm.guidance_reward(args, reward, comps, batch, pred)  # RG-LCD's term
        on_cuda(total, *parts.values())


def test_discriminator_training_step(tiny_model_dir, toy_meta, tmp_path):
    from toy_world.data import write_scored_toy_dataset

    scored = write_scored_toy_dataset(toy_meta, str(tmp_path / "scored"), seed=0)
    args = train_RORem_discriminator.parse_args(_common(tiny_model_dir, str(tmp_path)) + ["--meta_path", scored])
    with fake_cuda():
        comps = prepare.Components(args, fake_accelerator(), torch.float16)
        with on_host():
            disc = train_RORem_discriminator.build_discriminator(args, comps, torch.float16)
        disc.to(CUDA)  # as main() does
        on_cuda(train_RORem_discriminator.discriminator_loss(disc, comps, to_device(_batch(scored, "scored"), CUDA), args))
    assert all(p.dtype == torch.float32 for p in disc.parameters() if p.requires_grad)


def _rl_step(args, acc, dtype, batch):
    """Sampling an epoch's batch, its rewards and one policy-gradient step's forward passes (with the
    KL to the LoRA-off reference), as train_RORem_ddpo.py runs them."""
    from myutils.rl_utils import gaussian_kl, gaussian_log_prob, ppo_loss
    from myutils.rng import sample_generators
    from pipelines.rl_sampler import sample_trajectory

    sampler = rl_loop.load_sampler(args, acc, dtype)
    adapters.add_lora(sampler.model, args, dtype)
    sampler.model.to(CUDA)
    reward_model = rl_loop.load_reward(args, acc, dtype)
    b = rl_loop.expand_batch(to_device(batch, CUDA), sampler, args.group_size)
    traj = sample_trajectory(sampler, sampler.model, b, sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, 0))
    parts, total = rl_loop.compute_rewards(args, reward_model, sampler, traj["latents"][:, -1], b)
    x = traj["latents"][:, 0]
    mean, scale = sampler.distribution(sampler.model, x, 0, b)
    with adapters.disabled(sampler.model):
        ref_mean, _ = sampler.distribution(sampler.model, x, 0, b)
    log_prob = gaussian_log_prob(traj["latents"][:, 1], mean, scale)
    loss = ppo_loss(log_prob, traj["log_probs"][:, 0], torch.ones(len(x), device=CUDA), 1e-4)[0] + gaussian_kl(mean, ref_mean, scale).mean()
    on_cuda(traj["latents"], traj["log_probs"], loss, sampler.decode(traj["latents"][:, -1]))
    return parts, total


def test_online_rl_sdxl_sampling_rewards_and_policy_step(tiny_model_dir, toy_meta, disc_dir, tmp_path):
    args = train_RORem_ddpo.parse_args(_common(tiny_model_dir, str(tmp_path)) + [
        "--meta_path", toy_meta, "--reward", "discriminator=1,preserve=0.5,gt=1", "--discriminator_path", disc_dir,
        "--algorithm", "grpo", "--group_size", "2", "--sample_steps", "3", "--sample_batch_size", "2", "--train_batch_size", "2",
        "--guidance_scale", "2"])
    with fake_cuda():
        parts, total = _rl_step(args, fake_accelerator(), torch.float16, _batch(toy_meta, "triplet"))
    assert set(parts) == {"discriminator", "preserve", "gt"} and total.shape == (4,)


@pytest.mark.parametrize("student", [False, True], ids=["remover", "lcm_student"])
def test_direct_reward_chain_rewards_and_drift(tiny_model_dir, toy_meta, disc_dir, tmp_path, rorem_lcm_lora, student):  # noqa: F811
    """train_RORem_draft.py's step under fp16: the differentiable chain of each method (ReFL's x0,
    AlignProp's checkpointed calls), the latent rewards through the discriminator and the drift
    against the start (a new LoRA's UNet; or RORem's 4-step LoRA file as loaded, sampled with LCM steps)."""
    import train_RORem_draft
    from myutils.reward_utils import TRAINING_FLAGS, latent_rewards, load_reward_model
    from myutils.rng import sample_generators
    from pipelines.rl_sampler import SDXLInpaintSampler, sample_with_grad

    args = train_RORem_draft.parse_args(_common(tiny_model_dir, str(tmp_path)) + [
        "--meta_path", toy_meta, "--reward", "discriminator=1,preserve=0.5,gt=1", "--discriminator_path", disc_dir,
        "--sample_steps", "3"])
    host = _batch(toy_meta, "triplet")
    gens = sample_generators(host, 0)  # CPU generators from the CPU bookkeeping, as the script draws them
    with fake_cuda():
        acc = fake_accelerator()
        comps = prepare.Components(args, acc, torch.float16, guidance_prompts=("", ""))
        if student:
            adapters.load_trainable_lora(comps.unet, rorem_lcm_lora, torch.float16, "--student_lora")
        else:
            adapters.add_lora(comps.unet, args, torch.float16)
        comps.unet.to(CUDA)
        start = adapters.called_with(comps.unet, adapters.trainable_state(comps.unet))
        sampler = SDXLInpaintSampler(comps, 3, 1.0, 0.0, 32, scheduler="lcm" if student else "ddim")
        reward = load_reward_model(tiny_model_dir, disc_dir, 32, acc.device, torch.float16, flags=TRAINING_FLAGS)
        batch = to_device(host, CUDA)
        cond = train_RORem_draft.conditioned(sampler, batch)
        for grad_steps, refl, ckpt in ((1, None, False), (3, None, True), (1, 1, False)):
            x, steps = sample_with_grad(sampler, comps.unet, cond, [g.clone_state() for g in gens], grad_steps, refl_step=refl,
                                        checkpointing=ckpt)
            parts, total = latent_rewards(args.rewards, reward, cond, x, cond["GT_latents"])
            with torch.no_grad():
                refs = [sampler.output(start, x_in.detach(), j, cond) for j, x_in, _ in steps]
            drift = torch.stack([((out - ref) ** 2).mean() for (_, _, out), ref in zip(steps, refs)]).mean()
            on_cuda(x, total, drift, *parts.values())


def test_flow_grpo_sampler_starts_and_steps(tiny_flux_dir, toy_meta, tmp_path, monkeypatch):
    """Also: the text encoders are on the device when the prompt is encoded there. (diffusers 0.42 moves
    the token ids to the encoders' device, so encoders left on the CPU no longer crash, but T5-XXL then
    encodes on the CPU on every rank.)"""
    from diffusers import FluxFillPipeline

    encode = FluxFillPipeline.encode_prompt

    def checked(pipe, *args, device=None, **kwargs):
        on = {m.device.type for m in (pipe.text_encoder, pipe.text_encoder_2)}
        assert on == {torch.device(device).type}, f"prompt encoded for {device} with the text encoders on {on}"
        return encode(pipe, *args, device=device, **kwargs)

    monkeypatch.setattr(FluxFillPipeline, "encode_prompt", checked)
    args = train_RORem_ddpo.parse_args(_common(tiny_flux_dir, str(tmp_path)) + [
        "--meta_path", toy_meta, "--reward", "preserve=1", "--algorithm", "grpo", "--group_size", "2", "--sample_steps", "3",
        "--sample_batch_size", "2", "--train_batch_size", "2", "--max_sequence_length", "16"])
    with fake_cuda():
        parts, total = _rl_step(args, fake_accelerator(), torch.bfloat16, _batch(toy_meta, "input"))
    assert total.shape == (4,)


def test_discriminator_scoring_on_pixels(tiny_model_dir, toy_meta, disc_dir):
    from myutils.reward_utils import load_reward_model

    batch = _batch(toy_meta, "triplet")
    with fake_cuda():
        b = to_device(batch, CUDA)
        for conditioning in ("per_sample", "rorem"):  # RORem's: fixed time ids and t = 0 noise, made on the device too
            reward = load_reward_model(tiny_model_dir, disc_dir, 32, CUDA, torch.float16, conditioning=conditioning)
            on_cuda(reward.score_pixels(b["source"], b["mask"], b["GT"], b["original_size"], b["crop_top_left"]))


# ----------------------------------------------------------------------------- dtypes under mixed precision (real tensors)

def test_several_adapters_under_fp16_keep_every_lora_weight_fp32(tiny_model_dir):
    """MORL adds one adapter per policy: adding the third must not recast the first two (fp16 LoRA
    weights make the grad scaler fail: 'Attempting to unscale FP16 gradients')."""
    from diffusers import UNet2DConditionModel

    args = train_RORem_ddpo.parse_args(["--meta_path", "m", "--output_dir", "o", "--lora_rank", "4", "--reward", "preserve=1"])
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    params = [adapters.add_lora(unet, args, torch.float16, adapter_name=f"policy_{k}") for k in range(3)]
    lora = {n: p.dtype for n, p in unet.named_parameters() if "lora_" in n}
    assert len(lora) == sum(len(p) for p in params) and set(lora.values()) == {torch.float32}
    assert {p.dtype for n, p in unet.named_parameters() if "lora_" not in n} == {torch.float16}


def test_validation_under_fp16_autocast_runs_the_vae_in_fp32_and_leaves_it_fp32(tiny_model_dir, toy_meta, tmp_path):
    """Only the UNet runs under the training's autocast; the SDXL VAE (which overflows in fp16)
    encodes and decodes in fp32 and stays fp32 for the training steps after validation."""
    import contextlib
    import types

    args = train_RORem.parse_args(_common(tiny_model_dir, str(tmp_path)) + ["--meta_path", toy_meta, "--use_lora",
                                                                             "--validation_inference_steps", "2"])
    acc = types.SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    comps = prepare.Components(args, acc, torch.float16)
    adapters.add_lora(comps.unet, args, torch.float16)
    seen = {"vae": set(), "unet": set()}

    def record(name):
        def hook(module, inputs):
            seen[name].add((inputs[0].dtype, torch.is_autocast_enabled("cpu")))
        return hook

    handles = [comps.vae.encoder.conv_in.register_forward_pre_hook(record("vae")),
               comps.vae.decoder.conv_in.register_forward_pre_hook(record("vae")),
               comps.unet.conv_in.register_forward_pre_hook(record("unet"))]
    try:
        samples = validation.validation_samples(args, read_meta(toy_meta, "triplet"), count=2)
        with contextlib.nullcontext():
            results = validation.sample_validation(acc, args, comps, comps.unet, samples)
    finally:
        for h in handles:
            h.remove()
    assert seen["vae"] == {(torch.float32, False)}  # encoder and decoder: fp32 input, no autocast
    assert {enabled for _, enabled in seen["unet"]} == {True}  # the UNet in the training's precision
    assert comps.vae.dtype == torch.float32 and len(results) == 2


# ----------------------------------------------------------------------------- random draws (a static rule)

DRAWS = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson"}


def _source_files():
    from tests.conftest import ROOT

    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__") and not d.endswith(".egg-info")]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_every_draw_with_a_generator_names_its_device_and_generators_live_on_the_cpu():
    """torch.rand(..., generator=g) without device= draws on the CPU whatever g is, and fails on the first
    step for a CUDA generator ("Expected a 'cpu' device type for generator"). Every draw names its
    device, and generators are made on the CPU (myutils/rng.py), where no GPU is needed to make them."""
    import ast

    bad = []
    for path in _source_files():
        for node in ast.walk(ast.parse(open(path).read())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{os.path.relpath(path)}:{node.lineno}"
            if node.func.attr in DRAWS and "generator" in keywords and "device" not in keywords:
                bad.append(f"{where}: torch.{node.func.attr}(generator=...) without device=")
            if node.func.attr == "Generator":
                device = (node.args or [keywords.get("device")])[0]
                if device is not None and not (isinstance(device, ast.Constant) and device.value == "cpu"):
                    bad.append(f"{where}: torch.Generator({ast.unparse(device)}): generators live on the CPU")
    assert not bad, "\n".join(bad)
