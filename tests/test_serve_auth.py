"""Who may call the service: the API key, the refusal to listen beyond loopback without one,
and CORS."""

import argparse
import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.serving import read_answer, real_server, send_part, serve_process
from vitkit import create_model, save_model
from vitkit.cli.serve import API_KEY_ENV, add_serve_command, api_key_for, cmd_serve
from vitkit.serve.app import create_app

KEY = "s3cret-key_0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
PAGE_ORIGIN = "https://app.example.com"
CHROMIUM = Path("/usr/bin/chromium")


def small_model():
    model = create_model("Ti/4@28", width=64, depth=2, heads=2, seed=0)
    torch.nn.init.normal_(model.head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    return model.eval()


def png(seed: int = 0) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    return parser.parse_args(["serve", "model", *argv])


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def keyed(model):
    """A service with an API key and one CORS origin."""
    app = create_app(model, api_key=KEY, cors_origins=[PAGE_ORIGIN, "http://localhost:3000"])
    with TestClient(app) as client:
        yield client


def upload(client: TestClient, path: str = "/v1/predict", **kwargs) -> httpx.Response:
    return client.post(path, files={"file": ("x.png", png(), "image/png")}, **kwargs)


# -- the key --------------------------------------------------------------------------------
API_CALLS = [
    ("GET", "/v1/model"),
    ("GET", "/v1/stats"),
    ("POST", "/v1/predict"),
    ("POST", "/v1/explain"),
    ("GET", "/v1/not-a-route"),  # under /v1/: refused before routing, so nothing is revealed
    ("GET", "/metrics"),  # any path not named public needs the key too
]


@pytest.mark.parametrize(("method", "path"), API_CALLS)
@pytest.mark.parametrize(
    ("authorization", "says"),
    [
        (None, "needs an API key"),
        (f"Bearer {KEY}x", "wrong"),
        (f"Bearer {KEY[:-1]}", "wrong"),
        ("Bearer ", "wrong"),
        (f"Basic {KEY}", "needs an API key"),
        (KEY, "needs an API key"),
    ],
)
def test_without_the_right_key_the_api_answers_401(keyed, method, path, authorization, says):
    headers = {} if authorization is None else {"Authorization": authorization}
    files = {"file": ("x.png", png(), "image/png")} if method == "POST" else None
    response = keyed.request(method, path, headers=headers, files=files)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert says in response.json()["error"]


def test_with_the_key_the_api_answers(keyed):
    for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 7235)
        response = upload(keyed, headers={"Authorization": f"{scheme} {KEY}"})
        assert response.status_code == 200, response.text
        assert len(response.json()["labels"]) == 5
    info = keyed.get("/v1/model", headers=BEARER).json()
    assert info["auth"] == "bearer" and info["limits"]["read_timeout_s"] == 10
    assert keyed.get("/v1/stats", headers=BEARER).json()["images"] >= 2
    explained = upload(keyed, "/v1/explain", headers=BEARER)
    assert explained.status_code == 200 and explained.headers["content-type"] == "image/png"
    # The key does not open what is not there.
    assert keyed.get("/v1/not-a-route", headers=BEARER).status_code == 404


