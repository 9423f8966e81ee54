"""The one data reader: meta.json files of triplets, scored triplets or preference pairs.

A meta.json is a JSON list of entries (a single dict is accepted too); image paths are relative to
the folder of the meta file. Every entry is checked before training starts, and each problem is
reported on one line as `<meta file>: entry <i>: <problem>`.
"""
import hashlib
import json
import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .errors import UserError
from .img_util import apply_crop, binarize_mask, crop_params, load_image, load_mask, pil_to_tensor, pil_to_uint8, uint8_to_pixels

# kind -> (image keys, other required keys)
META_KINDS = {
    "input": (("source", "mask"), ()),  # what inference needs; other keys (e.g. GT) are kept in extra
    "triplet": (("source", "mask", "GT"), ()),
    "scored": (("source", "mask", "GT"), ("score",)),
    "pair": (("source", "mask", "preferred", "rejected"), ()),
}
MAX_PROBLEMS_SHOWN = 20


@dataclass
class Entry:
    meta: str  # the meta file this entry came from (for messages)
    index: int  # its position in that file
    paths: dict  # image key -> absolute path
    score: float = None
    extra: dict = field(default_factory=dict)  # any other keys, kept as they were

    def where(self):
        return f"{self.meta}: entry {self.index}"


def image_keys(kind):
    if kind not in META_KINDS:
        raise ValueError(f"unknown meta kind {kind!r}; one of {sorted(META_KINDS)}")
    return META_KINDS[kind][0]


