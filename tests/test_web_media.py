"""Images and audio attached in the web chat page at /, in headless Chromium (as tests/test_web.py:
selenium + Debian's chromium/chromium-driver; skips where no browser is installed).

Against the tiny Gemma 3n bundle that keeps both towers (tests/gemma3n_fixtures.tiny_mm_bundle):
a PNG or a WAV chosen in the page's file input goes with the next message as a content part,
and the reply streamed into the page equals the Python API's greedy reply for the same parts;
a second turn resends the image in the history. The page sends the attachments BEFORE the
message's text ([image_url / input_audio parts..., {"type": "text"}], as `edgelm chat` puts
/image and /audio before the line), so the Python side sends [Image(path), text].

Errors are shown in the page and keep the attachments pending: a corrupt image (the server's
400), an image sent to a text-only bundle ("has no image encoder"), a body over the server's
--max-body (413)."""

from __future__ import annotations

import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import browser  # noqa: E402,F401  (a fixture)
from tiny_bundle import tiny_bundle  # noqa: E402

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # two torch threads ran small models 10-200x slower on this host
pytest.importorskip("PIL")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from edgelm import Engine  # noqa: E402
from edgelm.runtime.content import Audio, Image  # noqa: E402
from edgelm.server import BackgroundServer, create_app  # noqa: E402

N = 12  # max_tokens of every turn
TEXT_MAX_BODY = 64 << 10  # the text-only server's --max-body: a 100 KB attachment is a 413


@pytest.fixture(scope="module")
def mm_eng():
    from timm_support import need_timm

    need_timm()  # (builds the tiny checkpoint's towers)
    from gemma3n_fixtures import tiny_mm_bundle

    bundle, _ = tiny_mm_bundle()
    e = Engine(bundle, backend="numpy", max_tokens=1024)
    yield e
    e.close()


