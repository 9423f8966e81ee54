"""evaluate_RORem.py and the metrics behind it: each metric against a hand-computed case, a run on a
tiny test set writing the table, CSV, JSON, win rates and grids, resuming, results folders,
unavailable metrics named with their argument, and input errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_RORem as ev
from myutils import eval_models as em
from myutils.errors import UserError
from myutils.metrics import frechet_distance, masked_means, masked_mse, masked_psnr, roc_auc, win_rate


def test_frechet_distance_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)  # identical feature sets
    # exactly, by symmetric eigendecompositions (no sqrtm): Tr sqrt(S_a S_b) = Tr sqrt(S_a^1/2 S_b S_a^1/2)
    b = a @ np.array([[1.0, 0.3, 0.0], [0.0, 2.0, 0.0], [0.5, 0.0, 1.0]]) + np.array([3.0, 0.0, -1.0])
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ s_b @ root_a)).sum()
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    # independent dims: |mu_a - mu_b|^2 + sum (s_a - s_b)^2 for the standard deviations
    c = a[:, :1] * 2.0 + 3.0
    assert frechet_distance(a[:, :1], c) == pytest.approx((a[:, 0].mean() + 3) ** 2 + a[:, 0].std(ddof=1) ** 2, rel=1e-9)  # s_c = 2 s_a
    from pytorch_fid.fid_score import calculate_frechet_distance
    try:  # the same computation as pytorch-fid's, where its call to scipy still works (scipy < 1.18)
        ref = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    except TypeError:
        ref = None
    assert ref is None or frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)


def test_masked_psnr_and_means_by_hand():
    gt = Image.new("RGB", (8, 8), (100, 100, 100))
    result = Image.new("RGB", (8, 8), (100, 100, 100))
    result.paste((125, 125, 125), (0, 0, 4, 8))  # off by 25/255 in the left half
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    assert masked_psnr(result, gt, mask) == pytest.approx(10 * np.log10(1 / (25 / 255) ** 2), rel=1e-6)
    assert masked_psnr(gt, gt, mask) == float("inf")
    values = torch.arange(4.0).view(1, 1, 2, 2)
    m = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])  # the top row is the hole
    inside, outside = masked_means(values, m)
    assert inside.item() == pytest.approx(0.5) and outside.item() == pytest.approx(2.5)


def test_masked_mse_counts_the_hole_only():
    gt = Image.new("RGB", (8, 8), (100, 100, 100))
    result = Image.new("RGB", (8, 8), (0, 0, 0))  # far off outside the hole
    result.paste((125, 125, 125), (0, 0, 4, 8))  # off by 25/255 inside it: 50/255 in [-1, 1] units
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    assert masked_mse(result, gt, mask) == pytest.approx((50 / 255) ** 2, rel=1e-9)


def test_win_rate_interval_and_auc_by_hand():
    # Wilson score intervals as tabulated (z = 1.96): 5 of 10 -> [0.2366, 0.7634]; 10 of 10 -> [0.7225, 1]
    p, (low, high) = win_rate([1] * 5 + [0] * 5, [0.5] * 10)
    assert p == 0.5 and (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    p, (low, high) = win_rate([1] * 10, [0] * 10)
    assert p == 1.0 and (low, high) == pytest.approx((0.7225, 1.0), abs=1e-4)
    # AUC with a tie: positives 0.5, 1 against negatives 0.5, 0 win 3 of 4 pairs and tie 1 -> 3.5 / 4
    assert roc_auc([0.5, 1.0, 0.5, 0.0], [1, 1, 0, 0]) == 0.875


def test_lpips_of_identical_images_is_zero_and_win_rate_of_identical_systems_is_half():
    net = em.load_lpips(random_stand_in=True)
    x = torch.rand(2, 3, 32, 32)
    assert em.lpips_maps(net, x, x).abs().max().item() == 0.0
    assert em.lpips_maps(net, x, torch.rand(2, 3, 32, 32)).mean().item() > 0
    assert win_rate([0.3, 0.7, 0.5], [0.3, 0.7, 0.5])[0] == 0.5


def test_missing_weights_are_reported_not_faked(tmp_path):
    assert em.load_inception() is None and em.load_lpips() is None and em.load_clip() is None
    with pytest.raises(UserError, match="weights file not found"):
        em.load_inception(str(tmp_path / "missing.pth"))


def _args(meta, out, *extra):
    return ["--meta_path", meta, "--output_dir", out, "--resolution", "32", "--inference_steps", "3", "--strength", "1.0",
            "--batch_size", "4", "--limit", "6", "--num_grid_inputs", "6", *extra]


def test_evaluation_writes_table_csv_json_grids_and_resumes(tmp_path, tiny_model_dir, toy_meta, disc_dir):
    out = str(tmp_path / "eval")
    # a results folder in inference_RORem.py's layout: here the GT itself, so its masked MSE is 0
    from myutils.data import read_meta

    entries = read_meta(toy_meta, "triplet")[:6]
    os.makedirs(tmp_path / "gt_results")
    with open(tmp_path / "gt_results" / "meta.json", "w") as f:
        json.dump([{"source": e.paths["source"], "mask": e.paths["mask"], "GT": e.paths["GT"]} for e in entries], f)
    argv = _args(toy_meta, out, "--pretrained_model", tiny_model_dir, "--system", "base=base", "--system",
                 f"oracle=results:{tmp_path / 'gt_results'}", "--system", "base again=base,steps=3", "--discriminator_path", disc_dir,
                 "--stand_in_weights", "--fid_dims", "64", "--clip_model", "ViT-S-32")  # small stand-ins: FID's 2048-d sqrtm is slow
    summary = ev.main(argv)
    rows = {r["system"]: r for r in summary["systems"]}
    assert rows["oracle"]["masked_mse"] == 0.0 and rows["oracle"]["masked_psnr"] == 100.0
    assert rows["oracle"]["lpips_in_mask"] == 0.0 and rows["oracle"]["fid"] == pytest.approx(0.0, abs=1e-3)
    assert rows["oracle"]["clip_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert rows["base"]["masked_mse"] > 0 and rows["base"]["unet_calls_per_image"] == 3 and rows["base"]["seconds_per_image"] > 0
    assert rows["base"]["masked_mse"] == rows["base again"]["masked_mse"]  # same seeds, same results
    same = [w for w in summary["win_rates"] if {w["a"], w["b"]} == {"base", "base again"}][0]
    assert same["win_rate"] == 0.5
    assert sorted(summary["stand_ins"]) == ["clip", "fid", "lpips"]
    for name in ("results.md", "results.csv", "results.json", "win_rates.md", "index.html", "grids/grid_00.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    table = open(os.path.join(out, "results.md")).read()
    assert "(random stand-in)" in table and "Those numbers mean nothing" in table
    assert len([f for f in os.listdir(os.path.join(out, "results", "base")) if f.endswith(".png")]) == 6
    # a rerun reuses every result (nothing generated, so no speed figures) and gives the same metrics
    again = {r["system"]: r for r in ev.main(argv)["systems"]}
    assert again["base"]["masked_mse"] == rows["base"]["masked_mse"] and "seconds_per_image" not in again["base"]
    # the same system name with other settings does not get the old images under the new settings' label
    other = [a.replace("base=base", "base=base,steps=2") if a == "base=base" else a for a in argv]
    with pytest.raises(UserError, match=r"the results of --system base there were made by other settings .*00000.png"):
        ev.main(other)
    with pytest.raises(UserError, match=r"--system x: steps='0': must be at least 1"):
        ev.parse_system("x=base,steps=0", ev.parse_args(_args(toy_meta, out, "--system", "b=base")))


def test_unet_lora_and_lcm_systems_with_their_options(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    """unet:DIR runs that UNet (here the pipeline's own: the base's results exactly); lora:DIR and
    lcm:DIR put a trained LoRA on --base_unet (results differ from the base); lcm runs 4 LCMScheduler
    steps at strength 1 unless told; steps= and scheduler= change the UNet calls per image."""
    import train_RORem
    import train_RORem_lcm

    lora, remover = str(tmp_path / "lcm_lora"), str(tmp_path / "remover_lora")  # a 4-step student, a remover's LoRA
    common = ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--resolution", "32", "--train_batch_size", "2",
              "--report_to", "none", "--max_train_steps", "2", "--learning_rate", "5e-2", "--lora_rank", "4", "--validation_steps", "0"]
    run_script(train_RORem_lcm, common + ["--output_dir", lora])
    run_script(train_RORem, common + ["--output_dir", remover, "--use_lora"])
    import pipelines.inpaint

    schedulers, real_load = [], pipelines.inpaint.load_remover
    monkeypatch.setattr(pipelines.inpaint, "load_remover", lambda spec, *a: (lambda r: schedulers.append(type(r[0].scheduler).__name__)
                                                                                      or r)(real_load(spec, *a)))
    unet = os.path.join(tiny_model_dir, "unet")
    out = str(tmp_path / "eval")
    summary = ev.main(_args(toy_meta, out, "--pretrained_model", tiny_model_dir, "--base_unet", unet, "--inference_steps", "5",
                            "--system", "base=base", "--system", f"same unet=unet:{unet}", "--system", f"lora=lora:{remover}",
                            "--system", f"student=lcm:{lora}", "--system", f"student2=lcm:{lora},steps=2",
                            "--system", "base lcm=base,scheduler=lcm,steps=3,strength=1"))
    rows = {r["system"]: r for r in summary["systems"]}
    assert rows["same unet"]["masked_mse"] == rows["base"]["masked_mse"]
    assert rows["lora"]["masked_mse"] != rows["base"]["masked_mse"] and rows["student"]["masked_mse"] != rows["base"]["masked_mse"]
    # UNet calls per image: --inference_steps 5 (at --strength 1), lcm's own 4, then what the options say
    assert [rows[n]["unet_calls_per_image"] for n in ("base", "same unet", "lora", "student", "student2", "base lcm")] == [5, 5, 5, 4, 2, 3]
    assert schedulers[3:] == ["LCMScheduler"] * 3 and "LCMScheduler" not in schedulers[:3]
    for name in ("base", "lora", "student"):
        first = np.asarray(Image.open(os.path.join(out, "results", name, "00000.png")), np.float32)
        assert first.shape == (32, 32, 3)
    a, b = (np.asarray(Image.open(os.path.join(out, "results", n, "00000.png")), np.float32) for n in ("base", "lora"))
    assert np.abs(a - b).max() > 0  # the LoRA changes what the remover produces


def test_metric_weights_load_from_files(tmp_path, toy_meta):
    """--inception_weights, --lpips_backbone_weights and --clip_weights: weight files written by each
    library's own model class (seeded random values, as no download is possible here) are the weights
    the metric networks then hold, and an evaluation with them reports real (not stand-in) metrics."""
    import open_clip
    import pytorch_fid.inception as pi
    import torchvision

    from myutils.data import read_meta

    torch.manual_seed(0)
    files = {"inception": tmp_path / "inception.pth", "alexnet": tmp_path / "alexnet.pth", "clip": tmp_path / "clip.bin"}
    torch.save(pi._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict(), files["inception"])
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), files["alexnet"])
    torch.save(open_clip.create_model("ViT-S-32").state_dict(), files["clip"])

    inception = em.load_inception(str(files["inception"]), dims=64)
    want = torch.load(files["inception"])["Conv2d_1a_3x3.conv.weight"]
    assert torch.equal(inception.blocks[0][0].conv.weight, want)
    lp = em.load_lpips(str(files["alexnet"]))
    assert torch.equal(lp.net.slice1[0].weight, torch.load(files["alexnet"])["features.0.weight"])
    clip, _ = em.load_clip("ViT-S-32", str(files["clip"]))
    assert torch.equal(clip.visual.conv1.weight, torch.load(files["clip"])["visual.conv1.weight"])

    entries = read_meta(toy_meta, "triplet")[:6]
    for name, key in (("oracle", "GT"), ("unchanged", "source")):  # the GT itself; the input left as it was
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "meta.json", "w") as f:
            json.dump([{"source": e.paths["source"], "mask": e.paths["mask"], "GT": e.paths[key]} for e in entries], f)
    summary = ev.main(_args(toy_meta, str(tmp_path / "eval"), "--system", f"oracle=results:{tmp_path / 'oracle'}",
                            "--system", f"unchanged=results:{tmp_path / 'unchanged'}",
                            "--inception_weights", str(files["inception"]), "--fid_dims", "64",
                            "--lpips_backbone_weights", str(files["alexnet"]), "--clip_weights", str(files["clip"]),
                            "--clip_model", "ViT-S-32"))
    rows = {r["system"]: r for r in summary["systems"]}
    assert summary["stand_ins"] == []
    oracle, unchanged = rows["oracle"], rows["unchanged"]
    assert oracle["fid"] == pytest.approx(0.0, abs=1e-6) and oracle["lpips_in_mask"] == 0.0
    assert oracle["clip_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert unchanged["fid"] > 1e3 * abs(oracle["fid"]) and unchanged["lpips_in_mask"] > 0 and unchanged["clip_similarity"] < 1.0
    assert "random stand-in" not in open(tmp_path / "eval" / "results.md").read()


def test_unavailable_metrics_name_their_argument(tmp_path, toy_meta):
    from myutils.data import read_meta

    entries = read_meta(toy_meta, "triplet")[:3]
    folder = tmp_path / "res"
    os.makedirs(folder)
    for i, e in enumerate(entries):
        Image.open(e.paths["GT"]).save(folder / f"{i:05d}.png")
    out = str(tmp_path / "eval")
    summary = ev.main(["--meta_path", toy_meta, "--output_dir", out, "--limit", "3", "--resolution", "32", "--system",
                       f"mine=results:{folder}"])
    assert summary["systems"][0]["masked_mse"] == 0.0 and "fid" not in summary["systems"][0]
    table = open(os.path.join(out, "results.md")).read()
    for flag in ("--inception_weights", "--lpips_backbone_weights", "--clip_weights", "--discriminator_path"):
        assert f"unavailable ({flag})" in table
    assert json.load(open(os.path.join(out, "results.json")))["unavailable"]["fid"] == "--inception_weights"


def test_input_errors(tmp_path, toy_meta, run_script):
    base = ["--meta_path", toy_meta, "--output_dir", str(tmp_path)]
    for extra, message in [(["--system", "x"], "expected NAME=KIND:PATH"),
                           (["--system", "x=lora:"], "lora needs a path"),
                           (["--system", f"x=unet:{tmp_path / 'nope'}"], "not found"),
                           (["--system", "x=base,speed=2"], "unknown option 'speed'"),
                           (["--system", "x=base", "--system", "x=base"], "names must differ"),
                           (["--system", "x=base", "--inception_weights", str(tmp_path / "w.pth")], "--inception_weights .*file not found")]:
        with pytest.raises(UserError, match=message):
            ev.parse_args(base + extra)
    empty = tmp_path / "empty"
    os.makedirs(empty)
    with pytest.raises(UserError, match="no result for entry 0"):
        ev.main(base + ["--system", f"x=results:{empty}", "--limit", "2", "--resolution", "32"])


def test_cli_missing_weights_is_one_line_without_traceback(tmp_path, toy_meta):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "evaluate_RORem.py"), "--meta_path", toy_meta, "--output_dir",
                          str(tmp_path / "o"), "--system", "x=base", "--lpips_backbone_weights", str(tmp_path / "alexnet.pth")],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--lpips_backbone_weights {tmp_path / 'alexnet.pth'}: file not found" in out.stderr


def test_metric_networks_go_to_the_evaluation_device_and_take_chunks():
    """The loaders put each network on the device asked for (the meta device stands in for a GPU:
    nothing of it may stay on the CPU); CLIP similarity in chunks equals one batch, pair by pair."""
    nets = [em.load_lpips(random_stand_in=True, device="meta"), em.load_inception(random_stand_in=True, dims=64, device="meta"),
            em.load_clip("ViT-S-32", random_stand_in=True, device="meta")[0]]
    assert all({p.device.type for p in n.parameters()} == {"meta"} for n in nets)
    clip = em.load_clip("ViT-S-32", random_stand_in=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    targets = images[1:] + images[:1]
    assert em.clip_similarity(clip, images, targets, batch_size=2) == pytest.approx(em.clip_similarity(clip, images, targets, 5), abs=1e-5)


def _three_results(tmp_path, toy_meta):
    from myutils.data import read_meta

    folder = tmp_path / "res"
    os.makedirs(folder)
    for i, e in enumerate(read_meta(toy_meta, "triplet")[:3]):
        Image.open(e.paths["GT"]).save(folder / f"{i:05d}.png")
    return ["--meta_path", toy_meta, "--limit", "3", "--resolution", "32", "--system", f"mine=results:{folder}", "--fetch_weights"]


def test_metrics_fetch_each_librarys_standard_weights(tmp_path, toy_meta, monkeypatch):
    """Without weight files the metrics ask each library for its own standard weights: pytorch-fid's FID
    Inception URL, torchvision's AlexNet URL (LPIPS), open_clip's LAION-2B tag (CLIP). The downloads
    are answered here with random weights of the right shapes (no network); the metrics then exist
    and are not marked as stand-ins (they came through the standard path)."""
    import open_clip
    import pytorch_fid.inception as pi
    import torchvision
    import torchvision.models._api as tv_api

    asked = []

    def fid_download(url, **kw):
        asked.append(url)
        return pi._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()

    def tv_download(url, **kw):
        asked.append(url)
        return torchvision.models.alexnet(weights=None).state_dict()

    real_clip = open_clip.create_model_and_transforms

    def clip(name, pretrained=None, **kw):
        asked.append(f"open_clip:{name}:{pretrained}")
        return real_clip(name, pretrained=None, **kw)

    monkeypatch.setattr(pi, "load_state_dict_from_url", fid_download)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", tv_download)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", clip)
    summary = ev.main(_three_results(tmp_path, toy_meta) + ["--output_dir", str(tmp_path / "eval")])
    assert asked[0] == pi.FID_WEIGHTS_URL and "alexnet" in asked[1] and asked[2] == "open_clip:ViT-B-32:laion2b_s34b_b79k"
    row = summary["systems"][0]
    assert row["fid"] == pytest.approx(0.0, abs=1e-3) and row["lpips_in_mask"] == 0.0
    assert row["clip_similarity"] == pytest.approx(1.0, abs=1e-5) and summary["stand_ins"] == []


def test_offline_metrics_say_why_and_which_argument(tmp_path, toy_meta, monkeypatch, capsys):
    import urllib.error

    import open_clip
    import pytorch_fid.inception as pi
    import torchvision.models._api as tv_api

    def offline(url, **kw):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    def clip_offline(*a, **k):
        raise RuntimeError("Failed to download weights for tag 'laion2b_s34b_b79k'")

    monkeypatch.setattr(pi, "load_state_dict_from_url", offline)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", clip_offline)
    out = tmp_path / "eval"
    summary = ev.main(_three_results(tmp_path, toy_meta) + ["--output_dir", str(out)])
    assert summary["systems"][0]["masked_mse"] == 0.0 and "fid" not in summary["systems"][0]  # the run went on
    table = open(out / "results.md").read()
    assert ("unavailable (could not fetch pytorch-fid's FID Inception weights (URLError: <urlopen error [Errno -2] Name or "
            "service not known>); or give --inception_weights)") in table
    assert "unavailable (could not fetch torchvision's AlexNet weights (LPIPS) (URLError" in table
    assert "unavailable (could not fetch open_clip's ViT-B-32 weights (RuntimeError: Failed to download" in table
    unavailable = json.load(open(out / "results.json"))["unavailable"]
    assert unavailable["fid"].startswith("could not fetch") and unavailable["fid"].endswith("or give --inception_weights")
    assert "warning: fid unavailable: could not fetch" in capsys.readouterr().out
    # HF_HUB_OFFLINE=1 (as here, tests) means no fetching: the metric names its argument only
    args = ev.parse_args(["--meta_path", toy_meta, "--output_dir", str(out), "--system", "x=results:" + str(out)])
    assert args.fetch_weights is False


def test_the_win_rate_names_the_winner(tmp_path, tiny_model_dir, toy_meta, disc_dir, monkeypatch):
    """On inputs where the answer is known (a scorer that prefers brighter results; one system white,
    the other black), the table says the white system wins every input, in both orders of --system."""
    from myutils.data import read_meta
    from myutils.reward_utils import DiscriminatorReward

    monkeypatch.setattr(DiscriminatorReward, "score_pixels", lambda self, source, mask, edited: edited.float().mean((1, 2, 3)))
    entries = read_meta(toy_meta, "triplet")[:4]
    for name, colour in (("white", 255), ("black", 0)):
        folder = tmp_path / name
        folder.mkdir()
        for i, e in enumerate(entries):
            Image.new("RGB", Image.open(e.paths["GT"]).size, (colour,) * 3).save(folder / f"{i}.png")
        (folder / "meta.json").write_text(json.dumps([{"source": e.paths["source"], "mask": e.paths["mask"], "GT": f"{i}.png"}
                                                      for i, e in enumerate(entries)]))
    for order in (["white", "black"], ["black", "white"]):
        systems = [a for n in order for a in ("--system", f"{n}=results:{tmp_path / n}")]
        summary = ev.main(_args(toy_meta, str(tmp_path / f"eval_{order[0]}"), "--pretrained_model", tiny_model_dir, "--limit", "4",
                                "--discriminator_path", disc_dir, "--no-fetch_weights", *systems))
        (w,) = summary["win_rates"]
        assert (w["a"], w["b"]) == tuple(order)
        assert w["win_rate"] == (1.0 if order[0] == "white" else 0.0)
