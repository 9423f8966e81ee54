"""Direct reward fine-tuning (train_RORem_draft.py): the differentiable sample (its values against the
plain sampler, where the gradient is cut, ReFL's x0 against the prediction formula, checkpointing
that changes nothing but memory), the latent rewards by hand, a gradient step that raises the
reward, and the script: a LoRA that trains and validates with the GT metric beside the reward,
resume equal to a straight run, two ranks equal to one, bad arguments; on the 4-step student: the LCM
chain against LCMScheduler's own steps, RORem's released LoRA file trained on from where it is, its
start and its result as stock diffusers loads them."""
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train_RORem_draft as tdraft
from myutils.errors import UserError
from test_rorem_files import rorem_lcm_lora  # noqa: F401 (fixture: RORem's 4-step LoRA file, both namings mixed)


@pytest.fixture(scope="module")
def lora_sampler(tiny_model_dir):
    """The tiny remover with a LoRA (up weights moved off zero, so the adapters matter), its sampler
    (6 DDIM steps) and a conditioned batch of 2 toy inputs."""
    from accelerate import Accelerator

    from pipelines.rl_sampler import SDXLInpaintSampler
    from training import adapters, prepare

    args = tdraft.parse_args(["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", "m.json", "--output_dir", "o",
                              "--resolution", "32", "--reward", "gt=1", "--lora_rank", "4"])
    comps = prepare.Components(args, Accelerator(cpu=True), torch.float32, guidance_prompts=("", ""))
    params = adapters.add_lora(comps.unet, args, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.data = 0.05 * torch.randn(p.shape, generator=gen)
    sampler = SDXLInpaintSampler(comps, 6, 1.0, 0.0, 32)
    return SimpleNamespace(sampler=sampler, unet=comps.unet, params=params, args=args)


@pytest.fixture
def cond(lora_sampler, toy_meta):
    from myutils.data import RemovalDataset, read_meta, stack_samples

    dataset = RemovalDataset(read_meta(toy_meta, "triplet")[:2], "triplet", 32)
    return tdraft.conditioned(lora_sampler.sampler, stack_samples([dataset[0], dataset[1]]))


def _gens(n, seed=0):
    from myutils.rng import sample_generators

    return sample_generators({"epoch": [0] * n, "index": list(range(n))}, seed)


def test_sample_with_grad_matches_the_sampler_and_cuts_the_gradient(lora_sampler, cond):
    from pipelines.rl_sampler import sample_trajectory, sample_with_grad

    s, unet = lora_sampler.sampler, lora_sampler.unet
    plain = sample_trajectory(s, unet, cond, _gens(2), deterministic=True)["latents"][:, -1]
    x1, steps1 = sample_with_grad(s, unet, cond, _gens(2), grad_steps=1)
    x3, steps3 = sample_with_grad(s, unet, cond, _gens(2), grad_steps=3)
    assert torch.allclose(x1, plain, atol=1e-5) and torch.allclose(x3, plain, atol=1e-5)  # the same chain, only graphs differ
    assert [j for j, _, _ in steps1] == [5] and [j for j, _, _ in steps3] == [3, 4, 5]
    assert steps1[0][1].grad_fn is None and x1.grad_fn is not None  # DRaFT-1: nothing before the last step is differentiated
    assert steps3[0][1].grad_fn is None and steps3[1][1].grad_fn is not None  # DRaFT-3: the last step's input carries a graph
    g = torch.autograd.grad(x1.sum(), lora_sampler.params[0])[0]
    assert g.abs().sum() > 0


def test_refl_returns_the_predicted_x0_of_its_step(lora_sampler, cond):
    """ReFL's one differentiated step lands on x0 = (x - sqrt(1 - a) eps) / sqrt(a) (epsilon model),
    computed here with lcm_utils' formula, not the scheduler's."""
    from myutils.lcm_utils import predicted_origin
    from pipelines.rl_sampler import sample_trajectory, sample_with_grad

    s, unet = lora_sampler.sampler, lora_sampler.unet
    x0, steps = sample_with_grad(s, unet, cond, _gens(2), grad_steps=1, refl_step=3)
    chain = sample_trajectory(s, unet, cond, _gens(2), deterministic=True)["latents"]
    assert [j for j, _, _ in steps] == [3] and torch.allclose(steps[0][1], chain[:, 3], atol=1e-5)
    with torch.no_grad():
        eps = s.output(unet, chain[:, 3], 3, cond)
        t = torch.full((2,), s.timesteps[3])
        want = predicted_origin(eps, t, chain[:, 3], "epsilon", s.scheduler.alphas_cumprod)
    assert torch.allclose(x0.detach(), want, atol=1e-4) and x0.grad_fn is not None


def test_alignprop_checkpointing_changes_memory_not_gradients(lora_sampler, cond):
    from pipelines.rl_sampler import sample_with_grad

    s, unet, p = lora_sampler.sampler, lora_sampler.unet, lora_sampler.params
    grads = []
    for ckpt in (False, True):
        x, _ = sample_with_grad(s, unet, cond, _gens(2), grad_steps=6, checkpointing=ckpt)
        grads.append(torch.autograd.grad((x ** 2).mean(), p[:4]))
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(*grads))
    assert any(a.abs().sum() > 0 for a in grads[0])


