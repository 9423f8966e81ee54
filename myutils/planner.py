"""Memory and compute planning for real-scale runs, from model configs on PyTorch's meta device (no
weights, no memory): parameter counts, the bytes of weights, gradients and optimizer states a
training script holds per GPU, activations saved for backward (measured with saved-tensor hooks),
and FLOPs (torch.utils.flop_counter). The byte rules follow what the scripts do:

    full fine-tune, DDP:      fp32 weights 4 B + fp32 gradients 4 B + AdamW 8 B per parameter
                              (+ 4 B per parameter tensor: AdamW's `step`)
    full fine-tune, ZeRO-2:   weights in the compute dtype, replicated; fp16/bf16 gradients and fp32
                              master weights + AdamW moments sharded over the GPUs
    LoRA:                     the frozen base in the compute dtype; LoRA weights fp32 with fp32
                              gradients and AdamW (the scripts keep trainable LoRA weights in fp32)
"""
import json

import torch

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_config(path):
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def meta_unet(config_path, dtype=torch.float32):
    """The UNet of a config file, built on the meta device (shapes only)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(read_config(config_path)).to(dtype)


def meta_discriminator(config_path, dtype=torch.float32, unet=None):
    """RORem's discriminator (the UNet's encoder and mid block + its head) on the meta device, built
    from `unet` (whose blocks it shares: gradient checkpointing is switched on that UNet)."""
    from model.unet_sdxl_discriminator import UNetSDXLDiscriminator

    with torch.device("meta"):
        return UNetSDXLDiscriminator.from_unet(unet if unet is not None else meta_unet(config_path)).to(dtype)


def meta_vae(config_path, dtype=torch.float32):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(read_config(config_path)).to(dtype)


def add_meta_lora(unet, rank, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A LoRA as the scripts add it (peft, gaussian init), on the meta model; returns its parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
    else:  # RORem's discriminator is a plain module: the LoRA goes in as train_RORem_discriminator.py puts it
        from .reward_utils import add_discriminator_lora

        add_discriminator_lora(unet, rank, list(targets))
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def count(params):
    """(number of elements, number of tensors) of a parameter list."""
    params = list(params)
    return sum(p.numel() for p in params), len(params)


def training_state_bytes(trainable, trainable_tensors, frozen, precision="fp16", mode="full", zero2=False, num_gpus=1):
    """Per-GPU bytes {"weights", "gradients", "optimizer"} of a training run. trainable/frozen:
    element counts; trainable_tensors: how many parameter tensors are trained (AdamW keeps a 4-byte
    `step` per tensor). mode: "full" or "lora"; zero2: DeepSpeed ZeRO-2 over num_gpus (full only)."""
    compute = DTYPE_BYTES[precision]
    if mode == "lora":
        return {"weights": frozen * compute + trainable * 4, "gradients": trainable * 4,
                "optimizer": trainable * 8 + trainable_tensors * 4}
    if zero2:
        return {"weights": trainable * compute, "gradients": trainable * compute / num_gpus,
                "optimizer": (trainable * 12 + trainable_tensors * 4) / num_gpus}
    return {"weights": trainable * 4, "gradients": trainable * 4, "optimizer": trainable * 8 + trainable_tensors * 4}


def unet_inputs(unet, batch, resolution, device="meta"):
    """Inputs of an SDXL-inpainting UNet for `batch` images at `resolution` px (latents 1/8)."""
    cfg, dtype = unet.config, next(unet.parameters()).dtype
    h = resolution // 8
    text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return ((torch.randn(batch, cfg.in_channels, h, h, device=device, dtype=dtype), torch.full((batch,), 500, device=device)),
            {"encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype),
             "added_cond_kwargs": {"text_embeds": torch.randn(batch, text, device=device, dtype=dtype),
                                   "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}})


def _unet_output(model, args, kwargs):
    return model(*args, **kwargs).sample


def _discriminator_output(model, args, kwargs):
    return model(args[0], args[1], kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"])


def measure_unet(unet, resolution, batch=1, backward=True, checkpointing=False, discriminator=None):
    """{"forward_flops", "step_flops", "saved_bytes"} of one UNet pass: forward FLOPs, forward +
    backward FLOPs (what a training micro-batch costs; = forward without backward), and the bytes of
    tensors saved for backward (activations; 0 without backward). Works on meta models. With
    `discriminator` (built from this UNet) that model is measured instead, on the same inputs."""
    from torch.utils.flop_counter import FlopCounterMode

    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    model, call = (discriminator, _discriminator_output) if discriminator is not None else (unet, _unet_output)
    model.train(backward)
    args, kwargs = unet_inputs(unet, batch, resolution, next(unet.parameters()).device)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter:
        if backward:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = call(model, args, kwargs)
            forward = counter.get_total_flops()
            if out.requires_grad:
                out.float().mean().backward()
        else:
            with torch.no_grad():
                call(model, args, kwargs)
            forward = counter.get_total_flops()
        total = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    unet.disable_gradient_checkpointing()
    return {"forward_flops": forward, "step_flops": total, "saved_bytes": saved[0]}


def vae_encode_flops(vae, resolution):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, resolution, resolution, device=next(vae.parameters()).device, dtype=next(vae.parameters()).dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(x)
    return counter.get_total_flops()
