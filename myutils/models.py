"""Loading SDXL-inpainting pipelines, RORem UNets and LoRA files (any naming) from local folders or the
hub, with clear errors; saving a trained UNet or LoRA so stock diffusers loads it."""
import logging
import os

import torch

from .errors import UserError


class _DropVacuousFp32Warning(logging.Filter):
    """diffusers warns on every dtype cast, even when the list of fp32-only modules is empty."""

    def filter(self, record):
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropVacuousFp32Warning())

DEFAULT_MODEL = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _looks_local(name):
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1


def _hub_error(what, name, err):
    reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return UserError(f"{what} {name!r} is not a local folder and could not be loaded from the Hugging Face hub "
                     f"({reason[:200]}); pass a local folder or check the id and the network")


def check_model_path(name, what="--pretrained_model_name_or_path"):
    """A path that looks local must exist; hub ids are checked when they are loaded."""
    if _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise UserError(f"{what}: folder not found: {name}")
    return os.path.expanduser(name) if _looks_local(name) else name


def load_inpaint_pipeline(name, pretrained_unet=None, variant=None, revision=None, dtype=torch.float32, unet=None,
                          flags=("--pretrained_model_name_or_path", "--pretrained_unet")):
    """StableDiffusionXLInpaintPipeline from a folder or hub id; optionally with a RORem UNet swapped in.
    flags: the arguments the user gave the two as (messages name them)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    name = check_model_path(name, flags[0])
    kwargs = {"variant": variant, "revision": revision, "dtype": dtype}
    if unet is None and pretrained_unet:
        unet = load_unet(pretrained_unet, variant=variant, dtype=dtype, flag=flags[1])
    if unet is not None:
        kwargs["unet"] = unet
    try:
        try:
            pipe = StableDiffusionXLInpaintPipeline.from_pretrained(name, add_watermarker=False, **kwargs)
        except (OSError, ValueError):
            if variant is None:
                raise
            kwargs["variant"] = None  # the variant may exist only for the UNet (a RORem fp16 release)
            pipe = StableDiffusionXLInpaintPipeline.from_pretrained(name, add_watermarker=False, **kwargs)
    except (OSError, ValueError) as e:
        if _looks_local(name):
            raise UserError(f"{flags[0]} {name}: not a loadable SDXL-inpainting folder ({str(e).splitlines()[0][:200]})") from None
        raise _hub_error(flags[0], name, e) from None
    return pipe


def load_unet(path, variant=None, revision=None, dtype=torch.float32, flag="--pretrained_unet"):
    """A remover UNet: a diffusers UNet folder (config.json + weights), or a folder holding `unet/`.

    `variant="fp16"` loads RORem's `diffusion_pytorch_model.fp16.safetensors`; if the variant file is
    absent, the plain weights are used."""
    from diffusers import UNet2DConditionModel

    path = check_model_path(path, flag)
    subfolder = "unet" if _looks_local(path) and os.path.isdir(os.path.join(path, "unet")) else None
    if _looks_local(path) and not os.path.isfile(os.path.join(path, subfolder or "", "config.json")):
        raise UserError(f"{flag} {path}: no config.json (expected a diffusers UNet folder or a folder with unet/)")
    try:
        try:
            return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, variant=variant, revision=revision, dtype=dtype)
        except (OSError, ValueError):
            if variant is None:
                raise
            return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, revision=revision, dtype=dtype)
    except (OSError, ValueError) as e:
        if _looks_local(path):
            raise UserError(f"{flag} {path}: cannot load the UNet ({str(e).splitlines()[0][:200]})") from None
        raise _hub_error(flag, path, e) from None


def resolve_device_dtype(device="auto", dtype="auto"):
    """--device/--dtype as the inference scripts take them: auto = CUDA in fp16 if present, else CPU in fp32."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here (use --device cpu, or auto)")
    return device, (DTYPES[dtype] if dtype != "auto" else (torch.float16 if device.startswith("cuda") else torch.float32))


# ----------------------------------------------------------------------------- LoRA files

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
MODEL_RECORD = "rorem_model.json"  # written by our training scripts: which script, which kind (training/checkpoint.py)
MODEL_KINDS = {"remover": "a remover (the full sampler's UNet or LoRA)", "lcm_student": "a 4-step LCM student LoRA",
               "discriminator": "a discriminator"}


def check_kind(path, expected, flag):
    """Refuse a model folder our scripts recorded as another kind than `expected` (a tuple of
    MODEL_KINDS); files without a record (RORem's releases, other tools) are taken as given."""
    from .errors import read_json_object

    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    record = os.path.join(folder, MODEL_RECORD)
    if not os.path.isfile(record):
        return None
    found = read_json_object(record, f"unreadable, so what {flag} {path} holds is unknown")
    kind, script = found.get("kind"), found.get("script", "?")
    if kind not in expected:
        raise UserError(f"{flag} {path}: {MODEL_KINDS.get(kind, kind)} (made by {script}), but {flag} takes "
                        f"{' or '.join(MODEL_KINDS[k] for k in expected)}")
    return kind


