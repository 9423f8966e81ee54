"""Multi-objective RL: hypervolume on hand-made fronts, dominance and the Pareto archive, sparsity,
the improvement predictor and task selection (myutils/morl_utils.py); train_RORem_morl.py keeps one
base model for the whole population and writes loadable LoRAs, an index and front plots."""
import json
import os

import numpy as np
import pytest
import torch

from myutils import morl_utils as mo



def _area_dominated_2d(points, ref):
    """The 2-objective hypervolume by a sweep (not mo.hypervolume, which the code under test calls): points
    by the first objective, best first; each adds the strip its second objective gains over those before."""
    area, best = 0.0, ref[1]
    for x, y in sorted((p for p in points if p[0] > ref[0] and p[1] > ref[1]), key=lambda p: -p[0]):
        if y > best:
            area, best = area + (x - ref[0]) * (y - best), y
    return area


def test_hypervolume_of_hand_made_fronts():
    assert mo.hypervolume([[1, 2], [2, 1]], [0, 0]) == pytest.approx(3.0)  # 2 + 2 - the shared unit square
    assert mo.hypervolume([[3, 1]], [1, 0]) == pytest.approx(2.0)
    assert mo.hypervolume([[1, 2], [2, 1], [0.5, 0.5]], [0, 0]) == pytest.approx(3.0)  # a dominated point adds nothing
    assert mo.hypervolume([[-1, 5]], [0, 0]) == 0.0  # not better than the reference in every objective
    for front, ref, want in (([[1, 2], [2, 1], [0.5, 0.5]], [0, 0], 3.0), ([[3, 1]], [1, 0], 2.0), ([[-1, 5]], [0, 0], 0.0)):
        assert _area_dominated_2d(front, ref) == pytest.approx(want)  # the sweep used below, on the same fronts
    # three objectives: two boxes of volume 2 overlapping in a unit cube
    assert mo.hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == pytest.approx(3.0)
    assert mo.hypervolume([[1, 1, 1], [2, 2, 0.5]], [0, 0, 0]) == pytest.approx(1 + 4 * 0.5 - 1 * 0.5)


def test_dominance_front_and_archive():
    assert mo.dominates([1, 1], [1, 0]) and not mo.dominates([1, 0], [0, 1]) and not mo.dominates([1, 1], [1, 1])
    assert mo.pareto_indices([[1, 0], [0, 1], [0.5, 0.5], [0.2, 0.2], [1, 0]]) == [0, 1, 2]
    archive = mo.ParetoArchive()
    assert archive.add({"name": "a", "objectives": [1, 0]}) == (True, [])
    assert archive.add({"name": "b", "objectives": [0, 1]}) == (True, [])
    assert archive.add({"name": "c", "objectives": [0.5, 0.2]}) == (True, [])
    assert archive.add({"name": "d", "objectives": [0.4, 0.1]}) == (False, [])  # dominated by c
    assert archive.add({"name": "e", "objectives": [1, 0.5]}) == (True, ["a", "c"])  # dominates a and c
    assert [e["name"] for e in archive.entries] == ["b", "e"]
    restored = mo.ParetoArchive()
    restored.load_state_dict(json.loads(json.dumps(archive.state_dict())))
    assert restored.points.tolist() == [[0, 1], [1, 0.5]]


def test_sparsity_by_hand():
    # sorted x: 0, 1, 3 -> gaps 1, 2; sorted y: 0, 2, 3 -> gaps 2, 1; (1 + 4 + 4 + 1) / 2
    assert mo.sparsity([[0, 3], [1, 2], [3, 0]]) == pytest.approx(5.0)
    assert mo.sparsity([[1, 1]]) == 0.0


def test_weights_on_the_simplex():
    w = mo.initial_weights(2, 5)
    assert np.allclose(w[:, 0], [0, 0.25, 0.5, 0.75, 1]) and np.allclose(w.sum(1), 1)
    w3 = mo.initial_weights(3, 6)
    assert w3.shape == (6, 3) and np.allclose(w3.sum(1), 1) and (w3 >= -1e-9).all()
    assert len(mo.candidate_weights(2, 4)) == 5