def test_the_page_health_and_docs_need_no_key(keyed):
    for path in ("/", "/static/app.js", "/static/style.css", "/healthz", "/docs", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/readyz").status_code != 401  # public, wherever it is served
    assert "/v1/predict" in keyed.get("/openapi.json").json()["paths"]


def test_the_key_is_checked_before_the_body_is_read(model):
    app = create_app(model, api_key=KEY, read_timeout_s=60, max_upload_bytes=1000)
    with TestClient(app) as client:
        # Over the size limit, but refused for its missing key first.
        big = client.post(
            "/v1/predict", content=b"\0" * 5000, headers={"content-type": "image/png"}
        )
        assert big.status_code == 401
    with real_server(app) as (url, _):
        # Headers only, the body never sent: answered at once, not at the read timeout.
        start = time.monotonic()
        answer = read_answer(send_part(url, png(), "image/png", 0), 10)
        assert answer.status == 401 and answer.at - start < 5
        assert answer.headers["www-authenticate"] == "Bearer"


def test_without_a_key_the_api_is_open(model):
    with TestClient(create_app(model)) as client:
        assert client.get("/v1/model").json()["auth"] is None
        assert upload(client).status_code == 200
        # A stray Authorization header does no harm.
        assert upload(client, headers={"Authorization": "Bearer whatever"}).status_code == 200


@pytest.mark.parametrize("key", ["", "two words", "tab\tkey", "naïve", "line\nbreak"])
def test_keys_that_cannot_travel_as_a_bearer_token_are_refused(model, key):
    with pytest.raises(ValueError, match="API key must be"):
        create_app(model, api_key=key)


# -- CORS -----------------------------------------------------------------------------------
def preflight(client: TestClient, origin: str, method: str = "POST") -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return client.options("/v1/predict", headers=headers)


def test_no_cors_without_origins(model):
    with TestClient(create_app(model)) as client:
        assert "access-control-allow-origin" not in preflight(client, PAGE_ORIGIN).headers
        response = client.get("/v1/model", headers={"Origin": PAGE_ORIGIN})
        assert response.status_code == 200
        assert not any(h.startswith("access-control-") for h in response.headers)


def test_cors_for_the_named_origins_only(keyed):
    allowed = preflight(keyed, PAGE_ORIGIN)
    assert allowed.status_code == 200  # a preflight carries no key, and needs none
    assert allowed.headers["access-control-allow-origin"] == PAGE_ORIGIN
    methods = {m.strip() for m in allowed.headers["access-control-allow-methods"].split(",")}
    assert methods == {"GET", "POST"}
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert preflight(keyed, "http://localhost:3000").status_code == 200
    for origin in ("https://evil.example", "https://app.example.com.evil.example"):
        refused = preflight(keyed, origin)
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
    assert preflight(keyed, PAGE_ORIGIN, "DELETE").status_code == 400

    # The page on the other origin can read a 401 (and so ask for the key) and an answer.
    headers = {"Origin": PAGE_ORIGIN}
    refused = keyed.get("/v1/model", headers=headers)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == PAGE_ORIGIN
    answered = upload(keyed, "/v1/explain", headers={**headers, **BEARER})
    assert answered.headers["access-control-allow-origin"] == PAGE_ORIGIN
    assert "X-Labels" in answered.headers["access-control-expose-headers"]
    other = keyed.get("/v1/model", headers={"Origin": "https://evil.example", **BEARER})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    "origin", ["https://app.example.com/", "app.example.com", "https://a.example/path", ""]
)
def test_origins_that_would_never_match_are_refused(model, origin):
    with pytest.raises(ValueError, match="CORS origin"):
        create_app(model, cors_origins=[origin])


