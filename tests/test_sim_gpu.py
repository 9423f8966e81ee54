"""The simulated GPU (toy_world/sim_gpu.py) fails where a CUDA GPU fails and counts what a GPU pays for.
Each expectation is a fact about CUDA, not the simulator's own output: the device rules of CUDA kernels,
CUDA autocast's op lists (aten/src/ATen/autocast_mode.h), GradScaler's refusal of fp16 gradients."""
import pytest
import torch
import torch.nn.functional as F

from toy_world.sim_gpu import SimCudaTensor, SimulatedGPUError, simulated_gpu


def test_a_cpu_tensor_meeting_a_cuda_one_fails_as_on_a_gpu():
    with simulated_gpu():
        x = torch.ones(3, device="cuda")
        assert x.device == torch.device("cuda", 0) and x.is_cuda and isinstance(x, SimCudaTensor)
        for bad in (lambda: x + torch.ones(3), lambda: torch.cat([x, torch.ones(3)]), lambda: x @ torch.ones(3),
                    lambda: torch.ones(5)[torch.tensor([1, 2], device="cuda")],  # CPU indexed by a CUDA index
                    lambda: torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0)),
                    lambda: torch.zeros(3).copy_(x) + x):  # the copy is fine; the add is not
            with pytest.raises(SimulatedGPUError):
                bad()
        # what CUDA allows: a CPU 0-dim scalar in a pointwise op, CPU indices into a CUDA tensor, copies across
        assert torch.equal((x * torch.tensor(2.0)).cpu(), torch.full((3,), 2.0))
        assert torch.equal(torch.arange(5, device="cuda")[torch.tensor([1, 3])].cpu(), torch.tensor([1, 3]))
        assert torch.equal(torch.zeros(3).copy_(x), torch.ones(3))
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            x.numpy()
        assert x.cpu().numpy().tolist() == [1.0, 1.0, 1.0]
        assert torch.Generator().device.type == "cpu"  # draws from CPU generators stay on the CPU
    assert not torch.cuda.is_available()  # everything is given back


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_autocast_follows_cudas_op_lists(low):
    lin = torch.nn.Linear(8, 8)
    with simulated_gpu():
        lin.to("cuda")
        x = torch.randn(4, 8, device="cuda")
        h = x.to(low)
        with torch.autocast("cuda", dtype=low):
            assert lin(x).dtype == low  # lower_precision_fp: linear, matmul, conv, bmm, baddbmm, sdpa
            assert (x @ x.T).dtype == low and torch.baddbmm(x[None, :, :4], x[None], x.T[None, :, :4]).dtype == low
            assert F.conv2d(x[None, None], torch.randn(1, 1, 3, 3, device="cuda")).dtype == low
            assert F.scaled_dot_product_attention(x[None], x[None], x[None]).dtype == low
            # fp32: pow, exp, log, norms, losses, upsampling; fp32_set_opt_dtype: softmax, sum, cumsum
            for out in (h.exp(), h.pow(2), F.group_norm(h[None], 2), F.layer_norm(h, (8,)), F.mse_loss(h, h), h.softmax(-1),
                        F.softmax(h, -1), h.sum(), torch.cumsum(h, 0), F.interpolate(h[None, None], scale_factor=2.0), h.norm()):
                assert out.dtype == torch.float32
            assert h.mean().dtype == low and F.silu(h).dtype == low and (h + x).dtype == torch.float32  # not listed: as is
            assert torch.addcmul(x, h, h).dtype == torch.float32  # promote: the widest input
            assert F.interpolate(h[None, None], scale_factor=0.5, mode="area").dtype == low  # adaptive pooling: not listed
            with pytest.raises(RuntimeError, match="unsafe to autocast"):
                F.binary_cross_entropy(torch.sigmoid(h), torch.ones_like(h))
            with torch.autocast("cuda", enabled=False):
                assert lin(x).dtype == torch.float32
        loss = None
        with torch.autocast("cuda", dtype=low):
            loss = lin(x).float().pow(2).mean()
        loss.backward()
        assert lin.weight.grad.dtype == torch.float32  # the cast is recorded: fp32 weights get fp32 gradients
        with pytest.raises(RuntimeError):  # outside autocast a half input meets fp32 weights, as on a GPU
            lin(h)


def test_gradscaler_refuses_fp16_gradients_and_steps_fp32_ones():
    """A module cast to fp16 after its adapters were added has fp16 trainable weights: GradScaler's
    unscale raises on a GPU, so a recast that reaches trainable weights fails here too."""
    for dtype in (torch.float16, torch.float32):
        lin = torch.nn.Linear(4, 4)
        weight = lin.weight.detach().clone()
        with simulated_gpu() as counter:
            lin.to("cuda", dtype)
            opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
            scaler = torch.amp.GradScaler("cuda")
            with torch.autocast("cuda", dtype=torch.float16):
                loss = lin(torch.randn(2, 4, device="cuda")).float().mean()
            scaler.scale(loss).backward()
            if dtype == torch.float16:
                with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
                    scaler.step(opt)
                continue
            scaler.step(opt)
            scaler.update()
            assert [(step, kind) for step, kind, _ in counter.events if kind == "item"] == [(0, "item")]  # GradScaler's found_inf
            assert not torch.equal(lin.weight.detach().cpu(), weight)


