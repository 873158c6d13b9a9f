"""The review app in a real browser: headless Chromium (Debian's) driven by Playwright.

Opens the gallery of a small store of real photos, labels two images with the keyboard, retrains, and
sees the new labels and predictions. Screenshots go to ``$CLIPFUSE_SCREENSHOTS`` (the README's come from
here) or the test's temporary folder. Chromium is installed by ``tests/install-chromium.sh``, which the
README's test command runs; set ``CLIPFUSE_SKIP_BROWSER=1`` to skip on purpose.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import clipfuse

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _chromium() -> str:
    if os.environ.get("CLIPFUSE_SKIP_BROWSER") == "1":
        pytest.skip("CLIPFUSE_SKIP_BROWSER=1")
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no Chromium on this machine: run tests/install-chromium.sh (the README's test command does), "
                "or set CLIPFUSE_SKIP_BROWSER=1 to skip this test on purpose.")


def write_photo_classes(root: Path, seed: int = 0) -> dict[str, list[Path]]:
    """Random crops of scikit-image's sample photos: 4 classes, 6 labeled, 4 unlabeled and 1 test each."""
    from PIL import Image
    from skimage import data

    from clipfuse.data.demo import random_crop

    photos = {"cat": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(), "rocket": data.rocket()}
    rng = np.random.default_rng(seed)
    out = {}
    for name, pixels in photos.items():
        img = Image.fromarray(pixels).convert("RGB")
        for split, n in (("train", 6), ("pool", 4), ("test", 1)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / f"{name}-{i}.jpg"
                random_crop(img, rng, width=192).save(path, quality=90)
                out.setdefault(name, []).append(path)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """A trained store of photos (effnet-lite0, its real weights) served on a free loopback port."""
    import uvicorn

    from clipfuse.webapp import create_app

    write_photo_classes(tmp_path)
    ws = clipfuse.open(tmp_path / "photos.lance")
    ws.index(tmp_path / "train", unlabeled=tmp_path / "pool", test=tmp_path / "test", model="effnet-lite0")
    ws.train_heads(heads="probe,knn,propagation", folds=2)
    ws.predict(per_head=True)
    port = _free_port()
    app = create_app(ws, port=port, heads="probe,knn,propagation", folds=2)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the review app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", ws, app
    srv.should_exit = True
    thread.join(10)
    app.state.writer.wait_idle(60)


def test_label_with_the_keyboard_and_retrain(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    base, ws, app = server
    shots = Path(os.environ.get("CLIPFUSE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    predictions_before = ws.store.table_versions(ws.version().fingerprint)[3]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})  # the app's CSP holds: no page.evaluate
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        page.goto(base + "/")
        page.wait_for_selector("#confusion")
        page.screenshot(path=shots / "overview.png", full_page=True)

        page.goto(base + "/gallery?split=unlabeled")
        page.wait_for_load_state("networkidle")  # every thumbnail made and loaded
        tiles = page.locator(".tile")
        assert tiles.count() == 16
        page.screenshot(path=shots / "gallery.png", full_page=True)

        page.goto(base + "/queue/suggest?n=8")
        page.wait_for_selector("#queue[data-current]")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=shots / "label-next.png")
        first = page.get_attribute("#queue", "data-current")
        proposed = page.inner_text("#proposed")
        page.keyboard.press("Enter")  # accept the proposed class
        page.wait_for_selector(f"#queue:not([data-current='{first}'])")
        second = page.get_attribute("#queue", "data-current")
        page.fill("#queue-input", "cof")
        page.keyboard.press("Tab")  # type-ahead completes the class
        assert page.input_value("#queue-input") == "coffee"
        page.keyboard.press("Enter")
        page.wait_for_selector(f"#queue:not([data-current='{second}'])")
        page.keyboard.press("Escape")  # skip the third
        assert page.inner_text("#queue-progress").startswith("4 of")

        labels = {h["id"]: h["label"] for h in ws.label_history()}
        assert labels == {first: proposed, second: "coffee"}

        page.click("#retrain-button")
        page.wait_for_selector("#retrain-status:has-text('retrained')", timeout=120_000)
        page.goto(base + f"/image/{second}")
        assert page.inner_text("#current-label") == "coffee"
        assert "human" in page.inner_text(".image-page")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=shots / "image.png", full_page=True)

        page.goto(base + "/gallery?label=coffee&split=unlabeled")
        shown = [page.get_attribute(f".tile >> nth={i}", "data-id") for i in range(page.locator(".tile").count())]
        assert second in shown and "last retrain: fused" in page.inner_text("#retrain-status")

        page.goto(base + "/queue/suspects?n=8")
        page.wait_for_selector("#queue[data-current]")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=shots / "suspects.png")
        browser.close()
    assert not errors, errors
    assert ws.store.table_versions(ws.version().fingerprint)[3] != predictions_before  # predicted again
    assert ws.gallery(ids=[second]).rows[0].label == "coffee"
    assert app.state.writer.status.runs == 1
    for name in ("overview", "gallery", "label-next", "image", "suspects"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
