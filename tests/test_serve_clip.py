"""The service with a CLIP: zero-shot classification by labels given as text, image and text
embeddings, their bounds, the label sets' cache, and the page's labels box in a browser."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.clip_toy import SHADES, TEMPLATES, shades, small_tower, train_toy_clip
from tests.serving import real_server
from vitkit.infer.embed import embed_images
from vitkit.infer.zero_shot import class_embeddings, load_tokenizer, zero_shot_model
from vitkit.serve import text as serve_text
from vitkit.serve.app import create_app
from vitkit.serve.decode import ApiError, decode_image
from vitkit.serve.text import Slots, TextSide
from vitkit.weights import save_model
from vitkit.weights.clip import load_clip

MAX_PROMPTS = 12
CHROMIUM = Path("/usr/bin/chromium")


def png(pixels: torch.Tensor) -> bytes:
    """A (1, H, W) uint8 image as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels[0].numpy()).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """The toy LiT (tests/clip_toy.py)."""
    out = tmp_path_factory.mktemp("clip") / "shades-clip"
    train_toy_clip(out)
    return out


@pytest.fixture(scope="module")
def clip_and_tokenizer(clip_dir):
    clip, tokenizer_file = load_clip(clip_dir)
    return clip, load_tokenizer(clip, tokenizer_file)


@pytest.fixture(scope="module")
def client(clip_dir):
    with TestClient(create_app(clip_dir, max_prompts=MAX_PROMPTS)) as c:
        yield c


@pytest.fixture(scope="module")
def vit_client(tmp_path_factory):
    directory = save_model(small_tower(), tmp_path_factory.mktemp("vit") / "plain", labels=SHADES)
    with TestClient(create_app(directory)) as c:
        yield c


@pytest.fixture(scope="module")
def test_images():
    return shades(12, 1)


def zero_shot(client, image: bytes, labels, **fields):
    data = {"labels": labels if isinstance(labels, str) else json.dumps(labels)}
    data |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    return client.post("/v1/zero-shot", files={"file": ("x.png", image)}, data=data)


def assert_one_line_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# -- zero-shot ----------------------------------------------------------------------------------
def test_zero_shot_ranks_the_right_shade_as_the_model_would(
    client, clip_and_tokenizer, test_images
):
    clip, tokenizer = clip_and_tokenizer
    reference = zero_shot_model(clip, tokenizer, SHADES, TEMPLATES)
    service = client.app.state.service
    right = 0
    for image, label in zip(test_images.images, test_images.labels.tolist(), strict=True):
        response = zero_shot(client, png(image), "dark, grey ,bright", templates=TEMPLATES)
        assert response.status_code == 200, response.text
        body = response.json()
        ranked = [(row["label"], row["probability"]) for row in body["labels"]]
        assert sorted(name for name, _ in ranked) == sorted(SHADES)  # every label, by default
        probabilities = [p for _, p in ranked]
        assert probabilities == sorted(probabilities, reverse=True)
        assert abs(sum(probabilities) - 1) < 1e-5
        right += ranked[0][0] == SHADES[label]
        # The same probabilities as the zero-shot classifier vitkit builds from the CLIP.
        with torch.no_grad():
            want = reference(service.inputs(png(image))).softmax(-1)[0]
        got = dict(ranked)
        np.testing.assert_allclose([got[s] for s in SHADES], want.tolist(), atol=1e-5)
        assert body["templates"] == TEMPLATES and body["mode"] == "eager-fp32"
    assert right >= 11


def test_predict_on_a_clip_points_to_zero_shot(client, test_images):
    response = client.post("/v1/predict", files={"file": ("x.png", png(test_images.images[0]))})
    assert_one_line_error(response, 400, "is a CLIP", "/v1/zero-shot")


