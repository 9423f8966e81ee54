"""A mutation pass over the math, data, resume and annotation code: each mutant changes one line of
production code (in a copy of the working tree), runs the tests that should hold that behaviour, and
counts as killed when they fail (each selection passes on the unmutated tree first). Prints one row per mutant and the score; --update_readme writes the
table and score into the README's Tests section (a run of every mutant only). Survivors that are
accepted are listed with why in ACCEPTED.

    python scripts/mutation_pass.py --update_readme  # every mutant
    python scripts/mutation_pass.py --only 3 17      # some of them, by number
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, line as written, the mutant, tests that should fail, what breaks for a user)
MUTANTS = [
    # --- DPO / SDPO / KTO (myutils/dpo_utils.py)
    ("myutils/dpo_utils.py", "inside = -0.5 * beta * (model_diff - ref_diff)", "inside = 0.5 * beta * (model_diff - ref_diff)",
     "tests/test_dpo_utils.py", "DPO's sign: the rejected image preferred"),
    ("myutils/dpo_utils.py", "losses = F.relu(1.0 - inside)", "losses = F.relu(-inside)", "tests/test_dpo_utils.py", "hinge margin lost"),
    ("myutils/dpo_utils.py", "err_l = err_l.detach() + loser_scale * (err_l - err_l.detach())", "err_l = loser_scale * err_l",
     "tests/test_dpo_utils.py", "SDPO scales the loser's value, not only its gradient"),
    ("myutils/dpo_utils.py", "scale = ((1.0 - mu) * num / torch.where(den > 0, den, 1.0)).clamp(0.0, max_scale)",
     "scale = (mu * num / torch.where(den > 0, den, 1.0)).clamp(0.0, max_scale)", "tests/test_dpo_utils.py", "SDPO's lambda with mu for 1 - mu"),
    ("myutils/dpo_utils.py", "return n_undesirable / n_desirable, 1.0", "return n_desirable / n_undesirable, 1.0",
     "tests/test_dpo_utils.py tests/test_train_kto.py -k weights", "KTO class weights inverted"),
    ("myutils/dpo_utils.py", "z = (reduce_mean(z) if reduce_mean is not None else z).detach().clamp(min=0)",
     "z = (reduce_mean(z) if reduce_mean is not None else z).detach()", "tests/test_train_kto.py -k loss", "KTO reference point below 0"),
    ("myutils/dpo_utils.py", "return beta * math.prod(latent_shape)", "return beta / math.prod(latent_shape)", "tests/test_dpo_utils.py",
     "beta in summed units converted the wrong way"),
    ("myutils/dpo_utils.py", "return F.mse_loss(model_pred[:preferred].float(), target[:preferred].float())",
     "return F.mse_loss(model_pred[preferred:].float(), target[preferred:].float())", "tests/test_dpo_utils.py", "SFT on the rejected half"),
    ("training/preference.py", "m += -((w - l_) - (rw - rl))", "m += (w - l_) - (rw - rl)",
     "tests/test_train_dpo.py -k 'full_finetune or accuracy'", "held-out preference accuracy inverted"),
    # --- LCM (myutils/lcm_utils.py)
    ("myutils/lcm_utils.py", "c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5", "c_out = scaled / (scaled ** 2 + sigma_data ** 2)",
     "tests/test_lcm_utils.py", "consistency boundary scaling"),
    ("myutils/lcm_utils.py", "        return alpha * x - sigma * out\n", "        return alpha * x + sigma * out\n", "tests/test_lcm_utils.py",
     "x0 from v-prediction"),
    ("myutils/lcm_utils.py", "return alpha * model_output.float() + sigma * sample.float()",
     "return sigma * model_output.float() + alpha * sample.float()", "tests/test_lcm_utils.py", "epsilon from v-prediction"),
    ("myutils/lcm_utils.py", "self.ddim_alpha_cumprods_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])",
     "self.ddim_alpha_cumprods_prev = torch.cat([alphas_cumprod[-1:], alphas_cumprod[self.ddim_timesteps[:-1]]])",
     "tests/test_lcm_utils.py", "the DDIM solver's first alpha_prev"),
    ("myutils/lcm_utils.py", "return a_prev.sqrt() * pred_x0.float() + (1 - a_prev).sqrt() * pred_noise.float()",
     "return a_prev.sqrt() * pred_x0.float() + (1 - a_prev) * pred_noise.float()", "tests/test_lcm_utils.py", "DDIM solver step"),
    # --- online RL (myutils/rl_utils.py)
    ("myutils/rl_utils.py", "std = eta * variance.clamp(min=0).sqrt()", "std = eta ** 2 * variance.clamp(min=0).sqrt()",
     "tests/test_rl_utils.py", "DDIM std with eta squared"),
    ("myutils/rl_utils.py", "mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps",
     "mean = a_prev.sqrt() * x0 + (1 - a_prev).clamp(min=0).sqrt() * eps", "tests/test_rl_utils.py", "DDIM mean ignores the noise's share"),
    ("myutils/rl_utils.py", "lp = -((x.float() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))",
     "lp = -((x.float() - mean) ** 2) / (2 * std ** 2) - math.log(math.sqrt(2 * math.pi))", "tests/test_rl_utils.py",
     "log-prob without its log std"),
    ("myutils/rl_utils.py", "kl = (mean_a.float() - mean_b.float()) ** 2 / (2 * std ** 2)", "kl = (mean_a.float() - mean_b.float()) ** 2 / std ** 2",
     "tests/test_rl_utils.py", "KL twice too large"),
    ("myutils/rl_utils.py", "loss = torch.maximum(unclipped, clipped).mean()", "loss = torch.minimum(unclipped, clipped).mean()",
     "tests/test_rl_utils.py", "PPO's pessimistic bound"),
    ("myutils/rl_utils.py", "clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)",
     "clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0)", "tests/test_rl_utils.py", "PPO clip on one side only"),
    ("myutils/rl_utils.py", "advantages[mine] = (group - group.mean()) / ((group.std() if std == \"group\" else rewards.std()) + eps)",
     "advantages[mine] = (group - rewards.mean()) / ((group.std() if std == \"group\" else rewards.std()) + eps)",
     "tests/test_rl_utils.py", "GRPO advantage against the batch mean"),
    ("myutils/rl_utils.py", "mean, std = (np.mean(buf), np.std(buf)) if len(buf) >= self.min_count else (batch_mean, batch_std)",
     "mean, std = (np.mean(buf), np.std(buf)) if len(buf) > self.min_count else (batch_mean, batch_std)", "tests/test_rl_utils.py",
     "per-input statistics one sample late"),
    ("myutils/rl_utils.py", "return -(advantages * log_prob).mean()", "return (advantages * log_prob).mean()", "tests/test_rl_utils.py",
     "REINFORCE ascends the wrong way"),
    ("training/rl_loop.py", "            with adapters.disabled(model):\n                ref_mean, _ = sampler.distribution(model, x, j, b)",
     "            if True:\n                ref_mean, _ = sampler.distribution(model, x, j, b)", "tests/test_train_ddpo.py -k eval_kl_to_start",
     "the KL to the start measured against the policy itself"),
    # --- randomness, data and resume
    ("myutils/rng.py", "manual_seed(((seed * 1_000_003 + int(e)) * 1_000_033 + int(i)) % 2 ** 64)",
     "manual_seed(((seed * 1_000_003) * 1_000_033 + int(i)) % 2 ** 64)", "tests/test_data.py", "every epoch redraws the same noise"),
    ("myutils/rng.py", "manual_seed(((seed * 1_000_003 + int(e)) * 1_000_033 + int(i)) % 2 ** 64)",
     "manual_seed(((seed * 1_000_003 + int(e)) * 1_000_033) % 2 ** 64)", "tests/test_data.py", "every sample draws the same noise"),
    ("myutils/img_util.py", "return x.float() / 127.5 - 1.0", "return x.float() / 255.0 - 1.0", "tests/test_data.py tests/test_img_util.py",
     "pixels scaled to [-1, 0]"),
    ("myutils/img_util.py", "return torch.from_numpy(arr >= 0.5)[None].to(dtype)", "return torch.from_numpy(arr > 0.5)[None].to(dtype)",
     "tests/test_img_util.py tests/test_data.py", "mask threshold off by one grey level"),
    ("training/checkpoint.py", "accelerator.step = step * args.gradient_accumulation_steps", "accelerator.step = step",
     "tests/test_train_RORem.py -k resume_continues", "resume mid-accumulation at the wrong boundary"),
    # --- evaluation and the demo report
    ("myutils/metrics.py", "p = float(((a > b).sum() + 0.5 * (a == b).sum()) / n)", "p = float(((a < b).sum() + 0.5 * (a == b).sum()) / n)",
     "tests/test_evaluate.py -k 'by_hand or hole_only or identical or winner'", "win rate reports the loser as the winner"),
    ("myutils/metrics.py", "p = float(((a > b).sum() + 0.5 * (a == b).sum()) / n)", "p = float(((a > b).sum()) / n)",
     "tests/test_evaluate.py -k 'by_hand or hole_only or identical or winner'", "ties counted as losses"),
    ("myutils/metrics.py", "half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))",
     "half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n)", "tests/test_evaluate.py -k 'by_hand or hole_only or identical or winner'", "Wilson interval without its correction"),
    ("myutils/metrics.py", "return float(((_arr(result) - _arr(gt)) ** 2)[m].mean())", "return float(((_arr(result) - _arr(gt)) ** 2).mean())",
     "tests/test_evaluate.py -k 'by_hand or hole_only or identical or winner'", "masked MSE over the whole image"),
    ("myutils/metrics.py", "return float(\"inf\") if mse == 0 else float(10 * np.log10(1.0 / mse))",
     "return float(\"inf\") if mse == 0 else float(20 * np.log10(1.0 / mse))", "tests/test_evaluate.py -k 'by_hand or hole_only or identical or winner'", "PSNR doubled"),
    ("myutils/metrics.py", "return float((greater + 0.5 * ties) / (len(pos) * len(neg)))", "return float(greater / (len(pos) * len(neg)))",
     "tests/test_evaluate.py -k by_hand", "AUC without ties"),
    ("toy_world/report.py", "half = Z95 * d.std(ddof=1) / np.sqrt(len(d))", "half = 0.674 * d.std(ddof=1) / np.sqrt(len(d))",
     "tests/test_demo_report.py", "a 50% interval labelled 95%"),
    ("toy_world/report.py", "    if high < 0:\n", "    if high <= 0:\n", "tests/test_demo_report.py", "an interval touching zero called a change"),
    ("toy_world/report.py", "low, high = np.percentile(boots, [2.5, 97.5])", "low, high = np.percentile(boots, [25, 75])",
     "tests/test_demo_report.py", "hypervolume bootstrap interval too narrow"),
    # --- multi-objective RL (myutils/morl_utils.py)
    ("myutils/morl_utils.py", "score = hypervolume(nd, ref01) - sparsity_weight * sparsity(nd)",
     "score = hypervolume(nd, ref01) + sparsity_weight * sparsity(nd)", "tests/test_morl.py -k select", "task selection rewards sparse fronts"),
    ("myutils/morl_utils.py", "s = np.array([own_weight if r[\"policy\"] == policy else 1.0 for r in records])",
     "s = np.array([1.0 for r in records])", "tests/test_morl.py -k predict", "the predictor ignores the policy's own records"),
    # --- annotation (myutils/annotation.py, annotate_RORem.py)
    ("myutils/annotation.py", "        f.write(line)\n        f.flush()\n        os.fsync(f.fileno())\n    return record",
     "        f.write(line)\n    return record", "tests/test_annotation.py", "a label not forced to disk when given"),
    ("myutils/annotation.py", "if f.read(1) != b\"\\n\":", "if False:", "tests/test_annotation.py",
     "a label glued onto a torn line"),
    ("myutils/annotation.py", "return None if not isinstance(s, (int, float)) else (\"good\" if s >= threshold else \"bad\")",
     "return None if not isinstance(s, (int, float)) else (\"good\" if s > threshold else \"bad\")", "tests/test_annotation.py",
     "a score at the threshold called bad"),
    ("annotate_RORem.py", "        key = self.keys[index]\n        with self.lock:\n", "        key = self.keys[index]\n        if True:\n",
     "tests/test_annotation.py -k at_once", "two tabs of one annotator lose a label's count"),
]

# Survivors examined and accepted, by what the mutant breaks: why no test should fail.
ACCEPTED = {
    "mask threshold off by one grey level": "equivalent: masks are read as 8-bit grey levels, and no k / 255 equals 0.5, so >= and > agree on every mask",
}


README_MARKS = ("<!-- mutation pass: written by python scripts/mutation_pass.py --update_readme -->\n", "<!-- end of mutation pass -->\n")


def table(rows):
    killed = sum(r[4].startswith("killed") for r in rows)
    lines = [f"Mutation score: {killed} of {len(rows)} killed.", "",
             "| # | file | what the mutant breaks | tests run | outcome |", "|---|---|---|---|---|"]
    lines += [f"| {i} | `{path}` | {what} | `{tests}` | {outcome}{'; accepted: ' + ACCEPTED[what] if what in ACCEPTED else ''} |"
              for i, path, what, tests, outcome in rows]
    return "\n".join(lines) + "\n"


def copy_tree(dst):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def run_mutant(copy, number, path, old, new, tests, timeout):
    target = os.path.join(copy, path)
    with open(target) as f:
        original = f.read()
    if original.count(old) != 1:
        raise SystemExit(f"mutant {number}: {path} holds {original.count(old)} copies of {old!r} (the code changed: update MUTANTS)")
    with open(target, "w") as f:
        f.write(original.replace(old, new))
    try:
        start = time.time()
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider",
                              *shlex.split(tests)], cwd=copy, capture_output=True, text=True, timeout=timeout)
        outcome = "killed" if res.returncode == 1 else "survived" if res.returncode == 0 else f"error {res.returncode}"
        if res.returncode not in (0, 1):
            outcome += ": " + res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    except subprocess.TimeoutExpired:
        outcome = "killed (timeout)"
    finally:
        with open(target, "w") as f:
            f.write(original)
    return outcome, time.time() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", type=int, nargs="+", default=None, help="mutant numbers (1-based)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant's tests")
    p.add_argument("--update_readme", action="store_true", help="write the table and score into README.md (every mutant)")
    args = p.parse_args(argv)
    chosen = [(i, m) for i, m in enumerate(MUTANTS, 1) if args.only is None or i in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutants_") as copy:
        copy_tree(copy)
        # each test selection passes on the unmutated tree first: a kill is the mutant's doing
        for tests in sorted({m[3] for _, m in chosen}):
            res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *shlex.split(tests)],
                                 cwd=copy, capture_output=True, text=True, timeout=args.timeout)
            if res.returncode != 0:
                raise SystemExit(f"the unmutated tree fails {tests}: {res.stdout.strip().splitlines()[-1]}")
        print(f"{len({m[3] for _, m in chosen})} test selections pass on the unmutated tree", flush=True)
        for i, (path, old, new, tests, what) in chosen:
            outcome, seconds = run_mutant(copy, i, path, old, new, tests, args.timeout)
            rows.append((i, path, what, tests, outcome))
            print(f"{i:3d} {outcome:>17s} {seconds:6.0f} s  {path}: {what}", flush=True)
    killed = sum(r[4].startswith("killed") for r in rows)
    print(f"\nmutation score: {killed}/{len(rows)} killed")
    for i, path, what, tests, outcome in rows:
        if not outcome.startswith("killed"):
            print(f"  {i}: {outcome}: {path}: {what}" + (f"; accepted: {ACCEPTED[what]}" if what in ACCEPTED else ""))
    if args.update_readme:
        if args.only is not None:
            raise SystemExit("--update_readme: run every mutant (no --only)")
        path = os.path.join(ROOT, "README.md")
        with open(path) as f:
            text = f.read()
        start, end = text.index(README_MARKS[0]) + len(README_MARKS[0]), text.index(README_MARKS[1])
        with open(path, "w") as f:
            f.write(text[:start] + table(rows) + text[end:])
    return rows


if __name__ == "__main__":
    main()
