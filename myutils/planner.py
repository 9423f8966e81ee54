"""Memory and compute planning for real-scale runs, from model configs on PyTorch's meta device (no
weights, no memory): parameter counts, the bytes of weights, gradients and optimizer states a
training script holds per GPU, activations (the bytes alive at the end of a forward pass, measured
per sample), the peak of a step, and FLOPs (torch.utils.flop_counter). The byte rules follow what
the scripts do:

    full fine-tune, DDP:      fp32 weights 4 B + fp32 gradients 4 B (in DDP's buckets, which the
                              scripts use as the gradients: gradient_as_bucket_view) + AdamW 8 B per
                              parameter (+ 4 B per parameter tensor: AdamW's `step`)
    full fine-tune, ZeRO-2:   weights in the compute dtype, replicated; fp16/bf16 gradients and fp32
                              master weights + AdamW moments sharded over the GPUs, plus DeepSpeed's
                              reduce bucket
    LoRA:                     the frozen base in the compute dtype; LoRA weights fp32 with fp32
                              gradients and AdamW (the scripts keep trainable LoRA weights in fp32)

The peak of a step (peak_bytes) adds to what persists the larger of: what forward and backward
allocate (measured: activations, checkpointing's recompute, temporaries; + autocast's compute-dtype
copies of fp32 weights, kept for backward) and AdamW's foreach update, whose temporaries take one
fp32 copy of what it updates.
"""
import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_config(path, cls):
    """A model's config.json (the diffusers layout) for class `cls`, keys starting with _ left out (a
    config of another class, or none, would build the class's defaults without a word)."""
    from .errors import UserError, read_json_object

    cfg = read_json_object(path, "not a model config.json")
    if cfg.get("_class_name") != cls.__name__:
        raise UserError(f"{path}: a config of {cfg.get('_class_name') or 'no class'} (\"_class_name\"), expected {cls.__name__}")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def meta_unet(config_path, dtype=torch.float32):
    """The UNet of a config file, built on the meta device (shapes only)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(read_config(config_path, UNet2DConditionModel)).to(dtype)


def meta_discriminator(config_path, dtype=torch.float32, unet=None):
    """RORem's discriminator (the UNet's encoder and mid block + its head) on the meta device, built
    from `unet` (whose blocks it shares: gradient checkpointing is switched on that UNet)."""
    from model.unet_sdxl_discriminator import UNetSDXLDiscriminator

    with torch.device("meta"):
        return UNetSDXLDiscriminator.from_unet(unet if unet is not None else meta_unet(config_path)).to(dtype)


def meta_vae(config_path, dtype=torch.float32):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(read_config(config_path, AutoencoderKL)).to(dtype)


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # the scripts' default LoRA targets


def add_meta_lora(unet, rank, targets=ATTENTION):
    """A LoRA as the scripts add it (peft, gaussian init), on the meta model; returns its parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
    else:  # RORem's discriminator is a plain module: the LoRA goes in as train_RORem_discriminator.py puts it
        from .discriminator_files import add_discriminator_lora

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


def peak_bytes(state, step_peak, trainable, precision="fp16", mode="full", zero2=False, num_gpus=1, ema=False,
               reduce_bucket_elements=5e8, other_transient=0):
    """Predicted peak bytes per GPU of a training step: {"persistent", "transient", "peak"}.

    state: training_state_bytes(); step_peak: what forward + backward allocate on top (measure_unet's
    step_peak_bytes, measured at the batch); trainable: trained element count. Persistent:
    weights, optimizer states, the gradients in DDP's buckets (which the scripts use as the gradients)
    or ZeRO-2's reduce bucket, EMA weights (fp32). Transient, the largest of the step (+ autocast's
    compute-dtype copies of fp32 weights, kept for backward, in a full fine-tune under mixed
    precision), AdamW's foreach update (one fp32 temporary per updated element, + ZeRO-2's gradient
    partition, which lives from backward to the step) and
    other_transient: what runs outside the step (the VAE encoding a chunk; RL sampling and
    evaluation forwards)."""
    compute = DTYPE_BYTES[precision]
    persistent = state["weights"] + state["optimizer"] + (trainable * 4 if ema else 0)
    if zero2:  # the reduce bucket lives through backward, where the step peaks; the partition until the step
        persistent += min(reduce_bucket_elements, trainable) * compute
        update = state["gradients"] + trainable * 4 / num_gpus
    else:  # DDP's buckets hold the gradients all the time
        persistent += state["gradients"]
        update = trainable * 4
    copies = trainable * compute if mode == "full" and not zero2 and precision != "fp32" else 0
    transient = max(step_peak + copies, update, other_transient)
    return {"persistent": persistent, "transient": transient, "peak": persistent + transient}


class LiveTensorBytes(TorchDispatchMode):
    """While active: the bytes of the storages created that are still alive (`now`) and their maximum
    (`peak`); works on the meta device, where storages have sizes but no memory. Each storage is
    followed to its own death (PyTorch keeps a storage's Python object for as long as the storage
    lives), so a storage that a `param.data = ...` swap or a dying view releases is counted out at
    once, and a new one at the same address is counted in (ZeRO and DDP's bucket views do both).
    device: count only tensors of that device type (a real run: DeepSpeed keeps meta-device copies
    of the parameters, which take no memory)."""

    def __init__(self, device=None):
        super().__init__()
        self.device, self.sizes, self.now, self.peak = device, {}, 0, 0

    def _release(self, key):
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # a view or in-place result shares an input's storage: not new memory, even when that storage
        # was made before tracking began (a weight viewed in the forward pass)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and self.device in (None, t.device.type):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.sizes and key not in inputs:
                    self.sizes[key] = storage.nbytes()
                    self.now += self.sizes[key]
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._release, key)
        return out


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


