"""LoRA adapters on a UNet (or transformer): adding them in fp32 on a cast base, switching them off for
a reference pass. Saving and loading adapter weights: myutils/models.py.
"""
import contextlib
import warnings



LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@contextlib.contextmanager
def disabled(unet):
    """The LoRA model as its base model (a reference or teacher without a second UNet in memory)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


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
