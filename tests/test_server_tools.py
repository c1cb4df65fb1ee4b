"""Tool calling and the tool/response_format errors of the OpenAI server, through the
official `openai` client: a tiny random model whose chat template declares tools (and a
vocabulary that can write the call's newlines), the default-template tiny model (edgelm's
Gemma convention), and the real 270M constrained to a tool's schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import tiny_bundle  # noqa: E402

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from edgelm import Engine  # noqa: E402
from edgelm.server import BackgroundServer, create_app  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _serve(path, name):
    eng = Engine(path, max_tokens=1024)
    app = create_app(eng, max_queue=16, model_name=name)
    return eng, BackgroundServer(app)


@pytest.fixture(scope="module")
def tools_client():
    eng, srv = _serve(tiny_bundle("tools"), "tiny-tools")
    with srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60), srv
    eng.close()


def _check_calls(calls):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 1), (1.0, 2)])
def test_required_tool_call_round_trip(tools_client, temperature, seed):
    client, _ = tools_client
    kw = dict(model="tiny-tools", tools=TOOLS, max_tokens=200, temperature=temperature, seed=seed)
    r = client.chat.completions.create(messages=ASK, tool_choice="required", **kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(msg.tool_calls)
    # streamed: the deltas assemble into the same call
    calls: dict[int, dict] = {}
    finish = None
    for ch in client.chat.completions.create(messages=ASK, tool_choice="required", stream=True, **kw):
        for c in ch.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                cur = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                cur["id"] = d.id or cur["id"]
                cur["name"] += (d.function.name or "") if d.function else ""
                cur["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in msg.tool_calls]
    # the result goes back as a tool message; the next turn answers in text
    call = msg.tool_calls[0]
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sun"})}]
    r2 = client.chat.completions.create(messages=follow, tool_choice="none", **{**kw, "max_tokens": 8})
    assert r2.choices[0].message.tool_calls is None and r2.choices[0].finish_reason in ("stop", "length")
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_named_tool_choice_and_auto(tools_client):
    client, _ = tools_client
    r = client.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    _check_calls(r.choices[0].message.tool_calls)
    for seed in range(4):  # auto: prose, or a call that is well formed once begun
        r = client.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, max_tokens=200,
                                           temperature=1.0, seed=seed)
        c = r.choices[0]
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
            _check_calls(c.message.tool_calls)
        else:
            assert c.message.content is not None and c.finish_reason in ("stop", "length")


def test_max_tokens_cuts_a_call(tools_client):
    client, _ = tools_client
    r = client.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=20, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and not c.message.tool_calls
    assert c.message.content.startswith("```tool_call\n{") and r.usage.completion_tokens == 20


def _error(srv, body):
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    return r.status_code, r.json()["error"]


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{\"zone\": \"UTC\"}"}}


@pytest.mark.parametrize("body,param,needle", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]", "name"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools[2]", "get_weather"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools",
     "objekt"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id", "tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "call_9",
                                                                      "content": "x"}]}, "messages", "call_9"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]},
     "messages[1].tool_calls[0].function", "name"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "get_time",
                                                                                       "arguments": "{oops"}}]}]},
     "messages", "not valid JSON"),
])
def test_bad_tool_requests_get_400(tools_client, body, param, needle):
    _, srv = tools_client
    status, err = _error(srv, {"messages": ASK, **body})
    assert status == 400, err
    assert err["param"].startswith(param) and needle in err["message"], err


def test_gemma_convention_needs_a_newline_piece():
    """The default tiny model's vocabulary cannot spell the call's newlines: a required call is a
    clear 400 before any generation, not a hang or a 500."""
    eng, srv = _serve(tiny_bundle(), "tiny")
    with srv:
        status, err = _error(srv, {"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
        assert status == 400 and err["param"] == "tools" and "vocabulary" in err["message"], err
    eng.close()


@pytest.mark.slow
def test_real_model_calls_the_tool(real_int8_bundle):
    """The real 270M (a base model, Gemma's template: edgelm's tool prompt) constrained to the
    tools' schemas, through the openai client."""
    eng, srv = _serve(real_int8_bundle, "gemma")
    with srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for temperature, seed in [(0, None), (1.0, 1)]:
            r = client.chat.completions.create(model="gemma", messages=ASK, tools=TOOLS, tool_choice="required",
                                               max_tokens=60, temperature=temperature, seed=seed)
            assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
            _check_calls(r.choices[0].message.tool_calls)
    eng.close()
