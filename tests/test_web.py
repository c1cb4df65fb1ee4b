"""The web chat page at / in headless Chromium (selenium + Debian's chromium/chromium-driver):
it streams a reply from the SSE endpoint that equals the API's greedy reply, shows tokens
per second, keeps the conversation for a second turn, loads nothing from outside, and says
so when the served model is a base (not instruction-tuned) model.

Needs `apt-get install chromium chromium-driver` (CI installs them; see docs/serving.md).
Skips, saying so, only where no Chromium/driver is installed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import browser  # noqa: E402,F401  (a fixture)
from tiny_bundle import tiny_bundle  # noqa: E402

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from edgelm import Engine  # noqa: E402
from edgelm.runtime.conversation import render_chat  # noqa: E402
from edgelm.runtime.modelinfo import BASE_MODEL_NOTICE  # noqa: E402
from edgelm.runtime.session import GenerationStats  # noqa: E402
from edgelm.server import BackgroundServer, create_app  # noqa: E402

STATIC = Path(__file__).resolve().parents[1] / "edgelm" / "server" / "static"


@pytest.fixture(scope="module")
def eng():
    # The numpy backend: the tiny model on the native kernels decodes 1000 tokens in under a
    # second, which is less than selenium needs to click "stop" after the first token.
    e = Engine(tiny_bundle(), max_tokens=1024, backend="numpy")
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(eng):
    app = create_app(eng, model_name="tiny")
    with BackgroundServer(app) as srv:
        srv.scheduler = app.state.scheduler
        yield srv


@pytest.fixture(scope="module")
def base_server():
    """A base model (its source is named gemma-3-base-hf) behind an API key."""
    e = Engine(tiny_bundle("gemma-3-base"), max_tokens=256, backend="numpy")
    with BackgroundServer(create_app(e, api_key=KEY)) as srv:
        yield srv
    e.close()


KEY = "sk-web-1"


def greedy_reply(eng, messages, n):
    _, ids = render_chat(eng, messages)
    s = eng.create_session({"temperature": 0.0})
    return "".join(p for p in s.generate(ids, max_new_tokens=n) if not isinstance(p, GenerationStats))


def test_page_has_no_external_resources():
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), f.name
        assert "cdn" not in text.lower(), f.name
        assert not re.search(r"""(fetch|import)\(\s*["']https?:""", text), f.name


def test_page_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "edgelm" in r.text
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 200


def test_page_has_the_base_model_notice(server, base_server):
    """What the page reads (without a browser): a hidden #notice, the notice text, and the
    `instruction_tuned` field of /v1/models that decides whether it shows."""
    html = httpx.get(server.url + "/").text
    assert re.search(r'<div id="notice"[^>]*\bhidden\b', html), html
    js = httpx.get(server.url + "/static/app.js").text
    assert f"const BASE_NOTICE = {json.dumps(BASE_MODEL_NOTICE)};" in js
    assert "instruction_tuned === false" in js
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["instruction_tuned"] is True
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(base_server.url + "/v1/models", headers=auth).json()["data"][0]["instruction_tuned"] is False


def test_chat_in_headless_chromium(server, browser, eng):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")
    wait = WebDriverWait(d, 30)
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny")
    for field, value in (("temperature", "0"), ("max-tokens", "24"), ("system", "Be brief.")):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)

    def turn(k, text):
        d.find_element(By.ID, "input").send_keys(text)
        d.find_element(By.ID, "send").click()
        return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#reply-{k}[data-done='1']"))

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    first = greedy_reply(eng, msgs, 24)
    div = turn(0, "Hello world")
    assert div.find_element(By.CLASS_NAME, "content").text == first.strip()  # (text() trims the ends)
    stats = div.find_element(By.CLASS_NAME, "stats").text
    assert re.search(r"24 tokens · [\d.]+ tok/s", stats), stats
    tps = d.find_element(By.ID, "tps").text
    assert re.fullmatch(r"[\d.]+ tok/s", tps) and float(tps.split()[0]) > 0, tps

    # second turn: the page sends the whole history back
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "thanks"}]
    second = greedy_reply(eng, msgs, 24)
    div = turn(1, "thanks")
    assert div.find_element(By.CLASS_NAME, "content").text == second.strip()
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    # streamed: the response came as server-sent events
    perf = [m["message"] for m in d.get_log("performance")]
    assert any("text/event-stream" in m for m in perf)
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_stop_button_cancels_the_generation(server, browser):
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")
    wait = WebDriverWait(d, 30, poll_frequency=0.01)
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "tiny")
    for field, value in (("temperature", "0"), ("max-tokens", "1000")):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    d.find_element(By.ID, "input").send_keys("Hello world")
    d.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#reply-0 .content").text)
    d.find_element(By.ID, "stop").click()
    div = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#reply-0[data-done='1']"))
    assert "cancelled" in div.find_element(By.CLASS_NAME, "stats").text
    assert d.find_element(By.ID, "state").text == "stopped"
    assert not d.find_element(By.ID, "notice").is_displayed()  # an instruction-tuned bundle: no notice
    sched = server.scheduler
    t0 = time.monotonic()
    while not (sched.recent and not sched.stats()["running"]):
        assert time.monotonic() - t0 < 10
        time.sleep(0.01)
    job_id, reason, n = sched.recent[-1]
    assert reason == "cancelled" and n < 1000


def test_base_model_notice_in_headless_chromium(base_server, browser):
    """The page shows the base-model notice; with an API key it learns the model once the key is
    entered, and chat works (the page omits `model` while it does not know the id)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(base_server.url + "/")
    wait = WebDriverWait(d, 30)
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert d.find_element(By.ID, "model-name").text == ""  # /v1/models said 401: no key yet
    for field, value in (("temperature", "0"), ("max-tokens", "4"), ("api-key", KEY)):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    d.find_element(By.ID, "input").send_keys("Hello world")  # (leaving the key field fires its change)
    d.find_element(By.ID, "send").click()
    div = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#reply-0[data-done='1']"))
    assert re.match(r"\d+ tokens", div.find_element(By.CLASS_NAME, "stats").text)
    notice = wait.until(lambda d: d.find_element(By.ID, "notice") if d.find_element(By.ID, "notice").is_displayed()
                        else None)
    assert notice.text == BASE_MODEL_NOTICE
    wait.until(lambda d: d.find_element(By.ID, "model-name").text == "gemma-3-base")
    d.execute_script("localStorage.clear()")