def test_latent_rewards_by_hand_and_differentiable(disc_dir, tiny_model_dir, cond, lora_sampler):
    from myutils.reward_utils import latent_rewards, load_reward_model

    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    c = {"mask_latent": torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), "source_latents": torch.tensor([[[[5.0, 1.0], [2.0, 0.0]]]])}
    gt = torch.tensor([[[[3.0, 9.0], [9.0, 9.0]]]])
    parts, total = latent_rewards({"gt": 2.0, "preserve": 1.0}, None, c, x, gt)
    assert parts["gt"].item() == pytest.approx(-9.0)  # the hole: (0 - 3)^2
    assert parts["preserve"].item() == pytest.approx(-(1 + 4 + 0) / 3)  # outside it: the source's 1, 2, 0
    assert total.item() == pytest.approx(2 * -9.0 - 5 / 3)
    total.backward()
    assert x.grad[0, 0, 0, 0].item() == pytest.approx(2 * 2 * 3.0)  # d/dx of -2 (x - 3)^2 at 0
    reward = load_reward_model(tiny_model_dir, disc_dir, 32)
    latents = cond["GT_latents"].clone().requires_grad_(True)
    parts, _ = latent_rewards({"discriminator": 1.0}, reward, cond, latents)
    plain = reward.score_latents(cond["source_latents"], cond["mask_latent"], cond["GT_latents"], cond["original_size"],
                                 cond["crop_top_left"])
    assert torch.allclose(parts["discriminator"].detach(), plain)
    parts["discriminator"].sum().backward()
    assert latents.grad.abs().sum() > 0 and all(p.grad is None for p in reward.disc.parameters())


def test_a_small_step_along_the_gradient_raises_the_reward(lora_sampler, cond):
    """The loss's gradient is the reward's: a small step against it raises the batch's GT reward
    (DRaFT-2, same noises)."""
    from myutils.reward_utils import latent_rewards
    from pipelines.rl_sampler import sample_with_grad

    s, unet, params = lora_sampler.sampler, lora_sampler.unet, lora_sampler.params

    def reward():
        x, _ = sample_with_grad(s, unet, cond, _gens(2), grad_steps=2)
        return latent_rewards({"gt": 1.0}, None, cond, x, cond["GT_latents"])[1].mean()

    before = reward()
    grads = torch.autograd.grad(before, params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p += 1e-3 * g / norm
            after = reward()
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    assert after.item() > before.item()


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "2", "--report_to", "none", "--sample_steps", "4", "--reward", "gt=1", "--learning_rate", "1e-2",
            "--lora_rank", "4", *extra]