def test_host_syncs_are_counted_by_optimizer_step():
    lin = torch.nn.Linear(4, 1)
    with simulated_gpu() as counter:
        lin.to("cuda")
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        x = torch.randn(8, 4, device="cuda")
        for step in range(3):
            loss = lin(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step == 1:  # each of these waits for the GPU
                loss.item(), bool(loss > 0), x[0].tolist(), x.cpu(), torch.nonzero(x > 0), x[x > 0], float(loss)
        assert counter.per_step() == {0: 2, 1: 0, 2: 7, 3: 0}  # 0: the two parameters copied from the host
        assert [k for s, k, _ in counter.events if s == 2][:2] == ["item", "item"]
        counter.mark("logging")
        assert counter.steady() == {1: 0, 2: 7}  # interval 3 is the one marked (and the last)


def test_copies_to_the_gpu_wait_for_it_unless_pinned_and_non_blocking():
    """A copy from pageable memory syncs the stream (CUDA stages it); so does a pinned one made without
    non_blocking=True (pinning then buys nothing); a CPU index into a CUDA tensor is such a copy too."""
    with simulated_gpu() as counter:
        pinned = torch.ones(4).pin_memory()
        assert pinned.is_pinned() and not torch.ones(4).is_pinned()
        pinned.to("cuda", non_blocking=True)
        assert counter.events == []
        pinned.to("cuda")
        torch.ones(4).to("cuda", non_blocking=True)
        torch.tensor([1.0, 2.0], device="cuda")
        torch.zeros(4, device="cuda")[torch.tensor([1, 2])]
        torch.zeros(4, device="cuda") * torch.tensor(2.0)  # a CPU scalar is a kernel argument, not a copy
        assert [k for _, k, _ in counter.events] == ["pinned copy without non_blocking", "copy from pageable host memory",
                                                     "copy from pageable host memory", "CPU index copied to the GPU"]


def test_modules_move_keep_their_parameters_and_save_like_cuda_modules(tmp_path):
    from safetensors.torch import load_file, save_file

    lin = torch.nn.Linear(3, 2)
    weight = lin.weight
    opt = torch.optim.AdamW(lin.parameters())  # made before the move, as a script may
    with simulated_gpu():
        lin.to("cuda")
        assert lin.weight is weight and lin.weight.is_cuda and isinstance(lin.weight, torch.nn.Parameter)
        assert opt.param_groups[0]["params"][0] is lin.weight
        torch.save(lin.state_dict(), tmp_path / "w.pt")
        save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, str(tmp_path / "w.safetensors"))
        values = {k: v.cpu() for k, v in lin.state_dict().items()}
    for loaded in (torch.load(tmp_path / "w.pt", weights_only=True), load_file(str(tmp_path / "w.safetensors"))):
        assert all(torch.equal(loaded[k], values[k]) for k in values)


def test_discriminator_scores_a_loaders_cpu_batch_on_the_gpu(tiny_model_dir, disc_dir, toy_meta):
    """Every scoring entry point hands the reward CPU batches (the data loader's, PIL images): the pixels,
    the mask and the latents must meet the judge on its device (a crash on any GPU before the fix)."""
    from myutils.data import read_meta
    from myutils.reward_utils import load_reward_model, score_entries

    entries = read_meta(toy_meta, "triplet")[:4]
    on_cpu = score_entries(load_reward_model(tiny_model_dir, disc_dir, 32), entries, 32, 2)
    with simulated_gpu():
        for conditioning in ("per_sample", "rorem"):
            reward = load_reward_model(tiny_model_dir, disc_dir, 32, "cuda", torch.float16, conditioning=conditioning)
            scores = score_entries(reward, entries, 32, 2)
            if conditioning == "per_sample":
                assert scores == pytest.approx(on_cpu, abs=2e-3)  # the same judge, in fp16


# ----------------------------------------------------------------------------- whole programs: a CPU tensor in a loss

def _injected(real):
    """The function, plus a `torch.zeros(n)` made without device= in the loss it returns (the first
    tensor it returns: a loss, or DRaFT's total reward after its parts)."""
    def run(*args, **kwargs):
        out = real(*args, **kwargs)
        parts = list(out) if isinstance(out, tuple) else [out]
        i = next(k for k, v in enumerate(parts) if torch.is_tensor(v))
        parts[i] = parts[i] + torch.zeros(parts[i].shape[0] if parts[i].dim() else 1)
        return tuple(parts) if isinstance(out, tuple) else parts[0]
    return run


