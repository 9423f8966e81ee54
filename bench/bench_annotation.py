#!/usr/bin/env python
"""Does a label cost more as the data grows? Milliseconds per label in the annotation app (the POST
that saves it plus the state the page loads next, through its HTTP API) at 1K, 20K and 200K items,
and each size's ratio to 1K's. Flat means a label is a journal line; 20K items used to take 475 ms a
label (38 ms at the start) while the whole scored meta.json was rewritten per label.

    .venv/bin/python bench/bench_annotation.py            # about a minute on 2 CPU cores

The items are links to three small images in the data folder (so 200K items take no disk); the start-up scan,
which opens every image once, is not what is measured and is skipped here. Writing the output file
on demand is timed too, once per size: that cost does grow with the data, and is paid when asked.
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_data(folder, num):
    from PIL import Image

    os.makedirs(os.path.join(folder, "r"), exist_ok=True)
    Image.new("RGB", (64, 64), (120, 90, 60)).save(os.path.join(folder, "source.png"))
    Image.new("L", (64, 64), 255).save(os.path.join(folder, "mask.png"))
    Image.new("RGB", (64, 64), (10, 90, 60)).save(os.path.join(folder, "result.png"))
    meta = []
    for i in range(num):
        result = os.path.join("r", f"{i}.png")
        os.symlink(os.path.join("..", "result.png"), os.path.join(folder, result))
        meta.append({"source": "source.png", "mask": "mask.png", "GT": result, "discriminator_score": (i % 10) / 10})
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def per_label_ms(folder, labels_given):
    from fastapi.testclient import TestClient

    import annotate_RORem as app_script

    app_script.scan_entries = lambda entries: [(None, None)] * len(entries)  # start-up only; not measured
    args = app_script.parse_args(["--meta_path", folder, "--annotator", "alice"])
    labels = app_script.Labels(args)
    client = TestClient(app_script.build_app(labels, args.annotator), base_url="http://127.0.0.1")
    gc.freeze()  # as main() does once the data is loaded
    for i in range(10):  # warm-up
        client.post("/api/label", json={"annotator": "warm", "index": i, "label": "good"})
    start = time.perf_counter()
    index = 0
    for _ in range(labels_given):
        r = client.post("/api/label", json={"annotator": "alice", "index": index, "label": "good"}).json()
        index = r["next"]
        client.get("/api/state", params={"annotator": "alice", "index": index})
    label = (time.perf_counter() - start) / labels_given * 1000
    start = time.perf_counter()
    labels.write("alice")
    return label, (time.perf_counter() - start) * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000, 200000])
    p.add_argument("--labels", type=int, default=200, help="labels timed per size")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = os.path.join(tmp, str(n))
            make_data(folder, n)
            rows.append((n, *per_label_ms(folder, args.labels)))
    base = rows[0][1]
    print(f"{'items':>8} {'ms/label':>9} {'vs first':>9} {'write file (ms)':>16}")
    for n, ms, write in rows:
        print(f"{n:>8} {ms:>9.2f} {ms / base:>8.2f}x {write:>16.0f}")


if __name__ == "__main__":
    main()
