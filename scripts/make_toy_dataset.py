#!/usr/bin/env python
"""Write a procedural object-removal data set: source/, mask/, GT/ and meta.json.

    python scripts/make_toy_dataset.py --out data/toy_train --num 2000 --resolution 32 --seed 0
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from myutils.args import POSITIVE, SEED, integer  # noqa: E402
from myutils.errors import run_cli  # noqa: E402
from toy_world.data import BACKGROUNDS, write_toy_dataset  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--num", type=POSITIVE, default=2000)
    p.add_argument("--resolution", type=integer(16), default=32)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--backgrounds", nargs="+", choices=sorted(BACKGROUNDS), default=["smooth"],
                   help="background families, drawn uniformly per sample (smooth: the original toy, where the border's "
                        "mean colour is nearly the best fill; stripes, two_tone, grid: structure across the hole)")
    args = p.parse_args(argv)
    meta = write_toy_dataset(args.out, args.num, args.resolution, args.seed, args.backgrounds)
    print(f"wrote {args.num} samples at {args.resolution}px: {meta}")


if __name__ == "__main__":
    run_cli(main)
