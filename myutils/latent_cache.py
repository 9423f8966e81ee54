"""--cache_latents: encode each sample's images once and keep the VAE posteriors on disk.

One safetensors file per sample holds both orientations (unflipped and flipped), so random flips
still work; crops must be central (a random crop would need a new encoding every epoch). A file is
named by a hash of its image paths, their sizes and modification times, the resolution and a
fingerprint of the VAE: changing any of them makes the sample encode again. Posteriors are stored in
fp16 (training sees them rounded to fp16, nothing else changes) and the mask as uint8: about 0.27 MB a
sample at 512 px, 27 GB per 100K samples (fp32: 0.56 MB); four times that at 1024 px. Each rank
encodes every world_size-th sample; file names are computed once, in threads, not per read.
"""
import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .data import entry_digests, to_device
from .sdxl_inpaint import batch_latent_params

STORAGE = "fp16-v1"  # part of every file's key: files of another storage format are not reused


def vae_fingerprint(vae):
    """Config plus a weight checksum: a different VAE never reuses another one's latents."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}  # not where it was loaded from
    h = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for p in vae.parameters():
            h.update(f"{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


class LatentCache:
    def __init__(self, dataset, keys, cache_dir, vae):
        if not dataset.center_crop:
            raise ValueError("latent caching needs central crops")
        self.dataset, self.keys, self.dir, self.vae = dataset, tuple(keys), cache_dir, vae
        self.vae_id = vae_fingerprint(vae)
        # the data check's per-entry digest of paths, sizes and mtimes, once for every entry (stat calls in threads)
        self.paths = [self._path(d) for d in entry_digests(dataset.entries)]

    def _path(self, entry_digest):
        key = json.dumps([entry_digest, self.dataset.resolution, self.keys, self.vae_id, STORAGE])
        return os.path.join(self.dir, hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def path(self, index):
        return self.paths[index]

    def build(self, accelerator, batch_size=8):
        """Encode the samples not cached yet; each process takes every world_size-th one."""
        os.makedirs(self.dir, exist_ok=True)
        todo = [i for i in range(accelerator.process_index, len(self.dataset), accelerator.num_processes)
                if not os.path.exists(self.path(i))]
        bar = tqdm(total=len(todo), desc="caching latents", disable=not accelerator.is_local_main_process)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            items = {flip: [self.dataset.load(i, flip=flip) for i in chunk] for flip in (False, True)}
            encoded = {}
            for flip, rows in items.items():
                batch = to_device({k: torch.stack([r[k] for r in rows]) for k in {"source", "mask", *self.keys} - {"masked"}},
                                  self.vae.device)
                suffix = ":flip" if flip else ""
                for name, value in batch_latent_params(self.vae, batch, self.keys).items():
                    encoded[name + suffix] = value.cpu().to(torch.uint8 if name == "mask_latent" else torch.float16)
                encoded["crop_top_left" + suffix] = torch.stack([r["crop_top_left"] for r in rows])
            for j, i in enumerate(chunk):
                tensors = {k: v[j].contiguous() for k, v in encoded.items()}
                tensors["original_size"] = items[False][j]["original_size"]
                tmp = self.path(i) + f".tmp{accelerator.process_index}"
                save_file(tensors, tmp)
                os.replace(tmp, self.path(i))  # atomic: a killed run leaves no half-written file
            bar.update(len(chunk))
        bar.close()
        accelerator.wait_for_everyone()


class CachedLatentDataset(Dataset):
    """Serves cached posteriors in place of pixels, with the same (epoch, index) keys and flips."""

    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        ds = self.cache.dataset
        data = load_file(self.cache.path(index))
        h, w = data["original_size"].tolist()
        suffix = ":flip" if ds.crop_for(epoch, index, (w, h))["flip"] else ""
        item = {"index": index, "epoch": epoch, "original_size": data["original_size"],
                "crop_top_left": data["crop_top_left" + suffix]}
        for name in [f"params:{k}" for k in self.cache.keys] + ["mask_latent"]:
            item[name] = data[name + suffix]  # fp16 (the mask uint8): to_device makes them fp32 on the device
        entry = ds.entries[index]
        if entry.score is not None:
            item["score"] = torch.tensor(entry.score, dtype=torch.float32)
        return item
