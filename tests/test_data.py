"""The data reader: three meta kinds, one shared crop/flip per sample, and every bad input named."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from myutils.data import EpochSampler, RemovalDataset, check_entries, read_meta
from myutils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _img(path, size=(32, 24), value=100, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)
    return path


def _mask(path, size=(32, 24), box=(4, 4, 12, 12)):
    m = Image.new("L", size, 0)
    m.paste(255, box)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    m.save(path)


def _meta(folder, entries, name="meta.json"):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


@pytest.fixture
def triplet_dir(tmp_path):
    _img(tmp_path / "src/a.png", value=50)
    _img(tmp_path / "gt/a.png", value=200)
    _mask(tmp_path / "mask/a.png")
    return tmp_path


def test_reads_three_kinds_and_relative_paths(triplet_dir):
    d = triplet_dir
    e = {"source": "src/a.png", "mask": "mask/a.png", "GT": "gt/a.png"}
    m1 = _meta(d, [e, e], "m1.json")
    m2 = _meta(d, dict(e, score=1), "m2.json")  # a single dict is one entry
    entries = read_meta([m1], "triplet") + read_meta(m2, "scored")
    assert len(entries) == 3 and entries[2].score == 1.0
    assert entries[0].paths["GT"] == os.path.join(str(d), "gt", "a.png")
    assert len(read_meta([m1, m2], "triplet")) == 3  # several files
    p = _meta(d, [{"source": "src/a.png", "mask": "mask/a.png", "preferred": "gt/a.png", "rejected": "src/a.png"}], "p.json")
    pair = read_meta(p, "pair")[0]
    assert set(pair.paths) == {"source", "mask", "preferred", "rejected"}
    assert check_entries(read_meta([m1, m2], "triplet") + [pair]) == []


def _problem(d, entry, kind="triplet"):
    good = {"source": "src/a.png", "mask": "mask/a.png", "GT": "gt/a.png", "score": 1}
    path = _meta(d, [good, entry], "bad.json")
    with pytest.raises(UserError) as e:
        check_entries(read_meta(path, kind))
    msg = str(e.value)
    assert msg.startswith(f"{path}: entry 1: ") and "\n" not in msg
    return msg


def test_every_bad_entry_is_named(triplet_dir):
    d = triplet_dir
    ok = {"source": "src/a.png", "mask": "mask/a.png", "GT": "gt/a.png"}
    assert "missing key 'GT'" in _problem(d, {"source": "src/a.png", "mask": "mask/a.png"})
    assert "'mask' file not found" in _problem(d, dict(ok, mask="mask/none.png"))
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    assert "'GT' file is not a readable image" in _problem(d, dict(ok, GT="broken.png"))
    _img(d / "gt/small.png", size=(16, 16))
    assert "'GT' is 16x16 but 'source' is 32x24" in _problem(d, dict(ok, GT="gt/small.png"))
    _img(d / "mask/empty.png", value=0, mode="L")
    assert "'mask' is empty" in _problem(d, dict(ok, mask="mask/empty.png"))
    assert "'score' must be a number in [0, 1]" in _problem(d, dict(ok, score=3), kind="scored")
    assert "expected an object" in _problem(d, "src/a.png")


def test_bad_meta_files(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(UserError, match=r"x.json: not valid JSON \(.* line 1"):
        read_meta(str(tmp_path / "x.json"), "triplet")
    with pytest.raises(UserError, match="meta file not found"):
        read_meta(str(tmp_path / "nope.json"), "triplet")
    (tmp_path / "n.json").write_text("3")
    with pytest.raises(UserError, match="expected a JSON list"):
        read_meta(str(tmp_path / "n.json"), "triplet")


def test_large_masks_warn_not_fail(triplet_dir):
    d = triplet_dir
    _img(d / "mask/full.png", value=255, mode="L")
    _mask(d / "mask/big.png", box=(0, 0, 32, 23))
    e = {"source": "src/a.png", "GT": "gt/a.png"}
    warnings = check_entries(read_meta(_meta(d, [dict(e, mask="mask/full.png"), dict(e, mask="mask/big.png")]), "triplet"))
    assert "entry 0: 'mask' covers the whole image" in warnings[0]
    assert "entry 1: 'mask' covers 96% of the image" in warnings[1]


def test_same_crop_and_flip_for_every_image(tmp_path):
    """Source and GT carry the same pattern and the mask marks its bright part: after random crop
    and flip they must still line up pixel for pixel."""
    rng = np.random.default_rng(0)
    arr = (rng.uniform(0, 1, (40, 56)) > 0.5).astype(np.uint8) * 255
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "s.png")
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "g.png")
    Image.fromarray(arr, mode="L").save(tmp_path / "m.png")
    meta = _meta(tmp_path, {"source": "s.png", "mask": "m.png", "GT": "g.png"})
    ds = RemovalDataset(read_meta(meta, "triplet"), "triplet", resolution=32, center_crop=False, random_flip=True, seed=1)
    flips, offsets = set(), set()
    for epoch in range(8):
        item = ds[(epoch, 0)]
        assert torch.equal(item["source"], item["GT"])
        assert item["original_size"].tolist() == [40, 56]
        inside = item["mask"][0] > 0.5
        assert (item["source"][0][inside] > 0).float().mean() > 0.9  # mask still over the bright pixels
        offsets.add(tuple(item["crop_top_left"].tolist()))
        flips.add(ds.crop_for(epoch, 0, (56, 40))["flip"])
    assert flips == {True, False} and len(offsets) > 1
    # a function of (seed, epoch, index) alone: a fresh dataset asked for epoch 3 first gives the same crop
    fresh = RemovalDataset(read_meta(meta, "triplet"), "triplet", resolution=32, center_crop=False, random_flip=True, seed=1)
    assert torch.equal(fresh[(3, 0)]["source"], ds[(3, 0)]["source"])
    other = RemovalDataset(read_meta(meta, "triplet"), "triplet", resolution=32, center_crop=False, random_flip=True, seed=2)
    assert [other.crop_for(e, 0, (56, 40)) for e in range(8)] != [ds.crop_for(e, 0, (56, 40)) for e in range(8)]


def test_sampler_shards_global_batches_and_skips():
    one = [i for _, i in EpochSampler(10, 4, seed=5)]
    r0 = [i for _, i in EpochSampler(10, 2, seed=5, rank=0, world_size=2)]
    r1 = [i for _, i in EpochSampler(10, 2, seed=5, rank=1, world_size=2)]
    assert len(one) == 8  # the incomplete tail is dropped
    assert sorted(r0[:2] + r1[:2]) == sorted(one[:4]) and sorted(r0[2:] + r1[2:]) == sorted(one[4:])
    s = EpochSampler(10, 4, seed=5)
    s.set_epoch(0, skip_batches=1)
    assert [i for _, i in s] == one[4:]
    s.set_epoch(1)
    assert [i for _, i in s] != one
    with pytest.raises(UserError, match="fewer than one global batch"):
        EpochSampler(3, 4)


def test_cli_bad_meta_is_one_line_without_traceback(tmp_path, tiny_model_dir):
    _img(tmp_path / "s.png")
    meta = _meta(tmp_path, [{"source": "s.png", "mask": "missing.png", "GT": "s.png"}])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_RORem.py"), "--pretrained_model_name_or_path",
                          tiny_model_dir, "--meta_path", meta, "--output_dir", str(tmp_path / "o"), "--report_to", "none"],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"error: {meta}: entry 0: 'mask' file not found" in out.stderr


def test_loader_defaults_keep_a_gpu_fed_and_the_cpu_free(monkeypatch):
    """Default workers: on a GPU min(8, cores per rank - 1), with pinned batches, persistent workers and
    prefetch; on the CPU none (the step uses every core). An explicit --dataloader_num_workers wins."""
    import argparse
    import types

    from training import prepare

    args = argparse.Namespace(dataloader_num_workers=None, dataloader_prefetch_factor=4, train_batch_size=2, seed=0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert prepare.loader_workers(args, "cuda") == 8 and prepare.loader_workers(args, "cpu") == 0  # 96 cores / 8 ranks - 1, capped at 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(24)))
    assert prepare.loader_workers(args, "cuda") == 2  # 24 / 8 - 1
    args.dataloader_num_workers = 5
    assert prepare.loader_workers(args, "cpu") == 5
    args.dataloader_num_workers = None
    gpu = types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cuda"), is_main_process=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    dataset = [{"source": torch.zeros(3, 64, 64, dtype=torch.uint8)}] * 8
    loader = prepare.make_dataloader(args, dataset, gpu)  # built, not iterated: no GPU needed
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor) == (8, True, True, 4)
    cpu = prepare.make_dataloader(args, dataset, types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu")))
    assert (cpu.num_workers, cpu.pin_memory, cpu.persistent_workers) == (0, False, False)


def test_batches_in_flight_fit_shared_and_pinned_memory(caplog):
    """Each loader process keeps `prefetch` batches in /dev/shm, then pinned in RAM: at most half the free
    /dev/shm and a quarter of the RAM, shared by the machine's ranks. Docker's default 64 MB /dev/shm with
    8 ranks leaves 4 MB a rank: two 1.5 MB batches (2 processes x 1), where 8 x 4 would die with a bus error."""
    import logging

    from training.prepare import fit_loader_memory

    mb, gb = 2 ** 20, 2 ** 30
    assert fit_loader_memory(8, 4, 2 * mb, shm_free=10 * gb, ram_free=100 * gb, ranks_here=8) == (8, 4)
    assert fit_loader_memory(8, 4, 1.5 * mb, shm_free=64 * mb, ram_free=100 * gb, ranks_here=8) == (2, 1)
    assert fit_loader_memory(8, 4, 20 * mb, shm_free=gb, ram_free=100 * gb, ranks_here=1) == (8, 3)  # 25 batches: 8 x 3
    assert fit_loader_memory(8, 4, 20 * mb, shm_free=100 * gb, ram_free=gb, ranks_here=1) == (8, 1)  # RAM: 12 batches
    assert fit_loader_memory(8, 4, 10 * mb, shm_free=64 * mb, ram_free=100 * gb, ranks_here=8) == (0, 4)  # not one: no workers
    with caplog.at_level(logging.INFO, logger="rorem"):
        fit_loader_memory(8, 4, 1.5 * mb, shm_free=64 * mb, ram_free=100 * gb, ranks_here=8)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["data: 2 loader processes x 1 batches ahead per rank (1.5 MB a batch, reduced from 8 x 4 to fit; "
                     "/dev/shm 64 MB free, RAM 102400 MB available, 8 rank(s) here)"]


def test_training_batches_travel_as_uint8_and_arrive_as_the_same_floats(tmp_path):
    """A training loader sends images and masks as uint8 (a quarter of float32 through /dev/shm and pinned
    memory); to_device turns them into exactly the floats the float path gives."""
    from myutils.data import RemovalDataset, read_meta, stack_samples, to_device
    from toy_world.data import write_toy_dataset

    entries = read_meta(write_toy_dataset(str(tmp_path / "toy"), num=4, resolution=32, seed=0), "triplet")
    small = RemovalDataset(entries, "triplet", 32, random_flip=True, uint8=True)
    full = RemovalDataset(entries, "triplet", 32, random_flip=True)
    keys = [(1, i) for i in range(4)]
    sent = stack_samples([small[k] for k in keys])
    assert {k: sent[k].dtype for k in ("source", "mask", "GT")} == dict.fromkeys(("source", "mask", "GT"), torch.uint8)
    got, want = to_device(sent, "cpu"), stack_samples([full[k] for k in keys])
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert sent["source"].nbytes * 4 == want["source"].nbytes


def test_a_passed_check_is_remembered_until_a_file_changes(triplet_dir, tmp_path, monkeypatch):
    """load_entries writes <output_dir>/data_check.json under a fingerprint of paths, sizes and mtimes:
    the same data is not checked again; a changed file is, and a bad one still stops the run."""
    import types

    from myutils import data
    from training import prepare

    d = triplet_dir
    e = {"source": "src/a.png", "mask": "mask/a.png", "GT": "gt/a.png"}
    meta = _meta(d, [e] * 5)
    acc = types.SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    scanned, real = [], data.scan_entries
    monkeypatch.setattr(prepare, "scan_entries", lambda entries, **k: scanned.append(len(entries)) or real(entries, **k))
    out = str(tmp_path / "out")
    os.makedirs(out)
    for _ in range(2):
        assert len(prepare.load_entries([meta], "triplet", acc, output_dir=out)) == 5
    assert scanned == [5]  # the second load trusted the first check
    from myutils.data import entry_digests, fingerprint

    ents = read_meta(meta, "triplet")  # ranks digest their shares: the key does not depend on how many there were
    two = sorted([(2 * k, x) for k, x in enumerate(entry_digests(ents[0::2]))] + [(2 * k + 1, x) for k, x in enumerate(entry_digests(ents[1::2]))])
    assert fingerprint("triplet", [x for _, x in two]) == fingerprint("triplet", entry_digests(ents))
    record = json.load(open(os.path.join(out, "data_check.json")))
    assert len(record) == 1 and next(iter(record.values()))["entries"] == 5
    os.utime(d / "gt/a.png", ns=(1, 1))  # same bytes, another mtime: checked again
    prepare.load_entries([meta], "triplet", acc, output_dir=out)
    assert scanned == [5, 5]
    (d / "gt/a.png").write_bytes(b"broken")
    with pytest.raises(UserError, match=r"entry 0: 'GT' file is not a readable image"):
        prepare.load_entries([meta], "triplet", acc, output_dir=out)
    assert len(json.load(open(os.path.join(out, "data_check.json")))) == 2  # the failed check is not recorded



def test_the_check_is_shared_out_and_every_rank_reports_every_problem(triplet_dir, monkeypatch):
    """Rank r of n checks entries r, r + n, ...; gathering gives every rank every problem in entry order.
    Here rank 1 of 2, with rank 0's share (entries 0, 2, 4) checked for real as the gather's other half."""
    import types

    import accelerate.utils

    from training import prepare

    d = triplet_dir
    e = {"source": "src/a.png", "mask": "mask/a.png", "GT": "gt/a.png"}
    meta = _meta(d, [e, e, dict(e, GT="gt/none.png"), e, e, dict(e, mask="mask/none.png")])
    shares = []
    real_scan = prepare.scan_entries
    monkeypatch.setattr(prepare, "scan_entries", lambda entries, **k: shares.append(len(entries)) or real_scan(entries, **k))

    def gather(mine):  # rank 0's part, as the collective would bring it: first the files' digests, then the check
        from myutils.data import entry_digests

        rank0 = read_meta(meta, "triplet")[0::2]
        if mine and len(mine[0]) == 2:
            return [(2 * k, d) for k, d in enumerate(entry_digests(rank0))] + mine
        return [(2 * k, p, w) for k, (p, w) in enumerate(real_scan(rank0)) if p or w] + mine

    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    with pytest.raises(UserError) as err:
        prepare.load_entries([meta], "triplet", types.SimpleNamespace(process_index=1, num_processes=2, is_main_process=False))
    assert shares == [3]  # rank 1 checked entries 1, 3, 5 only
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "entry 2: 'GT' file not found" in lines[0] and "entry 5: 'mask' file not found" in lines[1]


def test_a_samples_draws_follow_seed_epoch_and_index_only():
    """Every epoch redraws a sample's noise and timestep; the same (seed, epoch, index) draws the same,
    whatever batch it shares; a large --seed is taken (it used to overflow the generator's seed)."""
    from myutils.rng import sample_generators

    def draw(epoch, index, seed=0):
        return torch.randn(4, generator=sample_generators({"epoch": [epoch], "index": [index]}, seed)[0])

    assert torch.equal(draw(0, 3), draw(0, 3))
    assert not torch.equal(draw(0, 3), draw(1, 3))  # a new epoch, new noise
    assert not torch.equal(draw(0, 3), draw(0, 4)) and not torch.equal(draw(0, 3), draw(0, 3, seed=1))
    shared = sample_generators({"epoch": torch.tensor([1, 1]), "index": torch.tensor([7, 3])}, 0)
    assert torch.equal(torch.randn(4, generator=shared[1]), draw(1, 3))
    assert draw(5, 9, seed=2 ** 32 - 1).shape == (4,)
