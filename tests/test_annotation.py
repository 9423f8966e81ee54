"""The annotation app's parts: Cohen's kappa by hand, the journal, the files it writes (read back by
the scripts that consume them), its HTTP API, and its errors. The browser tests are in
test_annotation_browser.py."""
import json
import os
import socket

import pytest
from fastapi.testclient import TestClient

import annotate_RORem as app_script
from myutils import annotation as ann
from myutils.data import read_meta
from myutils.errors import UserError
from myutils.metrics import cohen_kappa


def test_cohen_kappa_by_hand():
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15: p_o = 0.7,
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.2 / 0.5 = 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # three labels: p_o = 3/4, p_e = (2*1 + 1*2 + 1*1) / 16 = 5/16, kappa = (12/16 - 5/16) / (11/16) = 7/11
    assert cohen_kappa(["a", "a", "b", "tie"], ["a", "b", "b", "tie"]) == pytest.approx(7 / 11)
    assert cohen_kappa(["good"] * 3, ["good"] * 3) == 1.0
    assert cohen_kappa(["good", "bad"], ["bad", "good"]) == pytest.approx(-1.0)
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        cohen_kappa(["a"], [])


def test_journal_last_label_wins_and_a_bad_line_anywhere_is_skipped_with_a_warning(tmp_path, capsys):
    path = str(tmp_path / "alice" / "journal.jsonl")
    ann.append_label(path, "x.png", "good", "alice", when="t1")
    ann.append_label(path, "y.png", "bad", "alice", when="t2")
    ann.append_label(path, "x.png", "bad", "alice", when="t3")
    with open(path, "a") as f:
        f.write('{"item": "z.png", "lab')  # a crash mid-write
    got = ann.read_journal(path)
    assert {k: (r["label"], r["time"]) for k, r in got.items()} == {"x.png": ("bad", "t3"), "y.png": ("bad", "t2")}
    assert "journal.jsonl: line 4 not a whole label record" in capsys.readouterr().err
    with open(path, "w") as f:
        f.write('{"item": "x.png", "label": "good", "annotator": "alice", "time": "t"}\nnot json\n{"item": "y.png", "label": "bad"}\n'
                '\xff\xfe\n{"item": "w.png", "label": "good", "annotator": "alice", "time": "t"}\n')
    assert sorted(ann.read_journal(path)) == ["w.png", "x.png"]
    assert "journal.jsonl: lines 2, 3, 4 not a whole label record" in capsys.readouterr().err


def test_a_journal_torn_at_every_byte_of_a_record_keeps_every_acknowledged_label(tmp_path, capsys):
    """A crash (or a full disk) can cut the last line anywhere; the labels given after it, each confirmed
    once append_label returns, are all there after a restart, and so are the whole lines before it."""
    record = (json.dumps({"item": "c.png", "label": "good", "annotator": "alice", "time": "t3"}) + "\n").encode()
    for cut in range(len(record)):
        path = str(tmp_path / f"cut{cut}" / "journal.jsonl")
        ann.append_label(path, "a.png", "good", "alice", when="t1")
        ann.append_label(path, "b.png", "bad", "alice", when="t2")
        with open(path, "ab") as f:
            f.write(record[:cut])
        ann.append_label(path, "d.png", "bad", "alice", when="t4")
        ann.append_label(path, "a.png", "skip", "alice", when="t5")
        got = {k: r["label"] for k, r in ann.read_journal(path).items()}
        whole = {"c.png": "good"} if cut == len(record) - 1 else {}  # all but its newline: a whole record after all
        assert got == {"a.png": "skip", "b.png": "bad", "d.png": "bad", **whole}, (cut, open(path, "rb").read())
    capsys.readouterr()