def _load_json_list(meta_path):
    if not os.path.isfile(meta_path):
        raise UserError(f"{meta_path}: meta file not found")
    try:
        with open(meta_path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise UserError(f"{meta_path}: not a JSON text file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{meta_path}: expected a JSON list of entries, found {type(data).__name__}")
    if not data:
        raise UserError(f"{meta_path}: the list of entries is empty")
    return data


def read_meta(meta_paths, kind):
    """Read one or more meta.json files of the given kind into Entry objects (keys checked, files not yet)."""
    img_keys, other_keys = META_KINDS[kind]
    if isinstance(meta_paths, (str, os.PathLike)):
        meta_paths = [meta_paths]
    entries, problems = [], []
    for meta_path in meta_paths:
        meta_path = str(meta_path)
        if os.path.isdir(meta_path):  # a folder stands for the meta.json in it
            if not os.path.isfile(os.path.join(meta_path, "meta.json")):
                raise UserError(f"{meta_path}: a folder without meta.json (give the meta file itself)")
            meta_path = os.path.join(meta_path, "meta.json")
        root = os.path.dirname(os.path.abspath(meta_path))
        for i, raw in enumerate(_load_json_list(meta_path)):
            where = f"{meta_path}: entry {i}"
            if not isinstance(raw, dict):
                problems.append(f"{where}: expected an object with keys {list(img_keys + other_keys)}, found {type(raw).__name__}")
                continue
            missing = [k for k in img_keys + other_keys if k not in raw]
            if missing:
                problems.append(f"{where}: missing key {', '.join(repr(k) for k in missing)}")
                continue
            bad = [k for k in img_keys if not isinstance(raw[k], str) or not raw[k]]
            if bad:
                problems.append(f"{where}: {bad[0]!r} must be a file path, found {raw[bad[0]]!r}")
                continue
            score = None
            if "score" in other_keys:
                score = raw["score"]
                if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1 or math.isnan(score):
                    problems.append(f"{where}: 'score' must be a number in [0, 1], found {score!r}")
                    continue
                score = float(score)
            paths = {k: os.path.normpath(os.path.join(root, os.path.expanduser(raw[k]))) for k in img_keys}
            extra = {k: v for k, v in raw.items() if k not in img_keys and k not in other_keys}
            entries.append(Entry(meta_path, i, paths, score, extra))
    raise_problems(problems)
    return entries


def raise_problems(problems):
    """One UserError listing the first MAX_PROBLEMS_SHOWN problems (and how many more), if any."""
    if not problems:
        return
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more problems")
    raise UserError("\n".join(shown))


def _same_bytes(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def _ends_like_a_jpeg(path):
    """A JPEG ends with the EOI marker (some cameras append a little data after it)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        return b"\xff\xd9" in f.read()


def _check_entry(entry):
    """Return (problem or None, warning or None) for one entry: files exist, open, agree in size, mask not empty."""
    sizes = {}
    for key, path in entry.paths.items():
        if not os.path.isfile(path):
            return f"{entry.where()}: {key!r} file not found: {path}", None
        try:
            with Image.open(path) as img:
                img.verify()  # detects non-image files and broken PNGs without decoding all pixels
            with Image.open(path) as img:
                sizes[key] = img.size
                if img.format == "JPEG" and not _ends_like_a_jpeg(path):
                    img.load()  # no end marker near the end: decode it to be sure (verify passes truncated JPEGs)
        except Exception as e:
            return f"{entry.where()}: {key!r} file is not a readable image: {path} ({e.__class__.__name__}: {e})", None
    if "preferred" in entry.paths and (entry.paths["preferred"] == entry.paths["rejected"]
                                       or _same_bytes(entry.paths["preferred"], entry.paths["rejected"])):
        return f"{entry.where()}: 'preferred' and 'rejected' are the same image: {entry.paths['preferred']}", None
    ref = sizes["source"]
    for key, size in sizes.items():
        if size != ref:
            return (f"{entry.where()}: {key!r} is {size[0]}x{size[1]} but 'source' is {ref[0]}x{ref[1]} "
                    f"(all images of an entry must have the same size): {entry.paths[key]}"), None
    try:
        frac = float(binarize_mask(load_mask(entry.paths["mask"])).mean())
    except Exception as e:
        return f"{entry.where()}: 'mask' file cannot be decoded: {entry.paths['mask']} ({e.__class__.__name__})", None
    if frac == 0.0:
        return f"{entry.where()}: 'mask' is empty (no pixel >= 0.5): {entry.paths['mask']}", None
    if frac == 1.0:
        return None, f"{entry.where()}: 'mask' covers the whole image: {entry.paths['mask']}"
    if frac > 0.9:
        return None, f"{entry.where()}: 'mask' covers {frac:.0%} of the image: {entry.paths['mask']}"
    return None, None


def entry_digests(entries, num_workers=16):
    """A short digest per entry of its image paths, sizes and modification times (stat calls only,
    in threads): what a data check saw of it (and what names a latent-cache file). A missing file
    digests as missing."""
    def digest(entry):
        h = hashlib.sha256()
        for path in entry.paths.values():
            try:
                st = os.stat(path)
                h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{path}\tmissing\n".encode())
        return h.hexdigest()[:32]

    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(pool.map(digest, entries, chunksize=256))


def fingerprint(kind, digests):
    """One key for a data set from its entries' digests in entry order (so the same however many
    ranks computed them): another file, size or mtime anywhere gives another key."""
    h = hashlib.sha256(kind.encode())
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()


def check_scores_agree(entries, what="--meta_path"):
    """One input and result scored both good (>= 0.5) and bad teach nothing: a warning naming how many
    and the first, and an error when that is every entry (a merge of two annotators' files gone wrong)."""
    seen = {}
    for e in entries:
        seen.setdefault(tuple(sorted(e.paths.items())), []).append(e)
    torn = [group for group in seen.values() if len({s.score >= 0.5 for s in group}) == 2]
    if not torn:
        return
    count = sum(len(g) for g in torn)
    first = f"{torn[0][0].where()} and {torn[0][1].where().rsplit(': ', 1)[-1]} ({torn[0][0].paths['GT']})"
    if count == len(entries):
        raise UserError(f"{what}: every result is scored both good and bad (e.g. {first}); nothing to learn from")
    logging.getLogger("rorem").warning("%s: %d of %d entries score the same result both good and bad (e.g. %s)", what, count, len(entries), first)



def scan_entries(entries, num_workers=8, progress=False):
    """[(problem or None, warning or None)] for each entry, in order, checked in threads."""
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = pool.map(_check_entry, entries)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(entries), desc="checking data")
        return list(results)


def check_entries(entries, num_workers=8, progress=False):
    """Check every entry's files; raise UserError listing the problems; return the list of warnings."""
    results = scan_entries(entries, num_workers, progress)
    raise_problems([p for p, _ in results if p])
    return [w for _, w in results if w]


class RemovalDataset(Dataset):
    """Loads the images of each entry with ONE crop/flip shared by all of them.

    Indexed by (epoch, index) so augmentation is a function of (seed, epoch, index): a resumed run
    sees exactly the crops and flips the uninterrupted run would have seen. A plain int means epoch 0.
    Returns pixel tensors in [-1, 1] under the entry's image keys, `mask` as (1, H, W) in {0, 1},
    `original_size` (h, w), `crop_top_left` (top, left), `index`, and `score` for scored data.
    uint8=True (training loaders): images and mask as uint8, a quarter of the bytes through shared and
    pinned memory; to_device makes them the same float32 values on the device.
    """

    def __init__(self, entries, kind, resolution, center_crop=True, random_flip=False, seed=0, uint8=False):
        self.entries, self.keys = entries, image_keys(kind)
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.uint8 = uint8

    def __len__(self):
        return len(self.entries)

    def crop_for(self, epoch, index, size, flip=None):
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        return crop_params(size, self.resolution, self.center_crop, self.random_flip, rng, flip)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.load(index, epoch)

    def load(self, index, epoch=0, flip=None):
        """One sample with the crop of (epoch, index); `flip` overrides the coin (latent cache)."""
        entry = self.entries[index]
        try:
            images = {k: (load_mask(p) if k == "mask" else load_image(p)) for k, p in entry.paths.items()}
        except UserError as e:  # a file broken after the data check, or a truncation it could not see
            raise UserError(f"{entry.where()}: {e}") from None
        item = {"index": index, "epoch": epoch,
                **crop_sample(images, self.crop_for(epoch, index, images["source"].size, flip), self.uint8)}
        if entry.score is not None:
            item["score"] = torch.tensor(entry.score, dtype=torch.float32)
        return item


def crop_sample(images, params, uint8=False):
    """One sample from PIL images (key -> image, "mask" a mask), all cropped as `params` (crop_params)
    says: images as tensors in [-1, 1] (uint8: as they are), the mask binarised, and SDXL's size
    conditioning."""
    item = {"original_size": torch.tensor(params["original_size"]), "crop_top_left": torch.tensor(params["crop_top_left"])}
    for k, img in images.items():
        out = apply_crop(img, params, is_mask=(k == "mask"))
        if k == "mask":
            item[k] = binarize_mask(out, torch.uint8 if uint8 else torch.float32)
        else:
            item[k] = pil_to_uint8(out) if uint8 else pil_to_tensor(out)
    return item


BOOKKEEPING_KEYS = ("index", "epoch", "noise_index")


def stack_samples(samples, keys=None):
    """Dataset items (dicts) -> one batch dict, the given keys (default: all of the first item's)."""
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in (keys or samples[0])}