def _program(name, tiny_model_dir, toy_meta, disc_dir, tmp_path):
    """(script module, where its loss is looked up, the loss's name, argv) for one step of each trainer."""
    import json
    import os

    import train_RORem
    import train_RORem_ddpo
    import train_RORem_discriminator
    import train_RORem_dpo
    import train_RORem_draft
    import train_RORem_kto
    import train_RORem_lcm
    from toy_world.data import write_scored_toy_dataset
    from training import rl_loop

    root = os.path.dirname(toy_meta)
    common = ["--pretrained_model_name_or_path", tiny_model_dir, "--resolution", "32", "--report_to", "none", "--output_dir",
              str(tmp_path / "out"), "--max_train_steps", "2", "--train_batch_size", "2", "--validation_steps", "0",
              "--mixed_precision", "fp16"]
    scored = lambda: write_scored_toy_dataset(toy_meta, str(tmp_path / "scored"), seed=0)  # noqa: E731
    if name == "dpo":
        pairs = tmp_path / "pairs.json"
        pairs.write_text(json.dumps([{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"]),
                                      "preferred": os.path.join(root, e["GT"]), "rejected": os.path.join(root, e["source"])}
                                     for e in json.load(open(toy_meta))]))
        return train_RORem_dpo, train_RORem_dpo, "diffusion_dpo_loss", common + ["--preference_data", pairs, "--use_lora"]
    rl = ["--pretrained_model_name_or_path", tiny_model_dir, "--resolution", "32", "--report_to", "none", "--output_dir",
          str(tmp_path / "out"), "--meta_path", toy_meta, "--sample_steps", "3", "--sample_batch_size", "2",
          "--sample_batches_per_epoch", "1", "--train_batch_size", "2", "--num_train_epochs", "1", "--eval_samples", "2",
          "--lora_rank", "4", "--reward", "preserve=1", "--mixed_precision", "fp16"]
    return {
        "supervised": (train_RORem, train_RORem, "diffusion_loss", common + ["--meta_path", toy_meta, "--use_lora"]),
        "kto": (train_RORem_kto, train_RORem_kto, "diffusion_kto_loss", common + ["--meta_path", scored() if name == "kto" else "",
                                                                                  "--use_lora"]),
        "lcm": (train_RORem_lcm, train_RORem_lcm, "per_sample_lcm_loss", common + ["--meta_path", toy_meta, "--lora_rank", "4",
                                                                                   "--num_ddim_timesteps", "10"]),
        "discriminator": (train_RORem_discriminator, train_RORem_discriminator, "discriminator_loss",
                          common + ["--meta_path", scored() if name == "discriminator" else ""]),
        "draft": (train_RORem_draft, train_RORem_draft, "latent_rewards", common + ["--meta_path", toy_meta, "--reward", "gt=1",
                                                                                    "--sample_steps", "3", "--lora_rank", "4"]),
        "ppo": (train_RORem_ddpo, rl_loop, "ppo_loss", rl + ["--algorithm", "ppo"]),
        "reinforce": (train_RORem_ddpo, rl_loop, "reinforce_loss", rl + ["--algorithm", "reinforce"]),
    }[name]


@pytest.mark.parametrize("name", ["supervised", "dpo", "kto", "lcm", "discriminator", "draft", "ppo", "reinforce"])
def test_a_cpu_tensor_in_a_loss_fails_the_whole_program_as_a_gpu_would(name, tiny_model_dir, toy_meta, disc_dir, tmp_path,
                                                                         run_script, monkeypatch):
    """A `torch.zeros(n)` without device= placed in a trainer's loss stops its first step on a GPU; the
    simulated GPU stops the script's main() there too (a guard of pieces let exactly this through)."""
    module, holder, loss_name, argv = _program(name, tiny_model_dir, toy_meta, disc_dir, tmp_path)
    monkeypatch.setattr(holder, loss_name, _injected(getattr(holder, loss_name)))
    with simulated_gpu(), pytest.raises(SimulatedGPUError, match="Expected all tensors to be on the same device"):
        run_script(module, argv)


@pytest.mark.parametrize("name", ["supervised", "dpo"])
def test_a_training_step_waits_for_the_gpu_once(name, tiny_model_dir, toy_meta, disc_dir, tmp_path, run_script):
    """Between two optimizer steps the host reads from the GPU once (the window's flags: a non-finite
    loss, a skip, a stop); the loader's pinned batches are copied without blocking; metrics wait for
    the logging step. The GPU check's dry run holds every trainer to this (tests/test_gpu_check.py)."""
    from toy_world.sim_gpu import SyncCounter

    module, _, _, argv = _program(name, tiny_model_dir, toy_meta, disc_dir, tmp_path)
    counter = SyncCounter()
    with simulated_gpu(counter):
        run_script(module, argv + ["--max_train_steps", "4", "--checkpointing_steps", "0"])
    assert counter.steady() == {1: 1, 2: 1, 3: 1}  # steps 1-3; step 4 logs, and the run ends after it
    assert [kind for step, kind, _ in counter.events if step in (1, 2, 3)] == ["tolist"] * 3
    assert not [kind for _, kind, _ in counter.events if kind == "pinned copy without non_blocking"]