def test_agreement_between_annotators_and_with_the_discriminator():
    items = {f"{i}.png": {"discriminator_score": s} for i, s in enumerate([0.9, 0.8, 0.2, 0.1, 0.7, 0.4])}
    alice = ["good", "good", "bad", "bad", "good", "skip"]
    bob = ["good", "bad", "bad", "bad", "bad", "good"]
    journals = {n: {f"{i}.png": {"label": lab} for i, lab in enumerate(labels)} for n, labels in (("alice", alice), ("bob", bob))}
    report = ann.agreement(journals, items, "score")
    assert report["labelled"] == {"alice": 5, "bob": 6}
    # both labelled items 0-4 (alice skipped 5): alice g g b b g, bob g b b b b: p_o 3/5,
    # p_e = 3/5 * 1/5 + 2/5 * 4/5 = 11/25, kappa = (15/25 - 11/25) / (14/25) = 4/14
    (pair,) = report["annotators"]
    assert (pair["items"], pair["agreement"]) == (5, pytest.approx(0.6))
    assert pair["kappa"] == pytest.approx(4 / 14)
    # the discriminator at 0.5 says g g b b g b: alice agrees on all 5 she gave, bob on 3 of 6 (items 0, 2, 3)
    assert report["discriminator"]["alice"]["agreement"] == 1.0
    assert report["discriminator"]["bob"]["agreement"] == pytest.approx(3 / 6)
    lines = ann.agreement_lines(report)
    assert "alice vs bob: 5 items both labelled, agreement 60.0%, Cohen's kappa 0.286" in lines
    # pairs: the reward recorded at export decides the discriminator's side
    pair_items = {"p0": {"reward_a": 1.0, "reward_b": 0.0}, "p1": {"reward_a": 0.0, "reward_b": 1.0}}
    rep = ann.agreement({"alice": {"p0": {"label": "a"}, "p1": {"label": "a"}}}, pair_items, "pairs")
    assert rep["discriminator"]["alice"]["agreement"] == 0.5


@pytest.fixture
def results_meta(tmp_path, toy_meta):
    """A results meta.json (source, mask, GT = result) of 6 toy entries with discriminator scores, in
    its own folder, with relative paths as inference_RORem.py writes them."""
    entries = read_meta(toy_meta, "triplet")[:6]
    folder = tmp_path / "results"
    folder.mkdir()
    meta = [{"source": os.path.relpath(e.paths["source"], folder), "mask": os.path.relpath(e.paths["mask"], folder),
             "GT": os.path.relpath(e.paths["GT"], folder), "discriminator_score": 0.2 * i} for i, e in enumerate(entries)]
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "meta.json"


def _client(*argv):
    args = app_script.parse_args([str(a) for a in argv])
    labels = app_script.Labels(args)
    return labels, TestClient(app_script.build_app(labels, args.annotator), base_url="http://127.0.0.1:7860")


def test_score_mode_writes_a_scored_meta_the_scripts_read_and_resumes_after_a_restart(results_meta):
    labels, client = _client("--meta_path", results_meta.parent, "--annotator", "alice")
    state = client.get("/api/state", params={"annotator": "alice"}).json()
    assert (state["mode"], state["total"], state["done"], state["item"]["index"]) == ("score", 6, 0, 0)
    assert [im["name"] for im in state["item"]["images"]] == ["source", "mask", "result"]
    # the image served is the entry's file, byte for byte
    entry = read_meta(str(results_meta), "triplet")[0]
    assert client.get("/file/0/2").content == open(entry.paths["GT"], "rb").read()
    for i, label in enumerate(["good", "bad", "skip"]):
        r = client.post("/api/label", json={"annotator": "alice", "index": i, "label": label})
        assert r.status_code == 200 and r.json()["next"] == i + 1
    out = results_meta.parent / "annotations" / "alice" / "meta.json"
    assert not out.exists()  # a label goes to the journal only (its cost does not grow with the data)
    assert client.post("/api/write", json={"annotator": "alice"}).json() == {"written": [str(out)]}
    scored = read_meta(str(out), "scored")  # what train_RORem_discriminator.py and build_preference_pairs.py read
    assert [e.score for e in scored] == [1.0, 0.0]  # the skip is left out
    assert [e.paths["GT"] for e in scored] == [e.paths["GT"] for e in read_meta(str(results_meta), "triplet")[:2]]
    assert scored[1].extra["discriminator_score"] == pytest.approx(0.2) and scored[0].extra["annotator"] == "alice"
    # a bad label is refused with a message and changes nothing
    r = client.post("/api/label", json={"annotator": "alice", "index": 3, "label": "great"})
    assert r.status_code == 400 and r.json()["error"] == "label 'great': one of good, bad, skip in score mode"
    assert len(open(ann.journal_path(str(results_meta.parent / "annotations"), "alice")).readlines()) == 3
    # a restart (a new server on the same files) resumes at the first unlabelled item; relabelling wins
    labels2, client2 = _client("--meta_path", results_meta, "--annotator", "alice")
    state = client2.get("/api/state", params={"annotator": "alice"}).json()
    assert (state["done"], state["item"]["index"]) == (3, 3)
    client2.post("/api/label", json={"annotator": "alice", "index": 1, "label": "good"})
    labels2.write()
    assert [e.score for e in read_meta(str(out), "scored")] == [1.0, 1.0]
    # another annotator starts at the beginning, in their own files
    assert client2.get("/api/state", params={"annotator": "bob"}).json()["item"]["index"] == 0