# -- the command line -----------------------------------------------------------------------
def test_serve_flags_and_their_defaults():
    args = parse()
    assert args.api_key is None and args.no_auth is False and args.cors_origin is None
    assert args.max_connections == 256 and args.read_timeout == 10.0
    args = parse("--cors-origin", PAGE_ORIGIN, "--cors-origin", "http://localhost:3000")
    assert args.cors_origin == [PAGE_ORIGIN, "http://localhost:3000"]
    args = parse("--max-connections", "8", "--read-timeout", "2.5", "--api-key", KEY)
    assert (args.max_connections, args.read_timeout, args.api_key) == (8, 2.5, KEY)
    with pytest.raises(SystemExit) as exit_:
        parse("--api-key", KEY, "--no-auth")  # one or the other
    assert exit_.value.code == 2


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_beyond_loopback_a_key_or_no_auth_is_needed(host, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match="--api-key KEY or \\$VITKIT_API_KEY"):
        api_key_for(parse("--host", host))
    assert api_key_for(parse("--host", host, "--api-key", KEY)) == KEY
    assert api_key_for(parse("--host", host, "--no-auth")) is None
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert api_key_for(parse("--host", host)) == KEY
    assert api_key_for(parse("--host", host, "--api-key", "other")) == "other"
    assert api_key_for(parse("--host", host, "--no-auth")) is None  # the flag wins
    monkeypatch.setenv(API_KEY_ENV, "")  # set but empty: no key
    with pytest.raises(ValueError):
        api_key_for(parse("--host", host))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_on_loopback_a_key_is_optional(host, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key_for(parse("--host", host)) is None
    assert api_key_for(parse("--host", host, "--api-key", KEY)) == KEY
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert api_key_for(parse("--host", host)) == KEY


def test_the_command_refuses_an_open_non_loopback_host_at_once(monkeypatch, capsys):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    # The model is never loaded: the refusal comes first.
    assert cmd_serve(parse("--host", "0.0.0.0", "--port", "0")) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1
    assert lines[0].startswith("vitkit serve: error: --host 0.0.0.0") and "--no-auth" in lines[0]
    assert cmd_serve(parse("--max-connections", "0")) == 2
    assert "--max-connections" in capsys.readouterr().err


# -- a real `vitkit serve` with a key -------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """`vitkit serve` with a key from the environment, a CORS origin and a 1 s read
    timeout, in a subprocess: (base URL, its first line)."""
    tmp = tmp_path_factory.mktemp("keyed")
    directory = save_model(small_model(), tmp / "model")
    args = [str(directory), "--precision", "fp32", "--no-compile", "--log-level", "warning"]
    args += ["--read-timeout", "1", "--cors-origin", PAGE_ORIGIN, "--max-connections", "16"]
    with serve_process(args, tmp / "stderr.txt", {**os.environ, API_KEY_ENV: KEY}) as served:
        url, line, _ = served
        yield url, line


@pytest.mark.slow
def test_a_real_server_with_a_key(keyed_server):
    url, line = keyed_server
    assert "API key required" in line
    assert httpx.get(f"{url}/healthz").status_code == 200
    refused = httpx.get(f"{url}/v1/model")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/v1/model", headers=BEARER).json()["auth"] == "bearer"
    files = {"file": ("x.png", png())}
    assert httpx.post(f"{url}/v1/predict", files=files, headers=BEARER).status_code == 200
    origin = {"Origin": PAGE_ORIGIN, "Access-Control-Request-Method": "POST"}
    assert httpx.options(f"{url}/v1/predict", headers=origin).status_code == 200
    # --read-timeout reaches the service: a stalled body is answered 408 after 1 s.
    stalled = send_part(url, png(), "image/png", 10, headers=BEARER)
    assert read_answer(stalled, 10).status == 408


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} to drive the page")
def test_the_page_asks_for_the_key_once(keyed_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, _ = keyed_server
    picture = tmp_path / "noise.png"
    picture.write_bytes(png(3))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            # /v1/model is refused without the key: the page asks for it.
            page.wait_for_selector("#key-form:not([hidden])")
            assert "needs an API key" in page.inner_text("#key-message")
            page.fill("#key", "not-the-key")
            page.click("#key-form button")
            page.wait_for_function(
                "document.getElementById('key-message').textContent.includes('refused')"
            )
            assert page.is_visible("#key-form")
            page.fill("#key", KEY)
            page.click("#key-form button")
            page.wait_for_function(
                "document.getElementById('model-info').textContent.includes('classes')"
            )
            assert page.is_hidden("#key-form")
            assert page.evaluate("sessionStorage.getItem('vitkit-api-key')") == KEY

            # Every call after carries the key: an image is classified and explained.
            page.set_input_files("#file", str(picture))
            page.wait_for_selector("#result:not([hidden])")
            page.wait_for_function(
                "() => { const img = document.getElementById('overlay');"
                " return img.src && img.complete && img.naturalWidth > 0; }"
            )
            assert page.is_hidden("#error") and page.is_hidden("#key-form")

            # A reload in the same tab keeps the key: no second question.
            page.reload()
            page.wait_for_function(
                "document.getElementById('model-info').textContent.includes('classes')"
            )
            assert page.is_hidden("#key-form")
        finally:
            browser.close()
