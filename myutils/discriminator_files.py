"""A discriminator folder on disk, as RORem releases it: `pytorch_lora_weights.safetensors` (diffusers
LoRA keys `unet.*`, rank 4 on to_q/to_k/to_v/to_out.0 of the SDXL-inpainting UNet) and
`cls_pred_branch.pt` (the head's state dict); a fully fine-tuned discriminator stores
`discriminator.safetensors` (encoder and head) instead of the LoRA. `discriminator_config.json` (ours)
records the head activation and the conditioning; without it, RORem's. Reading and writing them is
here; the network is model/unet_sdxl_discriminator.py, scoring with it myutils/reward_utils.py."""
import json
import os

import torch
from safetensors.torch import load_file, save_file

from model.unet_sdxl_discriminator import CONFIG_FILE, FULL_FILE, HEAD_ACTIVATIONS, HEAD_FILE, LORA_FILE

from .errors import UserError, read_json_object
from .models import read_lora, save_unet

DISCRIMINATOR_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
HEAD_PREFIX = "cls_pred_branch."


def add_discriminator_lora(disc, rank=4, targets=DISCRIMINATOR_LORA_TARGETS):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)), disc)


def save_discriminator(disc, folder, lora):
    """Write RORem's layout: LoRA (or full weights) + cls_pred_branch.pt + our small config."""
    os.makedirs(folder, exist_ok=True)
    if lora:
        save_unet(disc, folder, lora=True)  # only the LoRA layers, as unet.* keys
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in disc.state_dict().items() if not k.startswith(HEAD_PREFIX)}
        save_file(state, os.path.join(folder, FULL_FILE))
    # keys keep the module prefix, as RORem writes them: its loader (load_state_dict(strict=False) on the
    # whole model) finds the head only under cls_pred_branch.*
    torch.save({f"{HEAD_PREFIX}{k}": v.cpu() for k, v in disc.cls_pred_branch.state_dict().items()}, os.path.join(folder, HEAD_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"head_activation": disc.head_activation, "lora": bool(lora), "conditioning": "per_sample"}, f)


def read_head(path):
    """The head's state dict from cls_pred_branch.pt, keys without the module prefix. RORem's file (a
    filter of the whole UNet's state dict) and ours keep the `cls_pred_branch.` prefix; files written
    before we did lack it. Both load."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable discriminator head ({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of the discriminator head, found a {type(state).__name__}")
    return {k[len(HEAD_PREFIX):] if k.startswith(HEAD_PREFIX) else k: v for k, v in state.items()}


def _lora_rank(state):
    for k, v in state.items():
        if "lora.down" in k or "lora_A" in k:
            return v.shape[0]
    raise UserError("no LoRA weights found")


def load_discriminator_weights(disc, folder):
    """Load a discriminator folder into `disc` (adding the LoRA layers if the folder has a LoRA and
    `disc` does not yet). LoRA keys of the up path, which the discriminator does not have, are ignored."""
    from peft.utils import set_peft_model_state_dict

    head = os.path.join(folder, HEAD_FILE)
    if not os.path.isfile(head):
        raise UserError(f"{folder}: no {HEAD_FILE} (expected a RORem discriminator folder)")
    disc.cls_pred_branch.load_state_dict(read_head(head))
    if os.path.isfile(os.path.join(folder, FULL_FILE)):
        missing, unexpected = disc.load_state_dict(load_file(os.path.join(folder, FULL_FILE)), strict=False)
        if unexpected or [k for k in missing if not k.startswith(HEAD_PREFIX)]:
            raise UserError(f"{folder}/{FULL_FILE}: weights do not fit this model")
        return disc
    lora_path = os.path.join(folder, LORA_FILE)
    if not os.path.isfile(lora_path):
        raise UserError(f"{folder}: neither {LORA_FILE} nor {FULL_FILE}")
    state, _ = read_lora(lora_path, "--RORem_discriminator")  # RORem's lora.down/lora.up keys or peft's
    state = {k: v for k, v in state.items() if not k.startswith(("up_blocks.", "conv_out", "conv_norm_out"))}
    if not any("lora" in n for n, _ in disc.named_parameters()):
        add_discriminator_lora(disc, rank=_lora_rank(state))
    result = set_peft_model_state_dict(disc, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{lora_path}: LoRA keys do not fit this UNet (e.g. {result.unexpected_keys[0]})")
    return disc




def read_discriminator_config(folder):
    """{"head_activation", "conditioning"} of a discriminator folder. RORem's release has no config:
    softplus head, RORem's conditioning. Ours records both; folders we wrote before recording the
    conditioning were trained with per-sample time ids."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return {"head_activation": "softplus", "conditioning": "rorem"}  # RORem's release
    cfg = read_json_object(path, "unreadable", "; it is written with the discriminator's weights: copy the folder again")
    if cfg.get("head_activation", "softplus") not in HEAD_ACTIVATIONS or cfg.get("conditioning", "per_sample") not in ("rorem", "per_sample"):
        raise UserError(f"{path}: head_activation {cfg.get('head_activation')!r} / conditioning {cfg.get('conditioning')!r} "
                        "are not ones this code wrote")
    return {"head_activation": cfg.get("head_activation", "softplus"), "conditioning": cfg.get("conditioning", "per_sample")}