def test_draft_trains_validates_and_resumes_exactly(tmp_path, tiny_model_dir, toy_meta, run_script, crash_then_resume):
    common = ["--method", "draft", "--draft_k", "2", "--reg_coef", "0.1", "--checkpointing_steps", "1", "--max_train_steps", "3"]
    metrics = run_script(tdraft, _args(tiny_model_dir, toy_meta, str(tmp_path / "straight"), *common, "--validation_steps", "3",
                                       "--validation_meta_path", toy_meta, "--eval_samples", "3", "--num_validation_images", "2"))
    assert {"val_reward", "val_reward_gt", "val_masked_mse", "val_start_reward", "val_start_masked_mse"} <= set(metrics)
    assert metrics["val_reward"] != metrics["val_start_reward"]  # the LoRA moved the held-out results
    assert os.path.isfile(tmp_path / "straight" / "validation" / "step-000003.png")
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)
    half = str(tmp_path / "resumed")
    crash_then_resume(tdraft, _args(tiny_model_dir, toy_meta, half, *common))
    b = load_file(os.path.join(half, "pytorch_lora_weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize("method", ["refl", "alignprop"])
def test_refl_and_alignprop_train(tmp_path, tiny_model_dir, toy_meta, disc_dir, run_script, method):
    out = str(tmp_path / method)
    run_script(tdraft, _args(tiny_model_dir, toy_meta, out, "--method", method, "--max_train_steps", "2", "--reward",
                             "discriminator=1,preserve=0.5", "--discriminator_path", disc_dir, "--checkpointing_steps", "2"))
    w = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in w.items() if "lora_B" in k or "lora.up" in k)


@pytest.mark.parametrize("student", [False, True], ids=["draft2", "student_alignprop"])
def test_draft_on_two_ranks_equals_one_rank(tmp_path, tiny_model_dir, toy_meta, run_script, rorem_lcm_lora, student):  # noqa: F811
    """Two ranks x batch 2 save the LoRA of one rank x batch 4: DRaFT-2 (two UNet calls under DDP
    before one backward), and AlignProp on RORem's 4-step LoRA (four checkpointed calls under DDP,
    each recomputed in backward, and the LCM steps' noise)."""
    from test_multiprocess import _TIGHT, _lora_moved, _max_weight_diff, _saved_weights, launch_two_ranks

    method = ["--student_lora", rorem_lcm_lora, "--method", "alignprop"] if student else ["--draft_k", "2"]

    def args(out, batch):
        return _args(tiny_model_dir, toy_meta, out, *method, "--max_train_steps", "2", "--checkpointing_steps", "2",
                     *_TIGHT) + ["--train_batch_size", str(batch)]

    two, one = str(tmp_path / "draft2"), str(tmp_path / "draft1")
    res = launch_two_ranks("train_RORem_draft.py", args(two, 2), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    run_script(tdraft, args(one, 4))
    a, b = _saved_weights(two, "pytorch_lora_weights.safetensors"), _saved_weights(one, "pytorch_lora_weights.safetensors")
    assert _lora_moved(a) and _max_weight_diff(a, b) <= 1e-6


def test_bad_arguments(tmp_path, tiny_model_dir, toy_meta):
    base = ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--output_dir", str(tmp_path / "o")]
    cases = [(["--reward", "jpeg=1"], "jpeg cannot be differentiated here; use discriminator, gt, preserve"),
             (["--reward", "discriminator=1"], "--reward discriminator needs --discriminator_path"),
             (["--reward", "gt=1", "--sample_steps", "4", "--draft_k", "5"], "--draft_k 5 is more than the 4 steps"),
             (["--reward", "gt=1", "--no-use_lora"], "trains a LoRA")]
    for extra, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            tdraft.parse_args(base + extra)


def test_validation_memory_is_bounded_by_its_batch(lora_sampler, toy_meta):
    """evaluate() works --validation_batch_size inputs at a time: no UNet batch above it, and the same
    figures as in one piece (a sample's noise depends on its index only)."""
    import copy

    from myutils.data import RemovalDataset, read_meta

    dataset = RemovalDataset(read_meta(toy_meta, "triplet")[:5], "triplet", 32)
    samples = [dataset[i] for i in range(5)]
    seen = []
    hook = lora_sampler.unet.register_forward_pre_hook(lambda m, a, k=None: seen.append(a[0].shape[0]))
    try:
        results = {}
        for size in (2, 5):
            args = copy.copy(lora_sampler.args)
            args.validation_batch_size, args.num_validation_images = size, 3
            results[size] = tdraft.evaluate(args, lora_sampler.sampler, lora_sampler.unet, None, samples)
    finally:
        hook.remove()
    assert max(seen[:len(seen) // 2]) == 2 and max(seen) == 5
    (small, small_images), (whole, whole_images) = results[2], results[5]
    assert set(small) == {"reward", "reward_gt", "masked_mse"} and len(small_images) == len(whole_images) == 3
    assert all(small[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-6) for k in whole)


def test_lcm_chain_is_lcm_schedulers_sampling(lora_sampler, cond):
    """The student's chain (multistep LCM, 4 steps) equals diffusers' LCMScheduler stepping the same
    UNet outputs, each sample's noise from its own generator (one scheduler per sample: it counts
    its steps); gradients reach every step's input under AlignProp."""
    from diffusers import LCMScheduler

    from pipelines.rl_sampler import SDXLInpaintSampler, sample_with_grad

    base = lora_sampler.sampler
    comps = SimpleNamespace(vae=base.vae, unet=lora_sampler.unet, guidance=(base.prompt, base.negative),
                            sample_scheduler_config=base.scheduler.config)
    s = SDXLInpaintSampler(comps, 4, 1.0, 0.0, 32, scheduler="lcm")
    assert s.timesteps == [999, 759, 499, 259] and s.num_train_steps == 3
    unet = lora_sampler.unet
    x, steps = sample_with_grad(s, unet, cond, _gens(2), grad_steps=4)
    assert [j for j, _, _ in steps] == [0, 1, 2, 3] and steps[1][1].grad_fn is not None
    with torch.no_grad():
        for i, g in enumerate(_gens(2)):
            one = {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in cond.items()}
            sched = LCMScheduler.from_config(base.scheduler.config)
            sched.set_timesteps(4)
            z = torch.randn(x.shape[1:], generator=g).unsqueeze(0)  # the start: pure noise at strength 1
            for j, t in enumerate(sched.timesteps.tolist()):
                z = sched.step(s.output(unet, z, j, one), t, z, generator=g).prev_sample
            assert torch.allclose(x[i:i + 1].detach(), z, atol=1e-4), i


def _stock_figures(tiny_model_dir, lora_dir, args, samples, reward=None):
    """train_RORem_draft.evaluate's figures for a LoRA loaded by stock diffusers (pipe.load_lora_weights)
    onto a fresh pipeline, sampled with LCM steps: what a user of the saved file gets."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from pipelines.rl_sampler import SDXLInpaintSampler
    from myutils.sdxl_inpaint import encode_prompt_pair

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(lora_dir)
    comps = SimpleNamespace(vae=pipe.vae, unet=pipe.unet, guidance=encode_prompt_pair(pipe, "", ""),
                            sample_scheduler_config=pipe.scheduler.config)
    sampler = SDXLInpaintSampler(comps, args.sample_steps, args.strength, 0.0, 32, scheduler="lcm")
    return tdraft.evaluate(args, sampler, pipe.unet, reward, samples)[0]


def test_student_trains_from_rorems_file_resumes_and_loads_stock(tmp_path, tiny_model_dir, toy_meta, rorem_lcm_lora,  # noqa: F811
                                                                 run_script, crash_then_resume):
    """DRaFT on the 4-step student (AlignProp through its 4 LCM steps, a drift penalty against the
    start): the start is RORem's file as loaded, the result a LoRA of the same keys and shapes that
    stock diffusers loads to give the run's own final figures; a crash and restart equals a straight
    run (the start stays the file's, not the checkpoint's)."""
    import importlib.util

    from myutils.data import RemovalDataset, read_meta
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("convert_lora", os.path.join(ROOT, "scripts", "convert_lora.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    peft_start = str(tmp_path / "start_peft")
    convert.main([rorem_lcm_lora, peft_start])  # the same weights in the one naming stock diffusers loads whole

    common = ["--student_lora", rorem_lcm_lora, "--method", "alignprop", "--reg_coef", "0.1", "--strength", "1.0",
              "--checkpointing_steps", "1", "--max_train_steps", "3"]
    straight = str(tmp_path / "straight")
    args = _args(tiny_model_dir, toy_meta, straight, *common, "--validation_steps", "3", "--validation_meta_path", toy_meta,
                 "--eval_samples", "3", "--num_validation_images", "2")
    metrics = run_script(tdraft, args)
    assert metrics["val_reward"] != metrics["val_start_reward"]
    start = {**load_file(os.path.join(peft_start, "pytorch_lora_weights.safetensors"))}
    trained = load_file(os.path.join(straight, "pytorch_lora_weights.safetensors"))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}  # RORem's LoRA, trained on
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 0

    parsed = tdraft.parse_args(args)
    parsed.validation_batch_size = 16
    dataset = RemovalDataset(read_meta(toy_meta, "triplet")[:3], "triplet", 32)
    samples = [dataset[i] for i in range(3)]
    for folder, prefix in ((peft_start, "val_start_"), (straight, "val_")):
        stock = _stock_figures(tiny_model_dir, folder, parsed, samples)
        assert stock["masked_mse"] == pytest.approx(metrics[prefix + "masked_mse"], rel=1e-4), folder
        assert stock["reward"] == pytest.approx(metrics[prefix + "reward"], rel=1e-4), folder

    resumed = str(tmp_path / "resumed")
    crash_then_resume(tdraft, _args(tiny_model_dir, toy_meta, resumed, *common))
    again = load_file(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    assert max((trained[k] - again[k]).abs().max().item() for k in trained) <= 1e-6
