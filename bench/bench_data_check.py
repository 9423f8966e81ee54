#!/usr/bin/env python
"""How long the data check takes before training on 200K entries, first and on a restart.

    .venv/bin/python bench/bench_data_check.py        # about a minute on 2 CPU cores

A synthetic meta.json of --entries triplets stored like RORem's (512 px JPEG source and result, RGB
PNG mask), drawn from a pool of --pool distinct files (so the files stay in the page cache: a cold
network filesystem is slower). Measured here: the check's entries/s in one process with 1 and 2
threads on --sample entries, and one rank's share of the fingerprint that lets a restart skip the
check (stat calls only), in full. The first check on a node is the per-core rate times the
cores the ranks use (each of --ranks ranks checks 1/ranks of the entries in --threads threads), which
is what myutils/prepare.load_entries does; the 2-thread row here shows how far threads scale.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=200_000)
    p.add_argument("--pool", type=int, default=256, help="distinct triplets the entries point to")
    p.add_argument("--sample", type=int, default=1500, help="entries checked for the rate")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--ranks", type=int, default=8, help="ranks of a node, each checking its share")
    p.add_argument("--threads", type=int, default=8, help="threads per rank (one core each assumed)")
    args = p.parse_args(argv)
    from bench_data import write_rorem_like

    from myutils.data import entry_digests, fingerprint, read_meta, scan_entries

    with tempfile.TemporaryDirectory() as work:
        pool_meta = write_rorem_like(os.path.join(work, "pool"), args.pool, args.resolution)
        rows = json.load(open(pool_meta))
        meta = os.path.join(work, "pool", "big.json")
        with open(meta, "w") as f:
            json.dump([rows[i % len(rows)] for i in range(args.entries)], f)
        t = time.perf_counter()
        entries = read_meta(meta, "triplet")
        read_s = time.perf_counter() - t
        rates = {}
        for threads in (1, 2):
            scan_entries(entries[:64], num_workers=threads)  # warm the page cache
            t = time.perf_counter()
            found = scan_entries(entries[:args.sample], num_workers=threads)
            rates[threads] = args.sample / (time.perf_counter() - t)
            assert not any(p for p, _ in found)
        t = time.perf_counter()
        share = entry_digests(entries[:args.entries // args.ranks])  # one rank's share, as load_entries splits it
        fp_s = time.perf_counter() - t
        t = time.perf_counter()
        fingerprint("triplet", share * args.ranks)
        fp_s += time.perf_counter() - t
    cores = args.ranks * args.threads
    first = args.entries / (rates[1] * cores)
    print(f"{args.entries} entries ({args.resolution} px JPEG/PNG triplets), read from meta.json in {read_s:.1f} s")
    print(f"check rate, one process: 1 thread {rates[1]:.0f} entries/s ({1000 / rates[1]:.1f} ms each), 2 threads {rates[2]:.0f} "
          f"({rates[2] / rates[1]:.2f}x)")
    print("| what | seconds for all entries |\n|---|---|")
    print(f"| first check, one process, one thread (the old rank-0 check was 8 threads of one process) | {args.entries / rates[1]:.0f} |")
    print(f"| first check, {args.ranks} ranks x {args.threads} threads ({cores} cores at this per-core rate) | {first:.0f} |")
    print(f"| restart, {args.ranks} ranks: fingerprint (each rank stats {3 * args.entries // args.ranks} files), the check skipped | "
          f"{fp_s:.1f} |")
    return {"rate_1": rates[1], "rate_2": rates[2], "first_node_s": first, "fingerprint_s": fp_s}


if __name__ == "__main__":
    main()
