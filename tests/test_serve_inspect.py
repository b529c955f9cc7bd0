"""/v1/inspect and the page's tab for it: the model's filters, position embeddings and
attention statistics, measured once on its calibration images, off the predictions' path."""

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.serving import real_server
from vitkit import create_model
from vitkit.infer.inspect import FIGURES
from vitkit.serve import routes
from vitkit.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")


def small_model(calibration_images: int = 0):
    model = create_model("Ti/4@28", width=64, depth=2, heads=2, seed=0).eval()
    if calibration_images:
        shape = (calibration_images, 1, 28, 28)
        model.calibration = torch.randint(0, 256, shape, dtype=torch.uint8)
    return model


def counting_inspections(monkeypatch, fail_first: bool = False) -> list[str]:
    """Records each run of the inspection (on whichever thread), slowed so that requests
    overlap; the first run fails if asked."""
    runs: list[str] = []
    real = routes.inspect_model

    def inspect_model(*args, **kwargs):
        runs.append(threading.current_thread().name)
        time.sleep(0.3)
        if fail_first and len(runs) == 1:
            raise RuntimeError("the first inspection fails")
        return real(*args, **kwargs)

    monkeypatch.setattr(routes, "inspect_model", inspect_model)
    return runs


@pytest.mark.slow
def test_inspection_of_the_calibration_images_is_computed_once(monkeypatch):
    runs = counting_inspections(monkeypatch)
    with TestClient(create_app(small_model(calibration_images=80))) as client:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: client.get("/v1/inspect"), range(3)))
        assert [a.status_code for a in answers] == [200] * 3, answers[0].text
        assert len(runs) == 1 and runs[0].startswith("vitkit-explain")
        body = answers[0].json()
        assert all(a.json() == body for a in answers)
        assert body["model"] == "model" and body["num_images"] == routes.PROBE_IMAGES
        assert body["grid"] == 7 and body["patch_pixels"] == 4
        attention = body["attention"]
        assert np.array(attention["distance_px"]).shape == (2, 2)
        assert attention["max_entropy_nats"] == pytest.approx(np.log(49), abs=1e-4)
        assert "layer 1:" in body["summary"]
        assert set(body["figures"]) == set(FIGURES)
        for png in body["figures"].values():
            assert Image.open(io.BytesIO(base64.b64decode(png))).format == "PNG"
        # Kept: asking again computes nothing.
        assert client.get("/v1/inspect").json() == body and len(runs) == 1


def test_without_calibration_images_only_the_weights_are_inspected():
    with TestClient(create_app(small_model())) as client:
        body = client.get("/v1/inspect").json()
    assert body["attention"] is None and body["num_images"] == 0
    assert set(body["figures"]) == {"filters", "position_similarity"}
    assert "no images" in body["summary"]


@pytest.mark.slow
def test_a_failed_inspection_is_tried_again(monkeypatch):
    runs = counting_inspections(monkeypatch, fail_first=True)
    with TestClient(create_app(small_model(8)), raise_server_exceptions=False) as client:
        failed = client.get("/v1/inspect")
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["error"]
        assert client.get("/v1/inspect").status_code == 200 and len(runs) == 2


def test_the_inspection_needs_the_key_and_the_page_has_its_tab():
    with TestClient(create_app(small_model(), api_key="k" * 32)) as client:
        assert client.get("/v1/inspect").status_code == 401
        page = client.get("/").text
        assert 'id="tab-inspect"' in page and 'id="inspect-view"' in page
        assert "/v1/inspect" in client.get("/static/app.js").text


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} to drive the page")
def test_the_inspect_tab_in_a_browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    app = create_app("fashion-mnist", name="fashion-mnist")
    loaded = (
        "() => { const imgs = [...document.querySelectorAll('#inspect-figures img')];"
        " return imgs.length === 4 && imgs.every((i) => i.complete && i.naturalWidth > 0); }"
    )
    with real_server(app) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            assert page.is_hidden("#inspect-view") and page.is_visible("#classify-view")
            page.click("#tab-inspect")
            assert page.is_hidden("#classify-view")
            assert page.get_attribute("#tab-inspect", "aria-selected") == "true"
            page.wait_for_function(loaded, timeout=60_000)
            assert "layer 1:" in page.inner_text("#inspect-summary")
            assert "training images" in page.inner_text("#inspect-status")
            assert page.is_hidden("#inspect-error")
            # The arrow keys move between the tabs.
            page.focus("#tab-inspect")
            page.keyboard.press("ArrowRight")
            assert page.is_visible("#classify-view") and page.is_hidden("#inspect-view")
        finally:
            browser.close()