def test_label_order_and_input_forms_do_not_change_the_answer(client, test_images):
    image = png(test_images.images[1])
    by_form = {
        r["label"]: r["probability"] for r in zero_shot(client, image, SHADES).json()["labels"]
    }
    reordered = zero_shot(client, image, "bright,dark,grey").json()["labels"]
    assert {r["label"]: r["probability"] for r in reordered} == pytest.approx(by_form, abs=1e-6)
    as_json = client.post(
        "/v1/zero-shot",
        json={"image": base64.b64encode(image).decode(), "labels": SHADES[::-1], "top_k": 2},
    )
    assert len(as_json.json()["labels"]) == 2
    raw = client.post(
        "/v1/zero-shot",
        content=image,
        headers={"Content-Type": "image/png"},
        params={"labels": "grey,dark,bright", "top_k": 1},
    )
    assert raw.status_code == 200, raw.text
    top = max(by_form, key=by_form.get)
    assert as_json.json()["labels"][0]["label"] == raw.json()["labels"][0]["label"] == top
    # The default template: "a photo of a {}."
    assert raw.json()["templates"] == ["a photo of a {}."]


def test_a_label_set_is_embedded_once(client, test_images):
    image = png(test_images.images[0])
    labels = ["dark", "grey", "bright", "pitch black"]
    first = zero_shot(client, image, labels, templates=["{}"]).json()
    again = zero_shot(client, png(test_images.images[2]), labels, templates=["{}"]).json()
    assert first["cached"] is False and again["cached"] is True
    assert zero_shot(client, image, labels, templates=["{}"]).json()["labels"] == first["labels"]


@pytest.mark.parametrize(
    ("labels", "fields", "words"),
    [
        ("dark", {}, ["at least 2 labels"]),
        (["dark", "grey", "dark"], {}, ["distinct", "dark"]),
        (["dark", "a\nb"], {}, ["printable line"]),
        (["dark", ""], {}, ["printable line"]),
        (["dark", "x" * 501], {}, ["printable line", "500"]),
        ([1, 2], {}, ["list of strings"]),
        ('["dark", ', {}, ["labels", "JSON"]),
        ([f"shade {i}" for i in range(13)], {}, ["at most 12 labels", "got 13"]),
        (SHADES, {"templates": ["no slot"]}, ['exactly one "{}"']),
        (SHADES, {"templates": ["{} {}"]}, ['exactly one "{}"']),
        (
            [f"s{i}" for i in range(5)],
            {"templates": [*TEMPLATES, "a {}."]},
            ["5 labels x 3 templates make 15 prompts", "at most 12"],
        ),
    ],
)
def test_bad_labels_and_templates_get_400(client, test_images, labels, fields, words):
    response = zero_shot(client, png(test_images.images[0]), labels, **fields)
    assert_one_line_error(response, 400, *words)


def test_a_request_without_labels_or_image(client, test_images):
    no_labels = client.post("/v1/zero-shot", files={"file": ("x.png", png(test_images.images[0]))})
    assert_one_line_error(no_labels, 400, "needs labels")
    not_an_image = zero_shot(client, b"not an image", SHADES)
    assert_one_line_error(not_an_image, 422, "not an image")


def test_labels_count_is_bounded_before_it_is_checked(client, test_images):
    """A huge label list is refused by its count, at once (check_labels' work grows with it)."""
    many = [f"l{i}" for i in range(200_000)]
    image = base64.b64encode(png(test_images.images[0])).decode()
    response = client.post("/v1/zero-shot", json={"image": image, "labels": many})
    assert_one_line_error(response, 400, "at most 12 labels", "200,000")