def test_only_the_data_files_are_served_and_names_are_checked(results_meta):
    _, client = _client("--meta_path", results_meta)
    assert client.get("/file/6/0").status_code == 404
    assert client.get("/file/0/3").status_code == 404
    assert client.get("/file/0/..%2F..%2Fmeta.json").status_code in (404, 422)
    assert client.get("/meta.json").status_code == 404
    r = client.post("/api/label", json={"annotator": "../evil", "index": 0, "label": "good"})
    assert r.status_code == 400 and "annotator '../evil'" in r.json()["error"]
    assert not os.path.exists(results_meta.parent / "evil")
    assert app_script.parse_args(["--meta_path", "x"]).host == "127.0.0.1"


def _one_line_error(capsys, *argv):
    """The app's command line fails with exit code 2 and one `error: ...` line, which is returned."""
    with pytest.raises(SystemExit) as e:
        app_script.run_cli(lambda: app_script.main([str(a) for a in argv]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path, results_meta, capsys):
    def fails(*argv):
        return _one_line_error(capsys, *argv)

    assert fails("--meta_path", tmp_path) == f"error: {tmp_path}: a folder without meta.json"
    assert fails("--pairs_path", tmp_path / "nope.json") == f"error: {tmp_path / 'nope.json'}: file not found"
    (tmp_path / "pairs.json").write_text('{"not": "pairs"}')
    assert "not a pairs.json written by --export_pairs" in fails("--pairs_path", tmp_path)
    assert "annotator 'a b'" in fails("--meta_path", results_meta, "--annotator", "a b")


def test_an_item_whose_file_is_missing_is_shown_as_a_problem_and_can_be_skipped(results_meta):
    meta = json.loads(results_meta.read_text())
    meta[2]["GT"] = "gone.png"
    results_meta.write_text(json.dumps(meta))
    _, client = _client("--meta_path", results_meta)
    item = client.get("/api/state", params={"annotator": "alice", "index": 2}).json()["item"]
    assert "'GT' file not found" in item["problem"]
    assert client.post("/api/label", json={"annotator": "alice", "index": 2, "label": "skip"}).status_code == 200


def test_report_prints_the_agreement(results_meta, capsys):
    root = results_meta.parent / "annotations"
    for who, labels in (("alice", ["good", "bad", "good"]), ("bob", ["good", "good", "good"])):
        for i, label in enumerate(labels):
            key = os.path.relpath(read_meta(str(results_meta), "triplet")[i].paths["GT"], results_meta.parent)
            ann.append_label(ann.journal_path(str(root), who), key, label, who)
    app_script.main(["--meta_path", str(results_meta), "--report"])
    out = capsys.readouterr().out
    # p_o 2/3; alice g b g (2/3 good), bob g g g: p_e = 2/3, kappa 0
    assert "alice vs bob: 3 items both labelled, agreement 66.7%, Cohen's kappa 0.000" in out
    # discriminator scores 0, 0.2, 0.4: all bad at 0.5; alice agrees on 1 of 3
    assert "alice vs the discriminator: 3 items, agreement 33.3%" in out


def test_annotators_at_once_lose_nothing(results_meta):
    """Labels arrive on the server's worker threads: alice in two tabs at once, bob and carol beside her,
    and a write on demand meanwhile; every label is in each one's journal and output. The count of labels
    given is read slowly here (a read-modify-write window of 10 ms), so without the lock a label's count is
    lost and alice's output is never completed."""
    import threading
    import time

    class SlowReads(dict):
        def get(self, *a):
            value = super().get(*a)
            time.sleep(0.01)
            return value

    labels, client = _client("--meta_path", results_meta)
    labels.done = SlowReads(labels.done)
    errors, start = [], threading.Barrier(5)

    def annotate(who, items):
        try:
            start.wait()
            for i in items:
                client.post("/api/label", json={"annotator": who, "index": i, "label": "good" if i % 2 else "bad"}).raise_for_status()
                client.get("/api/state", params={"annotator": who}).raise_for_status()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def write():
        start.wait()
        for _ in range(5):
            labels.write()

    threads = [threading.Thread(target=annotate, args=a) for a in (("alice", [0, 1, 2]), ("alice", [3, 4, 5]),
                                                                   ("bob", range(6)), ("carol", range(6)))]
    threads.append(threading.Thread(target=write))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    root = str(results_meta.parent / "annotations")  # the last label of each wrote its file (every item labelled)
    for who in ("alice", "bob", "carol"):
        assert len(open(ann.journal_path(root, who)).readlines()) == 6
        assert [e.score for e in read_meta(os.path.join(root, who, "meta.json"), "scored")] == [0, 1, 0, 1, 0, 1]
    assert labels.report()["annotators"][0]["kappa"] == 1.0


def test_a_torn_journal_never_stops_the_server_and_the_label_after_it_survives_a_restart(results_meta, capsys):
    labels, client = _client("--meta_path", results_meta, "--annotator", "alice")
    for i in range(3):
        client.post("/api/label", json={"annotator": "alice", "index": i, "label": "good"}).raise_for_status()
    journal = ann.journal_path(labels.output_dir, "alice")
    with open(journal, "ab") as f:
        f.write(b'{"item": "x", "lab')  # the server died mid-write
    labels, client = _client("--meta_path", results_meta, "--annotator", "alice")  # restarts, with a warning
    assert "line 4 not a whole label record" in capsys.readouterr().err
    for i in (3, 4):
        client.post("/api/label", json={"annotator": "alice", "index": i, "label": "bad"}).raise_for_status()
    with open(journal, "ab") as f:
        f.write(b'{"item"')  # and again
    labels, client = _client("--meta_path", results_meta, "--annotator", "alice")
    state = client.get("/api/state", params={"annotator": "alice"}).json()
    assert (state["done"], state["item"]["index"]) == (5, 5)
    app_script.main(["--meta_path", str(results_meta), "--export"])  # the scored file, as data_round and --report read it
    scored = read_meta(os.path.join(labels.output_dir, "alice", "meta.json"), "scored")
    assert [e.score for e in scored] == [1, 1, 1, 0, 0]


def test_two_entries_with_one_result_are_refused_with_their_positions(results_meta):
    meta = json.loads(results_meta.read_text())
    meta[4]["GT"] = meta[1]["GT"]  # another input, the same result file: one label would mark both
    results_meta.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"meta.json: entries 1 and 4 have the same '.*'; each needs its own"):
        _client("--meta_path", results_meta)


