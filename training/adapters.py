"""LoRA adapters on a UNet (or transformer): adding them (new, or a saved one trained on) in fp32 on a
cast base, switching them off, or calling the model with their start's values, for a reference pass. Saving and loading adapter
weights: myutils/models.py.
"""
import contextlib
import warnings

import torch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@contextlib.contextmanager
def disabled(unet):
    """The LoRA model as its base model (a reference or teacher without a second UNet in memory)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def trainable_state(model):
    """{name: a detached copy} of the model's trainable parameters: the start a run is compared with."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def called_with(model, state):
    """The model as a callable with `state`'s tensors in place of its parameters of those names
    (torch.func.functional_call): the model's own parameters are untouched, so a graph built on them
    in the same step stays valid (an in-place swap would invalidate it). The start's outputs."""
    return lambda *args, **kwargs: torch.func.functional_call(model, state, args, kwargs)


def cast_base_weights(model, dtype):
    """Cast a model's parameters and buffers to `dtype`, except LoRA adapter weights: model.to(dtype)
    would also turn adapters added earlier (trainable, kept in fp32) into fp16, which the grad scaler
    then refuses to unscale."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" not in name and t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)


def add_lora(unet, args, dtype, adapter_name="default"):
    """Freeze the base UNet (in the compute dtype) and add a trainable LoRA kept in fp32; returns
    its parameters. Several adapters on one model share its base weights (one copy in memory), and
    adding one leaves the others' weights as they were."""
    from peft import LoraConfig

    for name, p in unet.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    cast_base_weights(unet, dtype)
    with warnings.catch_warnings():  # peft warns about every adapter after the first: several are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=list(args.lora_target_modules)), adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.data = p.data.float()  # fp16 LoRA params break the grad scaler's unscale
    return params


def load_trainable_lora(unet, path, dtype, flag, kinds=("lcm_student",)):
    """Freeze the base UNet (in the compute dtype) and load a saved LoRA (myutils/models.py
    load_lora_into_unet: any naming, its own rank, alpha and layers) as the trainable adapter
    "default", kept in fp32; returns its parameters. Saved again (save_unet) it loads where the
    original did, e.g. a 4-step LCM LoRA trained on by DRaFT into inference_RORem_4S.py."""
    from myutils.models import load_lora_into_unet

    for p in unet.parameters():
        p.requires_grad_(False)
    cast_base_weights(unet, dtype)
    load_lora_into_unet(unet, path, flag, adapter_name="default", kinds=kinds)
    params = [p for n, p in unet.named_parameters() if "lora_" in n and ".default." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params
