"""The annotation app as a person uses it: a real headless chromium, keys and clicks, a restart in
the middle of a session, a second annotator, and a pairwise round whose labels then train.
Screenshots of each page go to test_screenshots/."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import annotate_RORem as app_script
import train_RORem_ddpo as tddpo
from conftest import SCREENSHOTS
from myutils.data import read_meta
from test_annotation import results_meta  # noqa: F401 (fixture)
from test_train_ddpo import PAIRWISE, _args, _label_by_reward


def _start(serve, *argv):
    args = app_script.parse_args([str(a) for a in argv])
    return serve(app_script.build_app(app_script.Labels(args), args.annotator))


def _press(page, key, done_before):
    """Press a label key and wait until the page says the label is saved and shows the next item."""
    page.keyboard.press(key)
    page.wait_for_function(f"(t => t.startsWith('{done_before + 1} /') || t.startsWith('all '))"
                           "(document.querySelector('#progress').textContent)")
    assert page.text_content("#status").startswith("saved")


def test_a_score_session_with_keys_clicks_a_restart_and_two_annotators(browser, serve, results_meta):  # noqa: F811
    url, stop = _start(serve, "--meta_path", results_meta, "--annotator", "alice")
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("figure img")
    assert [c.text_content() for c in page.query_selector_all("figcaption")] == ["source", "mask", "result"]
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")  # the images load
    page.screenshot(path=os.path.join(SCREENSHOTS, "annotate_score_start.png"), full_page=True)
    for done, key in enumerate("gbs"):
        _press(page, key, done)
    page.click("figure img")  # zoom in, for a look at the result
    assert page.evaluate("document.body.classList.contains('zoomed')")
    page.screenshot(path=os.path.join(SCREENSHOTS, "annotate_score_zoomed.png"), full_page=True)
    out = results_meta.parent / "annotations" / "alice" / "meta.json"
    page.keyboard.press("w")  # the file is written when asked (a label only goes to the journal)
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('written')")
    assert [e.score for e in read_meta(str(out), "scored")] == [1.0, 0.0]

    stop()  # the server goes down mid-session; a new one starts on the same files
    url, _ = _start(serve, "--meta_path", results_meta, "--annotator", "alice")
    page.goto(url)
    page.wait_for_function("document.querySelector('#progress').textContent.includes('item 4')")
    assert page.text_content("#progress").startswith("3 / 6 labelled")
    page.click("button[data-label=good]")
    page.wait_for_function("document.querySelector('#progress').textContent.startsWith('4 /')")
    _press(page, "b", 4)
    _press(page, "g", 5)
    page.wait_for_function("document.querySelector('#progress').textContent === 'all 6 items labelled'")
    assert [e.score for e in read_meta(str(out), "scored")] == [1.0, 0.0, 1.0, 0.0, 1.0]  # written at the last item
    page.screenshot(path=os.path.join(SCREENSHOTS, "annotate_score_done.png"), full_page=True)

    # a second annotator on the same server: the page reports their agreement
    bob = browser.new_page()
    bob.goto(f"{url}/?annotator=bob")
    bob.wait_for_selector("figure img")
    for done, key in enumerate("gggggg"):
        _press(bob, key, done)
    bob.wait_for_function("document.querySelector('#agreement').textContent.includes('alice vs bob')")
    text = bob.text_content("#agreement")
    # alice g b (skip) g b g, bob g g g g g g on the 5 both gave: agreement 3/5, kappa 0 (bob never varies)
    assert "alice vs bob: 5 items both labelled, agreement 60.0%, Cohen's kappa 0.000" in text
    # discriminator scores 0, 0.2, ..., 1.0: b b b g g g; alice g b - g b g agrees on items 1, 3 and 5:
    # p_o 3/5, both 3/5 good, p_e = 0.36 + 0.16 = 0.52, kappa = 0.08 / 0.48
    assert "alice vs the discriminator: 5 items, agreement 60.0%, kappa 0.167" in text
    bob.screenshot(path=os.path.join(SCREENSHOTS, "annotate_score_agreement.png"), full_page=True)


def test_keys_pressed_faster_than_labels_are_saved_are_all_given_in_order(browser, serve, results_meta):  # noqa: F811
    url, _ = _start(serve, "--meta_path", results_meta, "--annotator", "carol")
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("figure img")
    for key in "gbgbbgg":  # at once: one more than there are items
        page.keyboard.press(key)
    page.wait_for_function("document.querySelector('#progress').textContent === 'all 6 items labelled'")
    page.wait_for_function("document.querySelector('#status').textContent.includes('dropped')")
    assert "1 key(s) dropped: every item is labelled" in page.text_content("#status")
    journal = results_meta.parent / "annotations" / "carol" / "journal.jsonl"
    assert [json.loads(line)["label"] for line in journal.read_text().splitlines()] == ["good", "bad", "good", "bad", "bad", "good"]


def test_a_pairwise_round_labelled_in_the_browser_trains(browser, serve, tmp_path, tiny_model_dir, toy_meta, run_script):
    """Export pairs, label them in the page by their recorded reward (as a person would by eye), train
    with --pair_labels on the app's file: the LoRA equals one trained on the same labels written into
    pairs.json by hand."""
    pairs_dir, out = tmp_path / "pairs", tmp_path / "run"
    run_script(tddpo, _args(tiny_model_dir, toy_meta, str(out), *PAIRWISE, "--export_pairs", pairs_dir))
    url, _ = _start(serve, "--pairs_path", pairs_dir, "--annotator", "alice")
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("figure img")
    assert page.text_content("figcaption") == "source | mask | a | b"
    page.screenshot(path=os.path.join(SCREENSHOTS, "annotate_pairs.png"), full_page=True)
    doc = json.loads((pairs_dir / "pairs.json").read_text())
    for done, pair in enumerate(doc["pairs"]):
        _press(page, "a" if pair["reward_a"] > pair["reward_b"] else "b" if pair["reward_b"] > pair["reward_a"] else "t", done)
    labelled = json.loads((pairs_dir / "pairs-alice.json").read_text())
    assert all(p["annotator"] == "alice" and p["label"] in ("a", "b", "tie") for p in labelled["pairs"])

    by_hand = tmp_path / "by_hand"
    shutil.copytree(out, by_hand)
    run_script(tddpo, _args(tiny_model_dir, toy_meta, str(out), *PAIRWISE, "--pair_labels", pairs_dir / "pairs-alice.json",
                            "--resume_from_checkpoint", "latest"))
    _label_by_reward(pairs_dir / "pairs.json")
    run_script(tddpo, _args(tiny_model_dir, toy_meta, str(by_hand), *PAIRWISE, "--pair_labels", pairs_dir / "pairs.json",
                            "--resume_from_checkpoint", "latest"))
    a = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(by_hand, "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.fixture(autouse=True)
def _fresh_pages(browser):
    yield
    for context in browser.contexts:
        for page in context.pages:
            page.close()
