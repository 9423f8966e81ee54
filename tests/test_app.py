"""The interactive remover (app_RORem.py): its removals equal the inference scripts' on the same input
and seed (full sampler, and 4 steps with the LCM LoRA switched on and off again), its score equals
the scoring script's, and a person's session in a real browser: upload, paint, choose, remove,
download."""
import os
import socket

import numpy as np
import pytest
from PIL import Image

import app_RORem as app
from myutils.errors import UserError
from test_rorem_files import rorem_lcm_lora  # noqa: F401 (fixture)


def _inputs(folder):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 12, 40, 32))
    image.save(folder / "in.png")
    mask.save(folder / "m.png")
    return image, mask


@pytest.fixture(scope="module")
def remover(tiny_model_dir, rorem_lcm_lora, disc_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("app_results")
    args = app.parse_args(["--pretrained_model", tiny_model_dir, "--lcm_lora", rorem_lcm_lora, "--RORem_discriminator", disc_dir,
                           "--resolution", "32", "--inference_steps", "6", "--output_dir", str(out)])
    return app.Remover(args)


def test_mask_from_the_editor_is_every_painted_pixel():
    background = Image.new("RGB", (8, 6), (10, 20, 30))
    a, b = Image.new("RGBA", (8, 6), (0, 0, 0, 0)), Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    a.putpixel((1, 1), (255, 0, 0, 255))
    b.putpixel((5, 4), (0, 0, 0, 40))  # faint paint counts too
    mask = np.asarray(app.mask_from_editor({"background": background, "layers": [a, b, None]}))
    assert mask.shape == (6, 8) and sorted(zip(*np.nonzero(mask))) == [(1, 1), (4, 5)] and mask.max() == 255
    with pytest.raises(UserError, match="upload an image first"):
        app.mask_from_editor({"background": None, "layers": []})


def test_removals_equal_the_inference_scripts(remover, tiny_model_dir, rorem_lcm_lora, disc_dir, tmp_path):  # noqa: F811
    import inference_RORem
    import inference_RORem_4S
    import inference_RORem_discriminator

    image, mask = _inputs(tmp_path)
    common = ["--pretrained_model", tiny_model_dir, "--image_path", tmp_path / "in.png", "--mask_path", tmp_path / "m.png",
              "--resolution", "32", "--seed", "5"]
    inference_RORem_4S.main([str(a) for a in common + ["--RORem_LoRA", rorem_lcm_lora, "--save_path", tmp_path / "four.png"]])
    inference_RORem.main([str(a) for a in common + ["--inference_steps", "6", "--save_path", tmp_path / "full.png"]])
    four, four_path, four_score = remover.remove(image, mask, app.FOUR, 5)
    full, full_path, _ = remover.remove(image, mask, app.FULL, 5)  # after a 4-step call: the LCM adapter is off again
    arr = lambda im: np.asarray(im, dtype=float)  # noqa: E731
    assert four.size == full.size == image.size
    assert np.array_equal(arr(full), arr(Image.open(tmp_path / "full.png")))
    # the script fuses the LoRA, the app keeps it as an adapter: the same up to rounding
    assert np.abs(arr(four) - arr(Image.open(tmp_path / "four.png"))).max() <= 2
    assert np.abs(arr(four) - arr(full)).max() > 10
    outside = arr(mask) < 128
    assert np.array_equal(arr(four)[outside], arr(image)[outside])  # pasted back
    assert np.array_equal(arr(Image.open(four_path)), arr(four)) and "4step-seed5" in four_path
    four.save(tmp_path / "four_app.png")
    scores = inference_RORem_discriminator.main([
        "--pretrained_model", tiny_model_dir, "--RORem_discriminator", disc_dir, "--image_path", str(tmp_path / "in.png"),
        "--mask_path", str(tmp_path / "m.png"), "--edited_path", str(tmp_path / "four_app.png"), "--resolution", "32"])
    assert four_score == pytest.approx(scores[0], abs=1e-5)


def test_removal_errors_are_messages(remover, tmp_path):
    image, _ = _inputs(tmp_path)
    with pytest.raises(UserError, match="paint over the object"):
        remover.remove(image, Image.new("L", image.size, 0), app.FULL, 0)
    remover_without_lcm = object.__new__(app.Remover)
    remover_without_lcm.lcm_scheduler, remover_without_lcm.args = None, remover.args
    with pytest.raises(UserError, match="start it with --lcm_lora for 4-step removal"):
        app.Remover.remove(remover_without_lcm, image, Image.new("L", image.size, 255), app.FOUR, 0)


def test_uploads_and_seeds_the_queue_should_not_take_each_get_their_own_message(remover, tmp_path, monkeypatch):
    import gradio as gr
    from gradio.data_classes import FileData

    long = Image.new("RGB", (3, 500))  # ran 13+ minutes at 64 x 10,664 px
    with pytest.raises(UserError, match=r"^the image: 3x500 px: one side is 166.7 times the other \(at most 4"):
        remover.remove(long, Image.new("L", long.size, 255), app.FULL, 0)
    big = Image.new("RGB", (remover.args.max_side + 8, 4000))
    with pytest.raises(UserError, match=rf"^the image is {remover.args.max_side + 8}x4000 px: at most {remover.args.max_side} px"):
        remover.remove(big, Image.new("L", big.size, 255), app.FULL, 0)
    monkeypatch.setattr(app.time, "strftime", lambda fmt: "20261207-120000")  # the same removal twice in one second
    small, small_mask = _inputs(tmp_path)
    paths = [remover.remove(small, small_mask, app.FOUR, 3)[1] for _ in range(2)]
    assert paths[0] != paths[1] and all(os.path.isfile(p) for p in paths)  # both kept
    for seed in (1.5, 2 ** 70, -1, float("nan"), "7", True):
        with pytest.raises(UserError, match=r"^seed .*: a whole number from 0 to 4294967295$"):
            app.seed_of(seed)
    assert app.seed_of(7.0) == 7 and isinstance(app.seed_of(7.0), int)
    # what Gradio decodes before our function runs: a file that is not an image, and a decompression bomb
    (tmp_path / "notes.png").write_text("not an image")
    component = app.readable_uploads(gr.Image(type="pil", image_mode="L"), "the mask")
    with pytest.raises(gr.Error, match="the mask is not an image this app can read"):
        component.preprocess(FileData(path=str(tmp_path / "notes.png")))
    Image.new("L", (40, 40)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # past twice the limit: Pillow refuses it
    with pytest.raises(gr.Error, match="the mask has more than 0 million pixels"):
        component.preprocess(FileData(path=str(tmp_path / "bomb.png")))


def test_the_app_answers_only_its_own_host_names_and_says_when_its_port_is_taken(remover, capsys):
    from fastapi.testclient import TestClient

    from myutils.web import allowed_hosts

    client = TestClient(app.build_server(remover, allowed_hosts("127.0.0.1")), base_url="http://127.0.0.1:7860")
    assert client.get("/").status_code == 200
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/config", headers={"Host": "evil.example:7860"}).status_code == 400
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit):  # before any model is loaded
            app.run_cli(lambda: app.main(["--pretrained_model", "nowhere", "--port", str(port)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --host 127.0.0.1 --port {port}: in use (another server? give --port)"]
    taken = os.path.join(remover.output_dir, "a_file")
    open(taken, "w").close()
    with pytest.raises(UserError, match=r"^--output_dir .*a_file: a file, not a folder$"):  # at parsing: before the models load
        app.parse_args(["--output_dir", taken])


def test_a_removal_in_the_browser(browser, serve, remover, tmp_path):
    from conftest import SCREENSHOTS
    from myutils.web import allowed_hosts

    image, _ = _inputs(tmp_path)
    image.resize((256, 192), Image.NEAREST).save(tmp_path / "upload.png")
    url, stop = serve(app.build_server(remover, allowed_hosts("127.0.0.1")))  # as main() serves it
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{url}/")
        page.wait_for_selector("#editor canvas")
        zoom = "Array.from(document.querySelectorAll('#editor *')).map(e => e.childElementCount ? '' : e.textContent)" \
               ".find(t => /^\\d+%$/.test(t.trim()))"
        empty = page.evaluate(zoom)  # the empty canvas's zoom; the upload changes it
        page.set_input_files("#editor input[type=file]", str(tmp_path / "upload.png"), timeout=60000)
        page.wait_for_function(f"({zoom}) !== {empty!r}")
        page.click("#editor button[aria-label=Brush]")
        box = page.query_selector("#editor canvas").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 20, cy - 20)
        page.mouse.down()
        page.mouse.move(cx + 20, cy + 20, steps=8)
        page.mouse.up()
        page.click("text=4 steps (LCM)")
        page.fill("#seed input", "7")
        page.screenshot(path=os.path.join(SCREENSHOTS, "app_painted.png"))
        page.click("#remove")
        page.wait_for_selector("#download a", timeout=60000)
        page.wait_for_function("document.querySelector('#score').textContent.includes('discriminator score')")
        page.screenshot(path=os.path.join(SCREENSHOTS, "app_result.png"))
        href = page.get_attribute("#download a", "href")
        assert "4step-seed7" in href
        saved = [f for f in os.listdir(remover.output_dir) if "4step-seed7" in f]
        assert len(saved) == 1
        result = np.asarray(Image.open(os.path.join(remover.output_dir, saved[0])), dtype=float)
        source = np.asarray(Image.open(tmp_path / "upload.png").convert("RGB"), dtype=float)
        assert result.shape == source.shape  # the upload's own size
        changed = np.abs(result - source).max(-1) > 0
        # only the painted stroke (a diagonal round the centre) changed; the corners are untouched
        assert changed[80:112, 112:144].any() and not changed[:40].any() and not changed[-40:].any()
    finally:
        stop()