def test_a_model_without_a_text_tower(vit_client, test_images):
    image = png(test_images.images[0])
    refused = zero_shot(vit_client, image, SHADES)
    assert_one_line_error(refused, 400, "no text tower", "not a CLIP")
    texts = vit_client.post("/v1/embed", json={"text": ["a dark square"]})
    assert_one_line_error(texts, 400, "no text tower")
    info = vit_client.get("/v1/model").json()
    assert info["zero_shot"] is False and info["text_tower"] is None
    assert info["embedding"] == {"dim": 32, "image": "pooled", "text": False}
    # Its image embeddings are the pooled features, as `vitkit.infer.embed` computes them.
    response = vit_client.post("/v1/embed", files={"file": ("x.png", image)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "image" and body["source"] == "pooled" and body["dim"] == 32
    service = vit_client.app.state.service
    pixels = decode_image(image, service.model.config, service.max_pixels)[None]
    want = embed_images(service.model, pixels, progress=False)
    got = torch.tensor(body["embeddings"])
    assert got.shape == (1, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- embeddings ---------------------------------------------------------------------------------
def test_image_embedding_is_the_clips(client, clip_and_tokenizer, test_images):
    clip, _ = clip_and_tokenizer
    image = png(test_images.images[4])
    response = client.post("/v1/embed", files={"file": ("x.png", image)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "image" and body["source"] == "projection"
    got = torch.tensor(body["embeddings"])
    assert body["dim"] == clip.text.config.embed_dim and got.shape == (1, body["dim"])
    assert abs(got.norm().item() - 1) < 1e-5
    with torch.no_grad():
        want = clip.encode_image(client.app.state.service.inputs(image))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_text_embeddings_are_the_clips(client, clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    texts = ["a photo of a dark square.", "a bright picture.", "grey"]
    response = client.post("/v1/embed", json={"text": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "text" and body["dim"] == clip.text.config.embed_dim
    got = torch.tensor(body["embeddings"])
    with torch.no_grad():
        want = clip.encode_text(tokenizer(texts))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    one = client.post("/v1/embed", files={"text": (None, texts[1])})
    assert one.status_code == 200, one.text
    torch.testing.assert_close(torch.tensor(one.json()["embeddings"]), want[1:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"text": ["t"] * 257}, 400, ["1 to 256 texts", "257"]),
        ({"text": []}, 400, ["1 to 256 texts"]),
        ({"text": ["ok", "x" * 1001]}, 400, ["1 to 1,000 characters"]),
        ({"text": ["ok", "  "]}, 400, ["1 to 1,000 characters"]),
        ({"text": ["ok", 3]}, 400, ["string or a list of strings"]),
        ({"text": "ok", "image": "aGk="}, 400, ["not both"]),
        ({"other": 1}, 422, ["an image", '"text"']),
    ],
)
def test_bad_embed_requests(client, body, status, words):
    assert_one_line_error(client.post("/v1/embed", json=body), status, *words)


def test_model_reports_zero_shot(client, clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    info = client.get("/v1/model").json()
    assert info["zero_shot"] is True
    tower = info["text_tower"]
    c = clip.text.config
    assert (tower["width"], tower["depth"], tower["embed_dim"]) == (c.width, c.depth, c.embed_dim)
    assert tower["context_length"] == c.context_length and tower["parameters"] > 0
    assert info["embedding"] == {"dim": c.embed_dim, "image": "projection", "text": True}
    assert info["limits"]["max_prompts"] == MAX_PROMPTS
    assert info["limits"]["max_texts"] == 256 and info["name"] == "shades-clip"


# -- the text side on its own: sharing, bounds, the cache ---------------------------------------
def test_encodings_are_shared_bounded_and_cached(clip_and_tokenizer, monkeypatch):
    clip, tokenizer = clip_and_tokenizer
    calls: list[list[str]] = []  # the labels of each call of the text tower
    release = asyncio.Event()

    async def run(fn, *args):  # stands in for the model's thread, held until released
        calls.append(args[2])
        await release.wait()
        return fn(*args)

    monkeypatch.setattr(serve_text, "PROMPTS_PER_CALL", 4)
    monkeypatch.setattr(serve_text, "CACHE_ENTRIES", 2)
    side = TextSide(clip, tokenizer, run, Slots(1, "text encodings"))
    six = ["dark", "grey", "bright", "black", "white", "dim"]

    async def test():
        first = asyncio.ensure_future(side.class_embeddings(six, ["{}"]))
        same = asyncio.ensure_future(side.class_embeddings(six, ["{}"]))
        await asyncio.sleep(0)
        # One encoding at a time here: another label set is refused with 503 ...
        with pytest.raises(ApiError) as busy:
            await side.class_embeddings(["a", "b"], ["{}"])
        assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"}
        release.set()
        (a, cached_a), (b, cached_b) = await asyncio.gather(first, same)
        # ... while the same set, asked for twice, was encoded once, 4 prompts per call.
        assert calls == [six[:4], six[4:]]
        assert not cached_a and not cached_b and torch.equal(a, b)
        assert side.slots.taken == 0
        assert (await side.class_embeddings(six, ["{}"]))[1] is True
        for labels in (["a", "b"], ["c", "d"]):
            await side.class_embeddings(labels, ["{}"])
        assert side.cached == 2
        again = await side.class_embeddings(six, ["{}"])  # evicted: encoded anew
        return a, again

    classes, (again, cached) = asyncio.run(test())
    assert not cached and len(calls) == 6
    want = class_embeddings(clip, tokenizer, six, ["{}"])
    torch.testing.assert_close(classes, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, want, atol=1e-5, rtol=0)


def test_label_groups_never_leave_one_alone():
    assert serve_text._groups(list("abcde"), 2) == [["a", "b"], ["c", "d", "e"]]
    assert serve_text._groups(list("abcd"), 2) == [["a", "b"], ["c", "d"]]
    assert serve_text._groups(list("ab"), 32) == [["a", "b"]]


def test_the_new_endpoints_need_the_key_and_are_described(clip_dir, test_images):
    image = png(test_images.images[0])
    with TestClient(create_app(clip_dir, api_key="s3cret")) as keyed:
        for path in ("/v1/zero-shot", "/v1/embed"):
            refused = keyed.post(path, files={"file": ("x.png", image)}, data={"labels": "a,b"})
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        bearer = {"Authorization": "Bearer s3cret"}
        ok = keyed.post("/v1/embed", json={"text": "a dark square"}, headers=bearer)
        assert ok.status_code == 200, ok.text
        paths = keyed.get("/openapi.json").json()["paths"]
    body = paths["/v1/zero-shot"]["post"]["requestBody"]["content"]
    assert {"labels", "templates", "top_k"} <= set(
        body["multipart/form-data"]["schema"]["properties"]
    )
    assert (
        "text"
        in paths["/v1/embed"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"
        ]
    )


def test_zero_shot_limits_are_checked_at_start(clip_dir):
    with pytest.raises(ValueError, match="max_prompts"):
        create_app(clip_dir, max_prompts=1)
    with pytest.raises(ValueError, match="max_encodings"):
        create_app(clip_dir, max_encodings=0)


# -- the page -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} to drive the page")
def test_the_page_classifies_by_typed_labels(clip_dir, tmp_path, test_images):
    sync_api = pytest.importorskip("playwright.sync_api")
    dark, bright = tmp_path / "dark.png", tmp_path / "bright.png"
    dark.write_bytes(png(test_images.images[0]))
    bright.write_bytes(png(test_images.images[2]))
    app = create_app(clip_dir)
    with real_server(app) as (url, _), sync_api.sync_playwright() as p:
        assert httpx.get(f"{url}/v1/model").json()["zero_shot"] is True
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            page.wait_for_selector("#labels-form:not([hidden])")
            assert "CLIP" in page.inner_text("#model-info")
            # An image with fewer than two labels: the page says what is missing.
            page.fill("#labels", "dark")
            page.set_input_files("#file", str(dark))
            page.wait_for_selector("#error:not([hidden])")
            assert "two labels" in page.inner_text("#error")
            # The labels typed, then Classify: the same image, ranked by them.
            page.fill("#labels", "dark, grey, bright")
            page.click("#labels-form button")
            page.wait_for_selector("#result:not([hidden])")
            assert page.inner_text("#top-label") == "dark"
            assert page.locator("#bars li").count() == 3
            assert page.inner_text("#chart-title") == "Your labels, ranked"
            assert page.is_hidden("#error")
            page.set_input_files("#file", str(bright))
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('bright.png:')"
            )
            assert page.inner_text("#top-label") == "bright"
        finally:
            browser.close()
