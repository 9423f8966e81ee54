"""Run a list of training jobs one after another and put their final metrics in one table
(scripts/sweep_dpo.py, scripts/sweep_lcm.py). A job whose final_metrics.json exists is skipped; an
interrupted one resumes from its latest checkpoint."""
import argparse
import csv
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep_parser(description):
    """The sweep's own arguments; everything after `--` goes to every run (see split_argv)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="arguments after -- are passed to every training run")
    p.add_argument("--output_root", required=True)
    p.add_argument("--launch", default=sys.executable, help='e.g. "accelerate launch --config_file configs/accelerate_8gpu.yaml"')
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    return p


def parse_sweep_args(parser, argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.train_args = argv[cut + 1:]
    return args


def run_all(args, script, runs):
    """Run each (name, extra args) with `script` and the arguments after `--` into
    <output_root>/<name> (a run given as (name, extra, its own script, its own arguments) uses those
    instead); returns their final_metrics.json contents in order (empty on --dry_run). Exits with a
    message if a run fails."""
    os.makedirs(args.output_root, exist_ok=True)
    finals = []
    for name, extra, *own in runs:
        run_script, train_args = own or (script, args.train_args)
        folder = os.path.join(args.output_root, name)
        cmd = [*shlex.split(args.launch), os.path.join(ROOT, run_script), *train_args, *extra,
               "--output_dir", folder, "--resume_from_checkpoint", "latest"]
        done = os.path.join(folder, "final_metrics.json")
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        if os.path.isfile(done):
            print(f"[{name}] done before, skipped")
        else:
            print(f"[{name}] " + shlex.join(cmd), flush=True)
            if subprocess.run(cmd).returncode != 0:  # in the caller's folder: relative paths mean what they typed
                sys.exit(f"error: sweep run {name} failed (its log is above; rerun the sweep to resume it)")
        with open(done) as f:
            finals.append({"name": name, **json.load(f)})
    return finals


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def interval(row, key="win_rate"):
    """'0.656 [0.53, 0.76]' from row[key], row[key_low], row[key_high]."""
    if row.get(key) is None:
        return "n/a"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return fmt(row[key]) + ("" if low is None else f" [{low:.2f}, {high:.2f}]")


def write_tables(output_root, rows, header, cells):
    """sweep_results.md (header: column titles; cells(row) -> list of strings), .csv and .json."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    table = "\n".join(lines)
    with open(os.path.join(output_root, "sweep_results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(output_root, "sweep_results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(output_root, "sweep_results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print("\n" + table)
    return table
