"""slimsd.run.ui: the model cache, the request functions, and a running `slimsd ui` driven through gradio_client
and a real headless Chromium (Playwright)."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.run.ui import ModelCache, UIConfig, default_models, run_generate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MAX_QUEUE = 2


def test_default_models_lead_with_the_offline_ones():
    names = default_models()
    assert names[:2] == ["micro-sd", "micro-sdxl"]
    assert "sd-v1.4" in names and "bk-sdm-small" in names and "ssd-1b" in names


def test_ui_listens_on_localhost_and_share_is_opt_in(monkeypatch, tmp_path):
    import slimsd.run.ui
    from slimsd.cli import main

    calls = []
    monkeypatch.setattr(slimsd.run.ui, "launch", lambda config, **kw: calls.append((config, kw)))
    main(["ui", "--models", "micro-sd, micro-sdxl", "toy-sd", "--out", str(tmp_path)])
    config, kw = calls[0]
    assert kw == {"host": "127.0.0.1", "port": 7860, "share": False}
    assert (
        config.models == ["micro-sd", "micro-sdxl", "toy-sd"]
        and config.max_queue > 0
        and config.concurrency == 1
    )
    with pytest.raises(SystemExit) as e:
        main(["ui", "--dtype", "fp8"])
    assert e.value.code == 2 and len(calls) == 1


def test_bad_requests_fail_before_loading_anything(tmp_path):
    cache = ModelCache(UIConfig(out_dir=tmp_path))
    args = ["micro-sd", "a red circle", "", 2, 7.5, 0, 0, 1, False, 1, "model default"]
    for index, value, match in [
        (1, "  ", "prompt is empty"),
        (5, 63, "width 63"),
        (3, 0, "steps 0"),
        (10, "heun", "unknown scheduler"),
        (7, 1.5, "seed 1.5"),
    ]:
        bad = list(args)
        bad[index] = value
        with pytest.raises(SlimsdError, match=match):
            run_generate(cache, *bad)
    with pytest.raises(SlimsdError, match="unknown model"):
        run_generate(cache, "nope", *args[1:])
    assert cache.loaded() == []


def test_cache_loads_lazily_and_frees_a_dropped_model(tmp_path):
    cache = ModelCache(UIConfig(out_dir=tmp_path, max_loaded=1))
    assert cache.loaded() == []
    first = weakref.ref(cache.get("micro-sd"))
    assert cache.get("micro-sd") is first()  # cached, not reloaded
    cache.get("micro-sdxl")  # over max_loaded: micro-sd is dropped
    gc.collect()
    assert cache.loaded() == ["micro-sdxl"] and first() is None
    assert cache.drop("micro-sdxl") and cache.loaded() == []


# ---------------------------------------------------------------------------------------------------------------
# A running `slimsd ui`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`slimsd ui` in a subprocess, with a tiny queue so that a burst overflows it."""
    out = tmp_path_factory.mktemp("ui-out")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(out.parent / "ui.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slimsd.cli",
            "ui",
            "--models",
            "micro-sd,micro-sdxl",
            "--port",
            str(port),
            "--out",
            str(out),
            "--max-queue",
            str(MAX_QUEUE),
            "--concurrency",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail(f"slimsd ui did not start: {(out.parent / 'ui.log').read_text()[-2000:]}")
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _generate_args(prompt: str, seed: int, num_images: int = 1, width: int = 0):
    return ("micro-sd", prompt, "", 2, 7.5, width, 0, seed, False, num_images, "model default")


@pytest.mark.slow
def test_gradio_client_drives_a_running_ui(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    images, info = client.predict(
        *_generate_args("a blue square", seed=7, num_images=2), api_name="/generate"
    )
    assert [im["caption"].split(" · ")[0] for im in images] == ["seed 7", "seed 8"]
    assert "seed `8`" in info
    text = Image.open(images[1]["image"]).text
    assert (
        "a blue square\nSteps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 8, Size: 64x64" in text["parameters"]
    )
    with pytest.raises(AppError, match="width 63 is not allowed"):
        client.predict(*_generate_args("x", seed=1, width=63), api_name="/generate")
    gallery, table = client.predict(
        ["micro-sd", "micro-sdxl"], "a red circle", "", 2, 7.5, 3, "euler", api_name="/compare"
    )
    assert [g["caption"].split(" · ")[0] for g in gallery] == ["micro-sd", "micro-sdxl"]
    assert [row[0] for row in table["data"]] == ["micro-sd", "micro-sdxl"]
    assert all(row[1] > 0 and row[4] == 3 for row in table["data"])


@pytest.mark.slow
def test_a_burst_is_served_or_cleanly_refused_and_the_app_keeps_serving(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    jobs = [client.submit(*_generate_args(f"burst {i}", seed=i), api_name="/generate") for i in range(12)]
    served, refused = [], []
    for i, job in enumerate(jobs):
        try:
            images, _ = job.result(timeout=180)
            served.append(i)
            assert images[0]["caption"].startswith(f"seed {i} ")
        except Exception as e:
            assert "Queue is full" in str(e), repr(e)  # the only acceptable failure
            refused.append(i)
    assert served and refused and len(served) + len(refused) == 12
    with ThreadPoolExecutor(2) as pool:  # still serving, to more than one client
        after = list(
            pool.map(
                lambda s: Client(server, verbose=False).predict(
                    *_generate_args("after", seed=s), api_name="/generate"
                ),
                [100, 200],
            )
        )
    assert [a[0][0]["caption"].split(" · ")[0] for a in after] == ["seed 100", "seed 200"]


@pytest.mark.slow
@pytest.mark.browser
def test_browser_generates_and_downloads_a_png_with_its_metadata(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (make test installs it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(server, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#prompt textarea").fill("a small green triangle")
            page.locator("#advanced").get_by_text("Advanced").click()
            steps = page.locator("#steps input[type=number]")
            steps.fill("2")
            steps.press("Enter")
            page.locator("#generate").click()
            page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2", timeout=180_000)
            captions = page.locator("#gallery .caption-label").all_inner_texts()
            assert len(captions) == 2 and all(c.startswith("seed ") for c in captions)
            assert "2 steps" in page.locator("#info").inner_text()
            page.locator("#gallery button.thumbnail-item").first.click()
            with page.expect_download(timeout=60_000) as download:
                page.locator("#gallery").get_by_label("Download").first.click()
            path = tmp_path / download.value.suggested_filename
            download.value.save_as(path)
        finally:
            browser.close()
    assert path.suffix == ".png"
    text = Image.open(path).text
    assert text["parameters"].startswith("a small green triangle\nSteps: 2, Sampler: PLMS")
    assert '"prompt": "a small green triangle"' in text["slimsd"]