def test_predictor_recovers_a_linear_response():
    # improvement in objective 0 = 0.1 + 0.5 w0, in objective 1 = -0.2 + 0.3 w1
    records = [{"policy": p, "weights": [w, 1 - w], "delta": [0.1 + 0.5 * w, -0.2 + 0.3 * (1 - w)]}
               for p, w in enumerate([0.0, 0.3, 0.6, 1.0])]
    pred = mo.predict_improvement(records, 0, [0.8, 0.2], ridge=1e-9)
    assert pred == pytest.approx([0.1 + 0.4, -0.2 + 0.06], abs=1e-6)
    assert mo.predict_improvement([], 0, [0.5, 0.5]).tolist() == [0, 0]


def test_selection_fills_the_gap_in_the_front():
    front = [[1.0, 0.0], [0.0, 1.0]]
    candidates = [("a", [0.9, 0.1], np.array([0.95, 0.05])), ("b", [0.5, 0.5], np.array([0.7, 0.7])),
                  ("c", [0.1, 0.9], np.array([0.05, 0.95]))]
    picked = mo.select_tasks(front, candidates, 2, [-0.1, -0.1], sparsity_weight=0.5)
    assert picked[0][0] == "b"  # the middle of the front adds the most hypervolume


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--report_to", "none", "--sample_steps", "3", "--sample_batch_size", "2", "--sample_batches_per_epoch", "1",
            "--group_size", "2", "--train_batch_size", "4", "--learning_rate", "1e-2", "--eval_samples", "2", "--lora_rank", "4",
            "--objectives", "preserve,jpeg", "--population", "3", "--generations", "3", "--warmup_generations", "1",
            "--weight_partitions", "4", *extra]


def test_population_trains_on_one_base_and_writes_loadable_policies(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch):
    import train_RORem_morl as morl
    from training import adapters

    seen = {}
    real = adapters.add_lora

    def spy(model, args, dtype, adapter_name="default"):
        seen.setdefault("models", set()).add(id(model))
        return real(model, args, dtype, adapter_name)

    monkeypatch.setattr(adapters, "add_lora", spy)
    out = str(tmp_path / "morl")
    # the test inputs here are the validation inputs themselves, so the end-of-run test must reproduce
    # the numbers the selection saw: each front policy loaded back into a slot, the start with LoRAs off
    summary = run_script(morl, _args(tiny_model_dir, toy_meta, out, "--lr_scheduler", "linear", "--test_meta_path", toy_meta,
                                     "--test_samples", "2"))
    assert len(seen["models"]) == 1  # every policy is an adapter on the same model: one base in memory
    # each policy's linear schedule runs its whole course over that policy's own 3 of the 9 steps
    for k in range(3):
        state = torch.load(os.path.join(out, "checkpoint-9", "scheduler.bin" if k == 0 else f"scheduler_{k}.bin"), weights_only=False)
        assert state["last_epoch"] == 3 and state["_last_lr"] == [0.0]
    assert len(summary["hypervolume_per_generation"]) == 3 and summary["reference"] and summary["start"]
    pop = [p for p in summary["policies"] if p["name"].startswith("policy_")]
    assert len(pop) == 3 and all(len(p["weights"]) == 2 and len(p["objectives"]) == 2 for p in pop)
    front = [p for p in summary["policies"] if p["name"].startswith("gen")]
    assert front and all(os.path.isfile(os.path.join(p["path"], "pytorch_lora_weights.safetensors")) for p in front)
    pts = np.array([p["objectives"] for p in front])
    assert mo.pareto_indices(pts) == list(range(len(pts)))  # the archive holds no dominated policy
    for name in ("front.png", "fronts/gen-00.png", "fronts/gen-02.png", "final_metrics.json", "checkpoint-9"):
        assert os.path.exists(os.path.join(out, name)), name
    test = summary["test"]
    assert test["inputs"] == 2 and len(test["start"]) == 2 and all(len(v) == 2 for v in test["start"])
    assert np.mean(test["start"], axis=0) == pytest.approx(summary["start"], abs=1e-6)
    assert sorted(test["front"]) == sorted(p["name"] for p in front)
    for p in front:
        assert np.mean(test["front"][p["name"]], axis=0) == pytest.approx(p["objectives"], abs=1e-6)
    assert test["hypervolume_front"] == pytest.approx(_area_dominated_2d(pts, summary["reference"]))
    from safetensors.torch import load_file  # slot 0 lent its adapter to the test and got its own weights back
    saved = load_file(os.path.join(out, "policy_0", "pytorch_lora_weights.safetensors"))
    final = load_file(os.path.join(out, "checkpoint-9", "policy_0", "pytorch_lora_weights.safetensors"))
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)

    # a saved policy loads into the stock pipeline and moves its weights away from the base
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(pop[0]["path"])
    pipe.fuse_lora()
    after = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_morl_argument_errors(tiny_model_dir, toy_meta, tmp_path):
    import train_RORem_morl as morl
    from myutils.errors import UserError

    base = ["--pretrained_model_name_or_path", tiny_model_dir, "--meta_path", toy_meta, "--output_dir", str(tmp_path)]
    for extra, message in [(["--objectives", "preserve"], "at least two"),
                           (["--objectives", "preserve,beauty"], "unknown: beauty"),
                           (["--objectives", "preserve,jpeg", "--algorithm", "ppo"], "use --algorithm grpo"),
                           (["--objectives", "preserve,jpeg", "--hv_reference", "1"], "needs 2 values")]:
        with pytest.raises(UserError, match=message):
            morl.parse_args(base + extra)