def read_lora(path, flag="--RORem_LoRA", pipeline_cls=None, prefix="unet"):
    """A LoRA file, or the folder holding pytorch_lora_weights.safetensors, as ({key: tensor} in peft
    naming without the `prefix`, the adapter metadata diffusers saved or None).

    Every naming RORem and diffusers wrote loads: peft's lora_A/lora_B, the older lora.down/lora.up,
    and files that mix both. RORem's 4-step LCM LoRA is such a file (diffusers 0.30 renamed only the
    attention keys), and today's diffusers converts a file only when its FIRST key lacks lora_A, so it
    silently drops every attention LoRA of it; here each key is converted on its own."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from model.unet_sdxl_discriminator import HEAD_FILE

    if pipeline_cls is None:
        from diffusers import StableDiffusionXLInpaintPipeline as pipeline_cls
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: not found")
    folder, name = (path, None) if os.path.isdir(path) else os.path.split(path)
    if flag != "--RORem_discriminator" and os.path.isfile(os.path.join(folder or ".", HEAD_FILE)):
        # its LoRA would load onto a remover's UNet with a warning at most
        raise UserError(f"{flag} {path}: a discriminator (its folder holds {HEAD_FILE}), not a remover LoRA; a discriminator "
                        "goes to --RORem_discriminator / --discriminator_path")
    if name is None and not os.path.isfile(os.path.join(folder, LORA_WEIGHTS)):
        raise UserError(f"{flag} {path}: no {LORA_WEIGHTS} in this folder")
    try:  # SDXL's loader returns (state, alphas, metadata), FLUX's (state, metadata)
        loaded = pipeline_cls.lora_state_dict(folder or ".", weight_name=name, return_lora_metadata=True)
    except Exception as e:  # a damaged or foreign file: say which, in one line
        raise UserError(f"{flag} {path}: not a readable LoRA file ({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})") from None
    state, metadata = loaded[0], loaded[-1]
    state = state[0] if isinstance(state, tuple) else state
    ours = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not ours:
        raise UserError(f"{flag} {path}: no {prefix}.* LoRA weights in the file")
    return convert_unet_state_dict_to_peft(ours), metadata


def load_lora_into_pipeline(pipe, path, flag="--RORem_LoRA", kinds=("remover", "lcm_student")):
    """Put a LoRA file on the pipeline's UNet (load_lora_into_unet); returns the adapter's name."""
    return load_lora_into_unet(pipe.unet, path, flag, kinds=kinds)


def load_lora_into_unet(unet, path, flag="--RORem_LoRA", adapter_name=None, kinds=("remover", "lcm_student")):
    """Put a LoRA file on a UNet as a new adapter (read_lora: any naming; its rank, alpha and target
    layers from the file) and check that every one of its weights landed; returns the adapter's name.
    diffusers only warns about keys it could not place. kinds: what the flag takes (check_kind)."""
    from peft.utils import get_peft_model_state_dict

    check_kind(path, kinds, flag)  # before the weights are read
    state, metadata = read_lora(path, flag)
    before = set(getattr(unet, "peft_config", {}) or {})
    unet.load_lora_adapter({f"unet.{k}": v for k, v in state.items()}, prefix="unet", network_alphas=None, metadata=metadata,
                           adapter_name=adapter_name)
    added = [n for n in unet.peft_config if n not in before]
    loaded = get_peft_model_state_dict(unet, adapter_name=added[0]) if added else {}
    missing = [k for k in state if k not in loaded]
    if missing:
        raise UserError(f"{flag} {path}: {len(missing)} of its {len(state)} LoRA weights do not fit this UNet (e.g. {missing[0]})")
    return added[0]


# ----------------------------------------------------------------------------- weights a training run saves

def _lora_pipeline(model):
    """(pipeline class, key prefix) whose save/load_lora_weights fit the model: a FLUX transformer's
    LoRA loads with FluxFillPipeline under "transformer.", a UNet's with the SDXL pipelines under "unet."."""
    if type(model).__name__ == "FluxTransformer2DModel":
        from diffusers import FluxPipeline
        return FluxPipeline, "transformer"
    from diffusers import StableDiffusionXLInpaintPipeline
    return StableDiffusionXLInpaintPipeline, "unet"


def save_unet(unet, output_dir, lora, adapter="default"):
    """Write the UNet (or flow transformer) in a format diffusers loads without our code.

    LoRA: <output_dir>/pytorch_lora_weights.safetensors (for pipe.load_lora_weights), the adapter
    named `adapter`. Full: <output_dir>/unet (a diffusers UNet folder)."""
    if lora:
        from peft.utils import get_peft_model_state_dict

        # PEFT keys as they are: diffusers' key conversion renames only attention layers, and a file
        # mixing both namings loads without the attention LoRA. The config keeps rank and alpha.
        pipeline, prefix = _lora_pipeline(unet)
        config = getattr(unet, "peft_config", {}).get(adapter)
        pipeline.save_lora_weights(output_dir, **{f"{prefix}_lora_layers": get_peft_model_state_dict(unet, adapter_name=adapter),
                                                  f"{prefix}_lora_adapter_metadata": config.to_dict() if config else None})
    else:
        unet.save_pretrained(os.path.join(output_dir, "unet"))


def load_unet_weights(unet, input_dir, lora, adapter="default"):
    """Inverse of save_unet, into an existing (possibly LoRA-wrapped) model."""
    if lora:
        from peft.utils import set_peft_model_state_dict

        pipeline, prefix = _lora_pipeline(unet)
        state, _ = read_lora(input_dir, "checkpoint", pipeline, prefix)
        result = set_peft_model_state_dict(unet, state, adapter_name=adapter)
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{input_dir}: LoRA weights do not fit this model (unexpected keys, e.g. {result.unexpected_keys[0]})")
    else:
        loaded = load_unet(os.path.join(input_dir, "unet"))
        unet.load_state_dict(loaded.state_dict())