def test_only_images_in_the_data_folders_are_served_however_the_data_names_them(results_meta, tmp_path):
    """Absolute paths, ../, a linked file and a linked folder: a file goes out only when the data names it,
    it was an image at start and still is, and its real location is in the data's folders."""
    from PIL import Image

    outside = tmp_path / "private"
    outside.mkdir()
    size = Image.open(read_meta(str(results_meta), "triplet")[3].paths["source"]).size
    Image.new("RGB", size, (1, 2, 3)).save(outside / "photo.png")
    (outside / "secret.txt").write_text("password")
    data = results_meta.parent
    os.symlink(outside / "photo.png", data / "linked.png")
    os.symlink(outside, data / "linked_folder")
    meta = json.loads(results_meta.read_text())
    meta[1]["GT"] = str(outside / "secret.txt")  # an absolute path to a file that is not an image
    meta[2]["source"] = os.path.relpath(outside / "secret.txt", data)  # the same through ../
    meta[3]["GT"] = "linked.png"  # an image, but really outside the data
    meta[4]["GT"] = "linked_folder/secret.txt"
    results_meta.write_text(json.dumps(meta))
    labels, client = _client("--meta_path", results_meta)
    assert client.get("/file/0/2").status_code == 200
    for index in (1, 2, 3, 4):
        for which in (0, 1, 2):
            r = client.get(f"/file/{index}/{which}")
            assert r.status_code == 404 and b"password" not in r.content, (index, which)
    assert "not a readable image" in labels.problems[labels.keys[1]]
    assert "outside the data's folders" in labels.problems[labels.keys[3]]
    # the user can widen the folders: the linked image is then served
    _, wider = _client("--meta_path", results_meta, "--data_root", outside)
    assert wider.get("/file/3/2").content == open(outside / "photo.png", "rb").read()
    # a file that was an image at the start and is not one now is not sent
    entry = read_meta(str(results_meta), "triplet")[0]
    os.replace(entry.paths["GT"], str(tmp_path / "kept.png"))
    with open(entry.paths["GT"], "w") as f:
        f.write("password")
    try:
        r = client.get("/file/0/2")
        assert r.status_code == 404 and b"password" not in r.content
    finally:
        os.replace(str(tmp_path / "kept.png"), entry.paths["GT"])