@contextlib.contextmanager
def flash_attention_on_meta():
    """Attention as a GPU's flash kernel keeps it for backward (output and log-sum-exp, no
    probabilities): on the meta device scaled_dot_product_attention otherwise runs the math path,
    which saves the full attention matrix. CPU flash attention's op has a meta kernel with that memory
    behaviour; a real CPU run picks the same kernel."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or kwargs.get("enable_gqa"):
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def measure_unet(unet, resolution, batch=1, backward=True, checkpointing=False, discriminator=None, input_grad=False):
    """measure_pass() of an SDXL-inpainting UNet at `batch` images of `resolution` px. With
    `discriminator` (built from this UNet) that model is measured instead, on the same inputs.
    input_grad: the latents require grad (a frozen reward model's backward to its input)."""
    model, call = (discriminator, _discriminator_output) if discriminator is not None else (unet, _unet_output)
    device = next(unet.parameters()).device

    def inputs():
        args, kwargs = unet_inputs(unet, batch, resolution, device)
        return ((args[0].requires_grad_(True), *args[1:]) if input_grad else args), kwargs
    return measure_pass(model, inputs, call, backward, checkpointing, unet)


def measure_pass(model, make_inputs, call, backward=True, checkpointing=False, checkpointed=None):
    """{"forward_flops", "step_flops", "activation_bytes", "step_peak_bytes"} of one pass of `model`
    on make_inputs() -> (args, kwargs): forward FLOPs, forward + backward FLOPs (what a training
    micro-batch costs; = forward without backward), the bytes alive at the end of the forward pass,
    inputs included (activations; 0 without backward), and the peak of what the pass allocates on top
    of the weights (forward + backward; with gradient checkpointing: the stored block inputs plus one
    block's recompute; without backward: a no-grad forward's temporaries). Each gradient is dropped
    once accumulated: DDP's buckets and ZeRO's partitions hold them (persistent memory), so the peak
    counts only what a step adds. Works on meta models, with flash attention's memory
    (flash_attention_on_meta). Checkpointing is switched on `checkpointed` (default: the model)."""
    from torch.utils.flop_counter import FlopCounterMode

    holder = checkpointed if checkpointed is not None else model
    if checkpointing:
        holder.enable_gradient_checkpointing()
    else:
        holder.disable_gradient_checkpointing()
    model.train(backward)
    with FlopCounterMode(display=False) as counter, flash_attention_on_meta():
        args, kwargs = make_inputs()
        if backward:
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
    del args, kwargs
    # memory in a pass of its own: the FLOP counter keeps checkpointed blocks' recomputed tensors alive
    live, alive = LiveTensorBytes(), 0
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters() if p.requires_grad]
    with flash_attention_on_meta(), live, torch.set_grad_enabled(backward):
        args, kwargs = make_inputs()
        out = call(model, args, kwargs)
        if backward:
            alive = live.now
            if out.requires_grad:
                out.float().mean().backward()
        del out, args, kwargs
    for h in hooks:
        h.remove()
    holder.disable_gradient_checkpointing()
    return {"forward_flops": forward, "step_flops": total, "activation_bytes": alive, "step_peak_bytes": live.peak}


def meta_flux(config_path, dtype=torch.float32):
    """A FLUX(-Fill) transformer of a config file on the meta device."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(read_config(config_path, FluxTransformer2DModel)).to(dtype)


def flux_inputs(model, batch, resolution, text_tokens=512, device="meta"):
    """Inputs of a FLUX-Fill transformer for `batch` images at `resolution` px: 2x2-packed latents
    (VAE factor 8, so (resolution / 16)^2 tokens) with the fill condition in their channels, T5 tokens."""
    cfg, dtype = model.config, next(model.parameters()).dtype
    tokens = (resolution // 16) ** 2
    return ((), {"hidden_states": torch.randn(batch, tokens, cfg.in_channels, device=device, dtype=dtype),
                 "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
                 "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
                 "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
                 "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
                 "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
                 "guidance": torch.full((batch,), 30.0, device=device, dtype=dtype) if cfg.guidance_embeds else None})


def flux_output(model, args, kwargs):
    return model(*args, **kwargs).sample


def measure_flux(model, resolution, batch=1, backward=True, checkpointing=False, text_tokens=512):
    device = next(model.parameters()).device
    return measure_pass(model, lambda: flux_inputs(model, batch, resolution, text_tokens, device), flux_output, backward, checkpointing)


def vae_encode_peak_bytes(vae, resolution, chunk):
    """Peak bytes of encoding `chunk` images (no grad), as the scripts encode a batch in chunks."""
    live = LiveTensorBytes()
    with live, torch.no_grad():
        x = torch.randn(chunk, 3, resolution, resolution, device=next(vae.parameters()).device, dtype=next(vae.parameters()).dtype)
        vae.encode(x)
        del x
    return live.peak


def vae_encode_flops(vae, resolution):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, resolution, resolution, device=next(vae.parameters()).device, dtype=next(vae.parameters()).dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(x)
    return counter.get_total_flops()