def _assert_same_populations(one, two):
    """Same hypervolume history, and every policy's LoRA equal to 1e-6."""
    from safetensors.torch import load_file

    a, b = (json.load(open(os.path.join(d, "policies.json"))) for d in (one, two))
    assert a["hypervolume_per_generation"] == b["hypervolume_per_generation"]
    for k in range(3):
        wa, wb = (load_file(os.path.join(d, f"policy_{k}", "pytorch_lora_weights.safetensors")) for d in (one, two))
        assert max((wa[n] - wb[n]).abs().max().item() for n in wa) <= 1e-6


def test_resume_from_a_generation_checkpoint_equals_the_straight_run(tmp_path, tiny_model_dir, toy_meta, run_script):
    import train_RORem_morl as morl

    straight = str(tmp_path / "straight")
    run_script(morl, _args(tiny_model_dir, toy_meta, straight, "--objectives", "preserve,gt"))
    resumed = str(tmp_path / "resumed")
    run_script(morl, _args(tiny_model_dir, toy_meta, resumed, "--objectives", "preserve,gt", "--resume_from_checkpoint",
                           os.path.join(straight, "checkpoint-6")))  # the state after generation 1 (tasks for 2 chosen)
    _assert_same_populations(straight, resumed)


def test_weighted_advantages_normalise_each_objective_within_groups():
    import train_RORem_morl as morl

    ids = [7, 7, 9, 9]
    comps = {"a": np.array([1.0, 3.0, 0.0, 0.0]), "b": np.array([100.0, 0.0, 5.0, 7.0])}  # b has a much larger scale
    adv = morl.weighted_group_advantages(comps, ["a", "b"], [0.25, 0.75], ids)
    # within group 7: a -> (-1, +1), b -> (+1, -1); group 9: a ties (0, 0), b -> (-1, +1); up to the 1e-6 eps
    assert adv == pytest.approx([0.25 * -1 + 0.75 * 1, 0.25 * 1 + 0.75 * -1, 0.75 * -1, 0.75 * 1], abs=1e-5)


def test_morl_configs_parse():
    import train_RORem_morl as morl

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("morl_config.yaml", "toy_morl.yaml"):
        args = morl.parse_args(["--config", os.path.join(root, "configs", name), "--meta_path", "m.json", "--output_dir", "o",
                                "--discriminator_path", "d"])
        assert args.objective_names == ["discriminator", "preserve"] and args.rewards == {"discriminator": 1.0, "preserve": 1.0}