def to_device(batch, device):
    """A batch's tensors on `device`, except its bookkeeping (sample index, epoch), which stays on the
    CPU: it seeds the per-sample generators and looks up entries, never meets a model, and reading it
    back from a GPU would synchronise once per sample. Copies are non-blocking (a loader's batches
    are pinned: a blocking copy would wait for the GPU each time). What travels small becomes float32
    on the device: uint8 images -> [-1, 1], uint8 masks -> {0, 1}, fp16 cached latents -> fp32."""
    return {k: on_device(k, v, device) if torch.is_tensor(v) and k not in BOOKKEEPING_KEYS else v for k, v in batch.items()}


def on_device(key, value, device):
    value = value.to(device, non_blocking=True)
    if value.dtype == torch.uint8:
        return value.float() if key.startswith("mask") else uint8_to_pixels(value)
    if value.dtype == torch.float16 and key.startswith("params:"):
        return value.float()
    return value


class EpochSampler(Sampler):
    """Shuffled (seed, epoch) order, sharded so the ranks together see exactly one global batch per step.

    Global batch k is perm[k*G:(k+1)*G] with G = batch_size * world_size; rank r takes its r-th slice,
    so 2 ranks x batch B see the same samples as 1 rank x batch 2B. The incomplete tail is dropped.
    `set_epoch(e, skip_batches)` starts mid-epoch, which is how a resumed run continues its data.
    Yields (epoch, index) keys for RemovalDataset.
    """

    def __init__(self, num_samples, batch_size, seed=0, rank=0, world_size=1, shuffle=True):
        self.n, self.bs, self.seed, self.rank, self.world, self.shuffle = num_samples, batch_size, seed, rank, world_size, shuffle
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UserError(f"the data has {num_samples} samples, fewer than one global batch "
                            f"({batch_size} per process x {world_size} processes)")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self):
        return (self.batches_per_epoch - self.skip) * self.bs

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            perm = torch.randperm(self.n, generator=g, device=g.device).tolist()
        else:
            perm = list(range(self.n))
        G = self.bs * self.world
        for k in range(self.skip, self.batches_per_epoch):
            start = k * G + self.rank * self.bs
            for i in perm[start:start + self.bs]:
                yield (self.epoch, i)