def test_only_the_host_names_the_server_was_started_for_are_answered(results_meta):
    labels, client = _client("--meta_path", results_meta)
    for host, code in (("127.0.0.1:7860", 200), ("localhost:7860", 200), ("evil.example", 400), ("evil.example:7860", 400),
                       ("127.0.0.1.evil.example", 400)):
        assert client.get("/api/agreement", headers={"Host": host}).status_code == code, host
        assert client.get("/file/0/0", headers={"Host": host}).status_code == code, host
    from myutils.web import allowed_hosts

    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "::1", "localhost"]
    everywhere = allowed_hosts("0.0.0.0", ["tunnel.example"])
    assert "tunnel.example" in everywhere and socket.gethostname().lower() in everywhere


def test_a_label_costs_the_same_however_many_items_there_are(results_meta, monkeypatch):
    """A label is one journal line: the output file (4.9 MB at 20K items) is not rewritten per label but
    when asked, when the last item is labelled, and when the server starts and stops."""
    labels, client = _client("--meta_path", results_meta, "--annotator", "alice")
    writes = []
    real = ann.write_json_atomic
    monkeypatch.setattr(ann, "write_json_atomic", lambda path, obj: (writes.append(path), real(path, obj)))
    for i in range(5):
        client.post("/api/label", json={"annotator": "alice", "index": i, "label": "good"}).raise_for_status()
    assert writes == []
    client.post("/api/label", json={"annotator": "alice", "index": 5, "label": "bad"}).raise_for_status()
    assert writes == [os.path.join(labels.output_dir, "alice", "meta.json")]  # all six labelled


def test_server_errors_are_one_line_before_anything_is_loaded(results_meta, tmp_path, capsys):
    def fails(*argv):
        return _one_line_error(capsys, *argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "in use" in fails("--meta_path", results_meta, "--port", port)
    (tmp_path / "a_file").write_text("")
    assert fails("--meta_path", results_meta, "--output_dir", tmp_path / "a_file", "--port", port) == \
        f"error: --output_dir {tmp_path / 'a_file'}: a file, not a folder"
    assert "not a folder" in fails("--meta_path", results_meta, "--data_root", tmp_path / "nope")


def test_a_label_is_on_disk_before_append_label_returns(tmp_path, monkeypatch):
    """"Saved the moment it is given": the journal's bytes are flushed and fsynced on the journal's own
    file before the call returns (a power cut after the HTTP 200 keeps the label)."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = str(tmp_path / "alice" / "journal.jsonl")
    ann.append_label(path, "x.png", "good", "alice", when="t")
    assert synced == [(path, os.path.getsize(path))]  # the whole line was written when it was synced


def test_the_discriminator_says_good_at_its_threshold_exactly():
    assert ann.discriminator_label({"discriminator_score": 0.5}, "score", 0.5) == "good"
    assert ann.discriminator_label({"discriminator_score": 0.4999}, "score", 0.5) == "bad"
    assert ann.discriminator_label({}, "score", 0.5) is None
