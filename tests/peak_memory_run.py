"""Measure the peak bytes of a real training step on the tiny UNet, as the scripts set it up, for
tests/test_planner.py (a process of its own: it starts a one-rank process group for DDP/DeepSpeed).

    python tests/peak_memory_run.py MODE UNET_CONFIG BATCH RESOLUTION [--checkpointing] [--reduce_bucket N]

MODE: ddp (full fine-tune, fp32), ddp_bf16 (full, bf16 autocast), lora (DDP, fp32 LoRA on a frozen
base), zero2 (DeepSpeed ZeRO-2, fp32). Prints {"peak": bytes} of the third step: every tensor
created through PyTorch's dispatcher is tracked from the model's construction on (planner.LiveTensorBytes)."""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from myutils import planner as pl  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["ddp", "ddp_bf16", "lora", "zero2"])
    p.add_argument("config")
    p.add_argument("batch", type=int)
    p.add_argument("resolution", type=int)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--reduce_bucket", type=int, default=500_000_000)
    p.add_argument("--port", default="29531")
    a = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=a.port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    live = pl.LiveTensorBytes("cpu")  # DeepSpeed keeps meta copies of the parameters: no memory
    with live:
        unet = UNet2DConditionModel.from_config(pl.read_config(a.config, UNet2DConditionModel))
        if a.checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        if a.mode == "lora":
            from types import SimpleNamespace

            from training import adapters

            params = adapters.add_lora(unet, SimpleNamespace(lora_rank=4, lora_alpha=None, lora_target_modules=adapters.LORA_TARGETS), torch.float32)
        else:
            params = list(unet.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # what AdamW picks on a GPU
        if a.mode == "zero2":
            import deepspeed

            cfg = {"train_micro_batch_size_per_gpu": a.batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                   "zero_optimization": {"stage": 2, "reduce_bucket_size": a.reduce_bucket}}
            model, _, _, _ = deepspeed.initialize(model=unet, optimizer=opt, config=cfg)
        else:
            model = torch.nn.parallel.DistributedDataParallel(unet, gradient_as_bucket_view=True)  # as make_accelerator sets it

        def step():
            args, kwargs = pl.unet_inputs(unet, a.batch, a.resolution, "cpu")
            if a.mode == "ddp_bf16":  # the scripts hold the prompt condition in the compute dtype (Components)
                kwargs = {"encoder_hidden_states": kwargs["encoder_hidden_states"].bfloat16(),
                          "added_cond_kwargs": {k: v.bfloat16() for k, v in kwargs["added_cond_kwargs"].items()}}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.mode == "ddp_bf16"):
                loss = model(*args, **kwargs).sample.float().mean()
            if a.mode == "zero2":
                model.backward(loss)
                model.step()
            else:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        step()  # the first step creates AdamW's states
        step()  # DDP rebuilds its buckets in the second
        live.peak = before = live.now
        step()
    print(json.dumps({"peak": live.peak, "before": before}))


if __name__ == "__main__":
    main()
