"""The discriminator as a reward: RORem's file format, batched scoring, and score normalisations.

A discriminator folder holds what RORem releases: `pytorch_lora_weights.safetensors` (diffusers
LoRA keys `unet.*`, rank 4 on to_q/to_k/to_v/to_out.0 of the SDXL-inpainting UNet) and
`cls_pred_branch.pt` (the head's state dict). A fully fine-tuned discriminator stores
`discriminator.safetensors` (encoder and head) instead of the LoRA. `discriminator_config.json`
(ours) records the head activation; without it the head is RORem's softplus.

Inputs, as RORem trains it: latents of the edited result at t = 0, the mask, and latents of the
UNMASKED source, with the empty-prompt conditioning.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

from model.unet_sdxl_discriminator import UNetSDXLDiscriminator

from .data import RemovalDataset, stack_samples
from .errors import UserError
from .models import load_inpaint_pipeline, read_lora
from .sdxl_inpaint import batch_latent_params, encode_prompt_once, posterior_mean_latents, unet_input

LORA_FILE, HEAD_FILE, FULL_FILE, CONFIG_FILE = ("pytorch_lora_weights.safetensors", "cls_pred_branch.pt",
                                                "discriminator.safetensors", "discriminator_config.json")
DISCRIMINATOR_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
HEAD_PREFIX = "cls_pred_branch."
TRAINING_FLAGS = ("--pretrained_model_name_or_path", "--discriminator_path")  # the training scripts' names for load_reward_model


# ----------------------------------------------------------------------------- file format

def add_discriminator_lora(disc, rank=4, targets=DISCRIMINATOR_LORA_TARGETS):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)), disc)


def save_discriminator(disc, folder, lora):
    """Write RORem's layout: LoRA (or full weights) + cls_pred_branch.pt + our small config."""
    os.makedirs(folder, exist_ok=True)
    if lora:
        from .train_util import save_unet

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


CONDITIONINGS = ("rorem", "per_sample")
RORem_TIME_IDS = (512, 512, 0, 0, 512, 512)  # original size, crop top-left, target size: fixed in RORem's scripts


