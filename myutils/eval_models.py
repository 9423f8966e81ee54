"""The pretrained networks behind the evaluation metrics (FID's Inception, LPIPS, CLIP): from a local
weights file when one is given, else (fetch=True) each library's own standard weights, which it
downloads and caches itself (pytorch-fid's FID Inception and torchvision's AlexNet through torch.hub,
open_clip's LAION weights through the Hugging Face hub). Offline, a fetch raises WeightsUnavailable
with the reason and the metric is reported unavailable; without a file and without fetching a loader
returns None. Random-weight stand-ins (for tests) are built only when asked for and are marked as such
in every output."""
import contextlib
import os
import tempfile

import torch
import torch.nn.functional as F

from .errors import UserError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID Inception weights
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, LPIPS's backbone


class WeightsUnavailable(Exception):
    """A library's standard weights could not be fetched (no network, a proxy, a broken download)."""


def _fetch(what, build):
    """build() with the library downloading its weights; any failure of the download becomes
    WeightsUnavailable (the run goes on without that metric; the report says why)."""
    try:
        return build()
    except Exception as e:  # the libraries raise URLError, OSError, RuntimeError, hub errors...: all mean "not here"
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise WeightsUnavailable(f"could not fetch {what} ({e.__class__.__name__}: {first})") from None


def clip_pretrained_tag(model_name):
    """open_clip's standard weights for a model: its LAION-2B release (laion2b_s..., e.g. ViT-B-32's
    laion2b_s34b_b79k, the one open_clip's README recommends), else its first tag."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if not tags:
        raise WeightsUnavailable(f"open_clip has no pretrained weights for {model_name}")
    return next((t for t in tags if t.startswith("laion2b_s")), tags[0])


@contextlib.contextmanager
def hub_checkpoint(path, filename):
    """Make torch.hub find `path` as the cached download `filename`, so a library that would download
    its weights (pytorch-fid, torchvision via lpips) loads the local file instead."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: weights file not found")
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "checkpoints"))
        os.symlink(os.path.abspath(path), os.path.join(tmp, "checkpoints", filename))
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


def load_inception(weights=None, random_stand_in=False, dims=2048, device="cpu", fetch=False):
    """pytorch-fid's InceptionV3 (features of `dims`: 2048 = the standard FID pool features; 64, 192
    or 768 = earlier blocks, cheaper) from --inception_weights, or fetched, on `device`."""
    import pytorch_fid.inception as pi

    if weights:
        with hub_checkpoint(weights, INCEPTION_FILE):
            return pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval().to(device)
    if fetch:
        return _fetch("pytorch-fid's FID Inception weights",
                      lambda: pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval().to(device))
    if not random_stand_in:
        return None
    state = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    real = pi.load_state_dict_from_url
    pi.load_state_dict_from_url = lambda *a, **k: state  # the FID architecture with random weights
    try:
        return pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval().to(device)
    finally:
        pi.load_state_dict_from_url = real


@torch.no_grad()
def inception_features(model, images):
    """(N, dims) features of images (N, 3, H, W) in [0, 1] (the model resizes to 299 itself; earlier
    blocks are average-pooled to one vector per image, as pytorch-fid does)."""
    f = model(images.float().to(next(model.parameters()).device))[0]
    if f.shape[-1] != 1 or f.shape[-2] != 1:
        f = torch.nn.functional.adaptive_avg_pool2d(f, (1, 1))
    return f.flatten(1).cpu().numpy()


def load_lpips(backbone_weights=None, random_stand_in=False, device="cpu", fetch=False):
    """LPIPS (AlexNet, spatial maps; its linear heads ship with the lpips package) with the AlexNet
    backbone from --lpips_backbone_weights, or torchvision's own fetched, on `device`."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of `pretrained=`
        if backbone_weights:
            with hub_checkpoint(backbone_weights, ALEXNET_FILE):
                return lpips.LPIPS(net="alex", spatial=True, verbose=False).eval().to(device)
        if fetch:
            return _fetch("torchvision's AlexNet weights (LPIPS)",
                          lambda: lpips.LPIPS(net="alex", spatial=True, verbose=False).eval().to(device))
        if random_stand_in:
            return lpips.LPIPS(net="alex", spatial=True, pnet_rand=True, verbose=False).eval().to(device)
    return None


@torch.no_grad()
def lpips_maps(model, a, b, min_size=64):
    """Per-pixel LPIPS distance maps (N, 1, H, W, on the CPU) between images in [0, 1]; small images
    are upsampled to min_size first (AlexNet's strides need room) and the maps brought back."""
    device = next(model.parameters()).device
    a, b, size = a.to(device), b.to(device), a.shape[-2:]
    if min(size) < min_size:
        scale = min_size / min(size)
        a, b = (F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) for x in (a, b))
    maps = model(a * 2 - 1, b * 2 - 1)
    return (F.interpolate(maps, size=size, mode="bilinear", align_corners=False) if maps.shape[-2:] != size else maps).cpu()


def load_clip(model_name="ViT-B-32", weights=None, random_stand_in=False, device="cpu", fetch=False):
    """(model, preprocess) of open_clip from a local --clip_weights file, or its standard weights
    fetched (clip_pretrained_tag), on `device`."""
    import open_clip

    if not weights and fetch:
        def build():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=clip_pretrained_tag(model_name))
            return model.eval().to(device), preprocess
        return _fetch(f"open_clip's {model_name} weights", build)
    if not weights and not random_stand_in:
        return None
    if weights and not os.path.isfile(weights):
        raise UserError(f"--clip_weights {weights}: file not found")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights or None)
    return model.eval().to(device), preprocess


@torch.no_grad()
def clip_similarity(clip, results, targets, batch_size=16):
    """Cosine similarity of the CLIP image embeddings of PIL results and targets, per pair, batch_size
    pairs at a time on the model's device."""
    model, preprocess = clip
    device = next(model.parameters()).device

    def embed(images):
        e = model.encode_image(torch.stack([preprocess(im) for im in images]).to(device))
        return e / e.norm(dim=-1, keepdim=True)

    return [s for i in range(0, len(results), batch_size)
            for s in (embed(results[i:i + batch_size]) * embed(targets[i:i + batch_size])).sum(-1).tolist()]
