"""Shared tiny fixtures, built once per pytest session: a tiny SDXL-inpainting pipeline folder and
a small toy data set. Training scripts run in this process through their main(argv)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app's tests phone nowhere


SHARED = {}  # folder of a session fixture -> its files' (size, mtime) when it was built


def _fingerprint(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def shared(folder):
    """Register a session fixture's folder: every test after its build is checked not to change it."""
    SHARED[str(folder)] = _fingerprint(folder)
    return folder


@pytest.fixture(autouse=True)
def shared_fixtures_unchanged():
    """Fails the test that changed a session fixture (a file written, removed or rewritten), so no test
    sees other data in a full run than alone. A test that needs to change data copies it first."""
    yield
    for folder, before in SHARED.items():
        now = _fingerprint(folder)
        if now != before:
            changed = sorted(set(now) ^ set(before) | {k for k in now.keys() & before.keys() if now[k] != before[k]})
            SHARED[folder] = now  # reported once, by the test that did it
            pytest.fail(f"this test changed the shared fixture {folder}: {', '.join(changed[:5])}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from toy_world.models import tiny_pipeline

    out = tmp_path_factory.mktemp("tiny_model")
    tiny_pipeline("epsilon", image_size=32, tmp_dir=str(out / "tok")).save_pretrained(str(out / "pipe"))
    return shared(str(out / "pipe"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny random-init FLUX.1-Fill pipeline folder (32 px images: 4x4 latents, 4 tokens)."""
    from toy_world.models import tiny_flux_fill_pipeline

    out = tmp_path_factory.mktemp("tiny_flux")
    tiny_flux_fill_pipeline(image_size=32, tmp_dir=str(out / "tok")).save_pretrained(str(out / "pipe"))
    return shared(str(out / "pipe"))


@pytest.fixture(scope="session")
def toy_meta(tmp_path_factory):
    from toy_world.data import write_toy_dataset

    folder = str(tmp_path_factory.mktemp("toy"))
    meta = write_toy_dataset(folder, num=12, resolution=32, seed=0)
    shared(folder)
    return meta


@pytest.fixture(scope="session")
def disc_dir(tmp_path_factory, tiny_model_dir):
    """An untrained discriminator (random LoRA, fresh head) in RORem's folder layout."""
    from diffusers import UNet2DConditionModel

    from model.unet_sdxl_discriminator import UNetSDXLDiscriminator
    from myutils.discriminator_files import add_discriminator_lora, save_discriminator

    disc = UNetSDXLDiscriminator.from_unet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"))
    add_discriminator_lora(disc)
    out = str(tmp_path_factory.mktemp("disc"))
    save_discriminator(disc, out, lora=True)
    return shared(out)


def reset_accelerate():
    """accelerate keeps process-wide singletons; each in-process run starts from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def run_script():
    """Call a script's main(argv) in this process, resetting accelerate before and after."""
    def run(module, argv):
        reset_accelerate()
        try:
            return module.main([str(a) for a in argv])
        finally:
            reset_accelerate()
    return run


@pytest.fixture
def crash_then_resume(run_script, monkeypatch):
    """crash_then_resume(module, argv): the script dies right after saving its first checkpoint, then
    the same command runs again with --resume_from_checkpoint latest (a crash and its restart).
    Returns the second run's result."""
    from training import checkpoint

    def run(module, argv):
        real_save = checkpoint.save_checkpoint

        def save_then_die(accelerator, args, step, extra=None):
            real_save(accelerator, args, step, extra)
            raise KeyboardInterrupt

        monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_script(module, argv)
        monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
        return run_script(module, [*argv, "--resume_from_checkpoint", "latest"])
    return run


@pytest.fixture
def sigterm_at_step(monkeypatch):
    """sigterm_at_step(n): a real SIGTERM arrives during the micro-batch that completes optimizer step
    n (as a cluster's preemption would), so the script saves checkpoint-n and exits with code 0."""
    import signal

    from training.loop import TrainingRun

    def arm(step):
        real = TrainingRun.end_of_step

        def end_of_step(self, **metrics):
            if self.acc.sync_gradients and self.global_step + 1 == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, **metrics)
        monkeypatch.setattr(TrainingRun, "end_of_step", end_of_step)
    return arm


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory):
    """One folder for the ops DeepSpeed compiles on first use (about a minute), shared by its tests."""
    return str(tmp_path_factory.mktemp("torch_extensions"))


SCREENSHOTS = os.path.join(ROOT, "test_screenshots")  # what the browser tests saw, kept for a person to look at


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright (no browser downloads here). Without it the
    browser tests skip, unless RORem_REQUIRE_BROWSER=1 (as .ci/run sets), where they fail. Module scope,
    not session: while Playwright's sync API is open, its event loop counts as running in this thread,
    and later tests whose libraries look for a running loop (wandb) would wait on it forever."""
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not os.path.isfile(chromium):
        message = f"browser tests need playwright and {chromium} (apt-get install chromium)"
        if os.environ.get("RORem_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    os.makedirs(SCREENSHOTS, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def serve():
    """serve(asgi_app) -> base URL: the app on a free 127.0.0.1 port in a thread, stopped after the test
    (or earlier by calling the returned stop())."""
    import socket
    import threading
    import time

    import uvicorn

    servers = []

    def start(app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)

        def stop():
            server.should_exit = True
            thread.join(10)
        servers.append(stop)
        return f"http://127.0.0.1:{port}", stop

    yield start
    for stop in servers:
        stop()