def read_discriminator_config(folder):
    """{"head_activation", "conditioning"} of a discriminator folder. RORem's release has no config:
    softplus head, RORem's conditioning. Ours records both; folders we wrote before recording the
    conditioning were trained with per-sample time ids."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return {"head_activation": "softplus", "conditioning": "rorem"}  # RORem's release
    with open(path) as f:
        cfg = json.load(f)
    return {"head_activation": cfg.get("head_activation", "softplus"), "conditioning": cfg.get("conditioning", "per_sample")}


# ----------------------------------------------------------------------------- scoring

class DiscriminatorReward:
    """Batched, no-grad scores (B,) from the discriminator, on pixels or directly on latents.

    conditioning "per_sample" (ours): SDXL time ids from each sample's original size and crop, the
    edited latents as they are. "rorem" (RORem's release, as its scripts train and score it): fixed time
    ids (512, 512, 0, 0, 512, 512) and the edited latents through the scheduler's add_noise at t = 0,
    sqrt(a0) x + sqrt(1 - a0) noise; the noise is one fixed draw (seed 0), so a score stays a
    deterministic function of the images."""

    def __init__(self, disc, vae, condition, resolution, conditioning="per_sample", alpha_t0=None):
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        if conditioning == "rorem" and alpha_t0 is None:
            raise ValueError("RORem's conditioning needs alphas_cumprod[0] of the noise schedule (alpha_t0)")
        self.disc, self.vae, self.resolution = disc.eval(), vae, resolution
        self.condition = condition.to(disc.device, disc.dtype)
        self.conditioning, self.alpha_t0 = conditioning, alpha_t0

    def _rorem_noised(self, latents):
        g = torch.Generator("cpu").manual_seed(0)
        noise = torch.randn(latents.shape[1:], generator=g, device=g.device).to(latents.device, torch.float32)
        return self.alpha_t0 ** 0.5 * latents.float() + (1 - self.alpha_t0) ** 0.5 * noise

    @torch.no_grad()
    def score_latents(self, source_latents, mask_latent, edited_latents, original_size=None, crop_top_left=None):
        """Latents already scaled by the VAE's scaling factor (what a sampler produces): no decode."""
        b, device = edited_latents.shape[0], self.disc.device
        if self.conditioning == "rorem":
            edited_latents = self._rorem_noised(edited_latents)
            original_size = torch.tensor([RORem_TIME_IDS[:2]], device=device).expand(b, 2)
            crop_top_left, target = torch.tensor([RORem_TIME_IDS[2:4]], device=device).expand(b, 2), RORem_TIME_IDS[4:]
        else:
            target = (self.resolution, self.resolution)
            if original_size is None:
                original_size = torch.full((b, 2), self.resolution, device=device)
            if crop_top_left is None:
                crop_top_left = torch.zeros(b, 2, device=device)
        x = unet_input(edited_latents, mask_latent, source_latents).to(device, self.disc.dtype)
        kw = self.condition.unet_kwargs(original_size, crop_top_left, target)
        return self.disc(x, 0, kw["encoder_hidden_states"], kw["added_cond_kwargs"]).float()

    @torch.no_grad()
    def score_pixels(self, source, mask, edited, original_size=None, crop_top_left=None):
        """source/edited (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) in {0, 1}. The posterior mean is
        used (no sampling noise), so a score is a deterministic function of the images."""
        params = batch_latent_params(self.vae, {"source": source, "mask": mask, "GT": edited}, ["GT", "source"])
        edited_latents = posterior_mean_latents(params["params:GT"], self.vae.config)
        source_latents = posterior_mean_latents(params["params:source"], self.vae.config)
        return self.score_latents(source_latents, params["mask_latent"], edited_latents, original_size, crop_top_left)


def score_entries(reward, entries, resolution, batch_size):
    """Discriminator scores of (source, mask, GT=edited) entries, in order (centre crop at the
    discriminator's training resolution)."""
    from tqdm.auto import tqdm

    dataset = RemovalDataset(entries, "triplet", resolution)
    scores = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="scoring", disable=len(dataset) <= batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        b = stack_samples(items, ("source", "mask", "GT", "original_size", "crop_top_left"))
        scores += reward.score_pixels(b["source"], b["mask"], b["GT"], b["original_size"], b["crop_top_left"]).tolist()
    return scores


def score_results(reward, samples, results, batch_size=16):
    """Scores of PIL results (processing size) for dataset samples: each judged with its sample's
    source, mask, original size and crop."""
    from .img_util import pil_to_tensor

    scores = []
    for i in range(0, len(samples), batch_size):
        part = samples[i:i + batch_size]
        stack = stack_samples(part, ("source", "mask", "original_size", "crop_top_left"))
        edited = torch.stack([pil_to_tensor(r) for r in results[i:i + batch_size]])
        scores += reward.score_pixels(stack["source"], stack["mask"], edited, stack["original_size"], stack["crop_top_left"]).tolist()
    return scores


def load_reward_model(pretrained_model, discriminator_path, resolution=512, device="cpu", dtype=torch.float32, variant=None,
                      conditioning="auto", flags=("--pretrained_model", "--RORem_discriminator")):
    """(DiscriminatorReward) from an SDXL-inpainting model and a discriminator folder. conditioning
    "auto": what the folder was trained with (RORem's release: RORem's; ours: per sample). flags: the
    arguments the user gave the two as (messages name them)."""
    from diffusers import DDPMScheduler

    if not os.path.isdir(discriminator_path):
        raise UserError(f"{flags[1]} {discriminator_path}: folder not found")
    cfg = read_discriminator_config(discriminator_path)
    pipe = load_inpaint_pipeline(pretrained_model, variant=variant, flags=(flags[0], "--pretrained_unet"))
    condition = encode_prompt_once(pipe, "")
    alpha_t0 = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.tolist()[0]
    disc = UNetSDXLDiscriminator.from_unet(pipe.unet, cfg["head_activation"])
    load_discriminator_weights(disc, discriminator_path)
    vae = pipe.vae.to(device)
    del pipe
    return DiscriminatorReward(disc.to(device, dtype), vae, condition, resolution,
                               cfg["conditioning"] if conditioning == "auto" else conditioning, alpha_t0)


# ----------------------------------------------------------------------------- normalisations

def clamp01(scores):
    """Scores clipped to [0, 1] (RORem's softplus scores are trained toward 0 and 1)."""
    return scores.clamp(0.0, 1.0)


def squash01(scores, center=0.5, sharpness=10.0):
    """A smooth map to (0, 1): sigmoid(sharpness * (score - center)); 0.5 at the center."""
    return torch.sigmoid(sharpness * (scores - center))


def zscore(scores, eps=1e-6):
    """(s - mean) / (std + eps) within the batch (population std); all-equal scores give zeros."""
    scores = scores.float()
    return (scores - scores.mean()) / (scores.std(unbiased=False) + eps)


def percentile_rank(scores, reference=None):
    """Fraction of the reference below each score, ties counted half (the mid-rank). Without a
    reference, ranks within the batch excluding the score itself: the lowest gets 0, the highest 1."""
    scores = scores.float().reshape(-1)
    if reference is None:
        if scores.numel() < 2:
            return torch.full_like(scores, 0.5)
        below = (scores[None, :] < scores[:, None]).sum(1).float()
        equal = (scores[None, :] == scores[:, None]).sum(1).float() - 1  # not counting itself
        return (below + 0.5 * equal) / (scores.numel() - 1)
    ref = reference.float().reshape(-1).to(scores.device)
    below = (ref[None, :] < scores[:, None]).sum(1).float()
    equal = (ref[None, :] == scores[:, None]).sum(1).float()
    return (below + 0.5 * equal) / ref.numel()


def save_reference(scores, path):
    """Keep a reference set of scores (e.g. the base model's on held-out inputs) for percentile_rank."""
    save_file({"scores": scores.detach().float().cpu().reshape(-1).contiguous()}, path)


def load_reference(path):
    if not os.path.isfile(path):
        raise UserError(f"reference scores {path}: file not found")
    return load_file(path)["scores"]


# ----------------------------------------------------------------------------- reward weighting

WEIGHTINGS = ("none", "filter", "softmax", "percentile")


def reward_weights(scores, strategy, threshold=0.5, temperature=0.5, reference=None):
    """Per-sample loss weights from scores, averaging 1 over the batch (so the loss keeps its scale),
    or all zeros when nothing is kept:
        none:       1 for every sample
        filter:     kept = score >= threshold; weight B / (number kept) for kept samples, 0 otherwise
        softmax:    B * softmax(score / temperature)
        percentile: the mid-rank percentile (within the batch, or against `reference` scores), rescaled
    """
    s = scores.float().reshape(-1)
    n = s.numel()
    if strategy == "none":
        return torch.ones_like(s)
    if strategy == "filter":
        raw = (s >= threshold).float()
    elif strategy == "softmax":
        if temperature <= 0:
            raise ValueError(f"softmax weighting needs a positive temperature, got {temperature}")
        return torch.softmax(s / temperature, dim=0) * n
    elif strategy == "percentile":
        raw = percentile_rank(s, reference)
    else:
        raise ValueError(f"unknown weighting {strategy!r}: one of {WEIGHTINGS}")
    total = raw.sum()
    return raw * (n / total) if total > 0 else torch.zeros_like(s)


def weight_stats(weights):
    """Mean, max, effective sample size (sum w)^2 / sum w^2 (and as a fraction of the batch), and the
    fraction of samples with weight 0."""
    w = weights.float().reshape(-1)
    sq = (w ** 2).sum()
    ess = ((w.sum() ** 2) / sq).item() if sq > 0 else 0.0
    return {"weight_mean": w.mean().item(), "weight_max": w.max().item(), "weight_ess": ess,
            "weight_ess_fraction": ess / w.numel(), "filtered_fraction": (w == 0).float().mean().item()}


class ScoreMemory:
    """Scores per training sample (dataset index), refreshed at most every `every` steps; in between a
    sample's last score is reused. Checkpointed (state_dict), so a resumed run reuses what the
    interrupted one scored."""

    def __init__(self, every=1):
        self.every, self.scores, self.stamps = max(1, int(every)), {}, {}

    def state_dict(self):
        return {"scores": dict(self.scores), "stamps": dict(self.stamps)}

    def load_state_dict(self, state):
        self.scores, self.stamps = dict(state["scores"]), dict(state["stamps"])

    def stale(self, indices, step):
        """Bool mask of the samples that need a fresh score at this step."""
        return torch.tensor([int(i) not in self.stamps or step - self.stamps[int(i)] >= self.every for i in indices.tolist()])

    def update(self, indices, scores, step, mask):
        for i, s in zip(indices[mask].tolist(), scores.reshape(-1).tolist()):
            self.scores[int(i)], self.stamps[int(i)] = s, step

    def get(self, indices):
        return torch.tensor([self.scores[int(i)] for i in indices.tolist()])


# ----------------------------------------------------------------------------- rewards for online RL

REWARDS = ("discriminator", "preserve", "gt", "jpeg")


def parse_reward_spec(spec):
    """'discriminator=1,preserve=0.5' -> {"discriminator": 1.0, "preserve": 0.5}; a bare name has weight 1."""
    out = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, weight = part.partition("=")
        if name not in REWARDS:
            raise UserError(f"--reward: unknown reward {name!r} (one of {', '.join(REWARDS)})")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"--reward: weight of {name!r} is not a number: {weight!r}") from None
    if not out:
        raise UserError("--reward: give at least one name=weight")
    return out


def preservation_reward(result, source, mask):
    """-(mean squared difference to the source outside the mask), pixels in [-1, 1], mask 1 = hole:
    0 for a result that leaves everything outside the hole untouched."""
    keep = (mask < 0.5).float().expand_as(result)
    return -(((result.float() - source.float()) ** 2) * keep).sum((1, 2, 3)) / keep.sum((1, 2, 3)).clamp(min=1)


def gt_reward(result, gt, mask):
    """-(mean squared error against GT inside the mask): agreement with the true background."""
    hole = (mask >= 0.5).float().expand_as(result)
    return -(((result.float() - gt.float()) ** 2) * hole).sum((1, 2, 3)) / hole.sum((1, 2, 3)).clamp(min=1)


def jpeg_reward(result, quality=95):
    """-(JPEG size in kB) of each image: a cheap reward with a known answer (flat images compress)."""
    import io

    from .img_util import tensor_to_pil

    sizes = []
    for image in result:
        buf = io.BytesIO()
        tensor_to_pil(image).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return -torch.tensor(sizes)