def test_sigterm_inside_a_generation_resumes_like_the_straight_run(tmp_path, tiny_model_dir, toy_meta, run_script, sigterm_at_step):
    """Stopped at step 9 of 12 (generation 1, policy 1, halfway through its epoch): the resumed run skips
    policy 0's finished epoch, trains policy 1 on the samples in the checkpoint from where it stopped,
    samples policy 2's epoch as the straight run did, and ends with the same policies."""
    import train_RORem_morl as morl

    extra = ["--objectives", "preserve,gt", "--train_batch_size", "2", "--generations", "2"]
    straight = str(tmp_path / "straight")
    run_script(morl, _args(tiny_model_dir, toy_meta, straight, *extra))
    killed = str(tmp_path / "killed")
    sigterm_at_step(9)
    with pytest.raises(SystemExit) as stop:
        run_script(morl, _args(tiny_model_dir, toy_meta, killed, *extra))
    assert stop.value.code == 0 and os.path.isfile(os.path.join(killed, "checkpoint-9", "epoch_samples_0.pt"))
    run_script(morl, _args(tiny_model_dir, toy_meta, killed, *extra, "--resume_from_checkpoint", "latest"))
    _assert_same_populations(straight, killed)


def test_predictor_weights_the_policys_own_records():
    """Against numpy's weighted least squares (polyfit, weights sqrt(s)): responses that are not linear,
    so the policy's own records (weighted 4) pull the fit toward them."""
    ws = [0.0, 0.2, 0.5, 0.8, 1.0]
    d0 = [0.3, -0.1, 0.4, 0.0, 0.6]
    records = [{"policy": p % 2, "weights": [w, 1 - w], "delta": [d, -d]} for p, (w, d) in enumerate(zip(ws, d0))]
    s = np.array([4.0 if p % 2 == 1 else 1.0 for p in range(5)])
    slope, intercept = np.polyfit(ws, d0, 1, w=np.sqrt(s))
    pred = mo.predict_improvement(records, 1, [0.7, 0.3], own_weight=4.0, ridge=1e-12)
    assert pred[0] == pytest.approx(intercept + slope * 0.7, abs=1e-6)
    plain = np.polyval(np.polyfit(ws, d0, 1), 0.7)
    assert abs(pred[0] - plain) > 1e-3  # the weighting matters here


def test_selection_picks_every_task_by_hypervolume_minus_sparsity():
    """Both greedy picks against the rule computed here with our own 2-D hypervolume (area swept) and
    sparsity (squared gaps per objective over points - 1), on a front where adding the sparsity instead
    of subtracting it would pick otherwise."""
    def area(points, ref):
        pts = sorted((p for p in points if p[0] > ref[0] and p[1] > ref[1]), key=lambda p: -p[0])
        total, top = 0.0, ref[1]
        for x, y in pts:
            if y > top:
                total += (x - ref[0]) * (y - top)
                top = y
        return total

    def spars(points):
        p = np.asarray(points, dtype=float)
        return 0.0 if len(p) < 2 else sum(float((np.diff(np.sort(p[:, j])) ** 2).sum()) for j in range(p.shape[1])) / (len(p) - 1)

    def nondominated(points):
        return [p for p in points if not any(np.all(np.asarray(q) >= p) and np.any(np.asarray(q) > p) for q in points)]

    front = [[1.0, 0.0], [0.0, 1.0]]
    candidates = [("a", [0.4, 0.6], np.array([0.51, 0.91])), ("b", [0.1, 0.9], np.array([0.18, 0.90])),
                  ("c", [0.5, 0.5], np.array([0.33, 0.43])), ("d", [0.8, 0.2], np.array([0.79, 0.42]))]
    reference = np.array([-0.1, -0.1])

    def greedy(sign):
        every = np.array([c[2] for c in candidates] + front)
        scale = every.max(0) - reference
        norm = lambda p: list((np.asarray(p) - reference) / scale)  # noqa: E731
        chosen = []
        for _ in range(2):
            def score(i):
                nd = nondominated([norm(p) for p in front] + [norm(candidates[k][2]) for k in chosen + [i]])
                return area(nd, [0.0, 0.0]) + sign * 0.5 * spars(nd)
            chosen.append(max((i for i in range(len(candidates)) if i not in chosen), key=score))
        return [candidates[i][0] for i in chosen]

    want = greedy(-1)
    assert want == ["a", "d"] and greedy(+1) == ["a", "b"]  # the same first pick; the sign of the sparsity decides the second
    assert [c[0] for c in mo.select_tasks(front, candidates, 2, reference, sparsity_weight=0.5)] == want