@pytest.fixture(scope="module")
def mm_server(mm_eng):
    with BackgroundServer(create_app(mm_eng, model_name="mm", max_body_bytes=32 << 20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def g3n_text_server(mm_eng, tmp_path_factory):
    """The tiny Gemma 3n converted without its towers: its template takes image parts, so the
    server's answer to one is the bundle's "has no image encoder"."""
    from gemma3n_fixtures import tiny_mm_bundle

    from edgelm.convert.common import convert
    from edgelm.convert.hf import load_hf_source

    _, ckpt = tiny_mm_bundle()
    out = tmp_path_factory.mktemp("g3n-text") / "g3n-text.edgelm"
    convert(load_hf_source(ckpt, keep=()), out, scheme="fp32", progress=False)
    e = Engine(out, backend="numpy", max_tokens=1024)
    with BackgroundServer(create_app(e, model_name="g3n-text")) as srv:
        yield srv
    e.close()


@pytest.fixture(scope="module")
def text_server():
    e = Engine(tiny_bundle(), max_tokens=1024, backend="numpy")
    with BackgroundServer(create_app(e, model_name="tiny", max_body_bytes=TEXT_MAX_BODY)) as srv:
        yield srv
    e.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image as PILImage

    d = tmp_path_factory.mktemp("web-media")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:48, 0:64]
    px = np.stack([xx * 4, yy * 5, rng.integers(0, 256, (48, 64))], -1).astype(np.uint8)
    PILImage.fromarray(px).save(d / "picture.png")
    rate = 16_000
    t = np.arange(rate) / rate  # 1 s of a 440 Hz tone
    with wave.open(str(d / "tone.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
    (d / "corrupt.png").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (d / "big.png").write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    return d


def _open(d, srv, model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d.get(srv.url + "/")
    wait = WebDriverWait(d, 30)
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == model)
    for field, value in (("temperature", "0"), ("max-tokens", str(N))):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    d.get_log("performance")  # (drop the page load's entries)
    return wait


def _attach(d, wait, path: Path, n_pending: int):
    """Chooses `path` in the file input and waits until the strip shows n_pending attachments."""
    from selenium.webdriver.common.by import By

    d.find_element(By.ID, "attach").send_keys(str(path.resolve()))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending .attachment")) == n_pending)


def _send(d, text):
    from selenium.webdriver.common.by import By

    d.find_element(By.ID, "input").send_keys(text)
    d.find_element(By.ID, "send").click()


def _reply(d, wait, k) -> str:
    from selenium.webdriver.common.by import By

    div = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#reply-{k}[data-done='1']"))
    return d.execute_script("return arguments[0].querySelector('.content').textContent", div)


def _error(d, wait) -> str:
    from selenium.webdriver.common.by import By

    el = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.error .content"))
    wait.until(lambda d: d.find_element(By.ID, "state").text == "error")
    return el.text


def _sent_bodies(d) -> list[dict]:
    """The JSON bodies of the page's POSTs to /v1/chat/completions (from the performance log)."""
    out = []
    for entry in d.get_log("performance"):
        m = json.loads(entry["message"])["message"]
        req = m.get("params", {}).get("request", {})
        if (m["method"] == "Network.requestWillBeSent" and req.get("method") == "POST"
                and req.get("url", "").endswith("/v1/chat/completions") and "postData" in req):
            out.append(json.loads(req["postData"]))
    return out


def _pending_names(d) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.get_attribute("title") for e in d.find_elements(By.CSS_SELECTOR, "#pending .attachment")]


def test_image_turns_equal_the_python_api(mm_server, mm_eng, browser, media):
    from selenium.webdriver.common.by import By

    d = browser
    png = media / "picture.png"
    conv = mm_eng.create_conversation(sampler={"temperature": 0.0}, max_new_tokens=N)
    first = conv.send([Image(png), "What is in the picture?"])  # the page's order: attachments, then text
    second = conv.send("And the colours?")

    wait = _open(d, mm_server, "mm")
    _attach(d, wait, png, 1)
    assert d.find_element(By.CSS_SELECTOR, "#pending img.thumb").get_attribute("alt") == "picture.png"
    _send(d, "What is in the picture?")
    assert _reply(d, wait, 0) == first
    user = d.find_elements(By.CSS_SELECTOR, ".msg.user")[-1]
    thumb = user.find_element(By.CSS_SELECTOR, "img.thumb")
    assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb) == 64
    assert user.find_element(By.CLASS_NAME, "content").text == "What is in the picture?"
    assert not d.find_element(By.ID, "pending").is_displayed()  # sent: no longer pending
    bodies = _sent_bodies(d)  # (Chromium logs a request's body where it is small, as here)
    assert len(bodies) == 1
    content = bodies[-1]["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")

    # second turn: the history is resent with the image part (the server reuses its KV)
    _send(d, "And the colours?")
    assert _reply(d, wait, 1) == second
    bodies = _sent_bodies(d)
    assert len(bodies) == 1
    msgs = bodies[-1]["messages"]
    assert msgs[0]["content"] == content  # the same parts, byte for byte
    assert msgs[1] == {"role": "assistant", "content": first} and msgs[2]["content"] == "And the colours?"
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_audio_turn_equals_the_python_api(mm_server, mm_eng, browser, media):
    from selenium.webdriver.common.by import By

    d = browser
    wav = media / "tone.wav"
    want = mm_eng.create_conversation(sampler={"temperature": 0.0}, max_new_tokens=N).send(
        [Audio(wav), "What do you hear?"])
    wait = _open(d, mm_server, "mm")
    _attach(d, wait, wav, 1)
    assert d.find_element(By.CSS_SELECTOR, "#pending .audio-label").text == "audio: tone.wav"
    _send(d, "What do you hear?")
    assert _reply(d, wait, 0) == want
    user = d.find_elements(By.CSS_SELECTOR, ".msg.user")[-1]
    assert user.find_element(By.CSS_SELECTOR, ".audio-label").text == "audio: tone.wav"
    bodies = _sent_bodies(d)
    assert len(bodies) == 1
    part = bodies[-1]["messages"][-1]["content"][0]
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"


def test_corrupt_image_shows_the_error_and_stays_pending(mm_server, browser, media):
    from selenium.webdriver.common.by import By

    d = browser
    bad = media / "corrupt.png"
    msg = _server_error(mm_server, bad)
    wait = _open(d, mm_server, "mm")
    _attach(d, wait, bad, 1)
    _send(d, "Describe it")
    shown = _error(d, wait)
    assert shown == f"Error: {msg} (HTTP 400)", shown
    assert _pending_names(d) == ["corrupt.png (2 KB)"]  # kept for a retry or removal
    assert d.find_element(By.ID, "input").get_attribute("value") == "Describe it"  # the text is back too
    # remove it and send the text alone: the chat goes on
    d.find_element(By.CSS_SELECTOR, "#pending .remove").click()
    wait.until(lambda d: not d.find_element(By.ID, "pending").is_displayed())
    d.find_element(By.ID, "send").click()
    assert _reply(d, wait, 0)


def _server_error(srv, path: Path) -> str:
    """The server's error message for [that file as an image, "Describe it"] (the page's request)."""
    import base64

    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={"max_tokens": N, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "Describe it"}]}]})
    assert r.status_code == 400, r.text
    return r.json()["error"]["message"]


def test_text_only_bundles_refuse_the_image_clearly(g3n_text_server, text_server, browser, media):
    from selenium.webdriver.common.by import By

    d = browser
    png = media / "picture.png"
    # Gemma 3n without its towers: "this bundle (g3n-text.edgelm) has no image encoder, ..."
    msg = _server_error(g3n_text_server, png)
    assert "has no image encoder" in msg
    wait = _open(d, g3n_text_server, "g3n-text")
    _attach(d, wait, png, 1)
    _send(d, "Describe it")
    shown = _error(d, wait)
    assert shown == f"Error: {msg} (HTTP 400)", shown
    assert d.find_element(By.ID, "pending").is_displayed()
    assert [n.split(" (")[0] for n in _pending_names(d)] == ["picture.png"]  # (title: "name (size)")
    # tests/tiny_bundle.py's Gemma 3 bundle: its template reads string content only, and the
    # server says that (before it looks for towers)
    msg = _server_error(text_server, png)
    assert "image" in msg
    wait = _open(d, text_server, "tiny")
    _attach(d, wait, png, 1)
    _send(d, "Describe it")
    assert _error(d, wait) == f"Error: {msg} (HTTP 400)"
    assert len(_pending_names(d)) == 1


def test_body_over_the_limit_shows_the_413(text_server, browser, media):
    d = browser
    wait = _open(d, text_server, "tiny")
    _attach(d, wait, media / "big.png", 1)
    _send(d, "What is this?")
    shown = _error(d, wait)
    assert f"larger than {TEXT_MAX_BODY} bytes" in shown and "413" in shown, shown
    assert len(_pending_names(d)) == 1
