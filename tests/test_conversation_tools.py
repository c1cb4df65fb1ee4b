"""Tool calling from Python (Conversation tools=, run() with a confirmation hook,
add_tool_result/stream(None)) on tiny random models: one whose template declares tools itself,
one with Gemma's template (edgelm's convention: declarations in the system prompt, fenced
calls and results)."""

from __future__ import annotations

from typing import Literal

import pytest

from edgelm import Engine
from edgelm.errors import BadInputError
from edgelm.runtime.tools import ToolCall, ToolCallError

from .tiny_bundle import tiny_bundle

jsonschema = pytest.importorskip("jsonschema")


def get_weather(city: Literal["Paris", "Rome"], days: Literal[1, 2, 3] = 1) -> dict:
    """The weather forecast.

    Args:
        city: where
        days: how many days ahead
    """
    CALLS.append(("get_weather", city, days))
    return {"city": city, "forecast": ["sun"] * days}


def local_time(zone: Literal["UTC", "CET"]) -> str:
    """The local time in a time zone."""
    CALLS.append(("local_time", zone))
    return "12:00"


CALLS: list = []


@pytest.fixture(scope="module", params=["tools", "newline"])
def eng(request):
    e = Engine(tiny_bundle(request.param), max_tokens=1024)
    yield e
    e.close()


@pytest.fixture(autouse=True)
def _clear():
    CALLS.clear()


def test_run_calls_the_tool_after_confirmation(eng):
    # (one tool: the tiny vocabulary spells the declarations nearly a character a token)
    conv = eng.create_conversation(tools=[get_weather], sampler={"temperature": 1.0, "seed": 0}, max_new_tokens=90)
    asked: list[ToolCall] = []

    def confirm(call):
        asked.append(call)
        return True

    try:  # a random model may well call again in its "auto" reply: one round is enough here
        reply = conv.run("Weather in Rome?", tool_choice="get_weather", confirm=confirm, max_rounds=1)
    except ToolCallError as e:
        assert "after 1 rounds" in str(e) and conv.last_tool_calls
        assert conv.history[3]["tool_calls"]
    else:
        assert conv.history[3] == {"role": "assistant", "content": reply} and not conv.last_tool_calls
    assert len(asked) == 1 and asked[0].name == "get_weather"
    assert CALLS[0] == ("get_weather", asked[0].arguments["city"], asked[0].arguments.get("days", 1))
    roles = [m["role"] for m in conv.history]
    assert roles[:4] == ["user", "assistant", "tool", "assistant"]
    first = conv.history[1]
    assert first["tool_calls"][0]["function"]["name"] == "get_weather"
    assert conv.history[2]["tool_call_id"] == asked[0].id and "sun" in conv.history[2]["content"]
    # the rendered prompt shows the call and the result to the model
    text = conv.render()
    assert "get_weather" in text and "sun" in text


def test_declined_call_is_not_run(eng):
    conv = eng.create_conversation(tools=[get_weather], sampler={"temperature": 0}, max_new_tokens=100)
    conv.run("Weather?", tool_choice="required", confirm=lambda call: False)
    assert CALLS == []
    assert conv.history[2]["role"] == "tool" and "declined" in conv.history[2]["content"]


def test_manual_loop_reuses_the_cache(eng):
    conv = eng.create_conversation(tools=[get_weather], sampler={"temperature": 0}, max_new_tokens=100)
    conv.send("Weather in Paris?", tool_choice="required")
    (call,) = conv.last_tool_calls
    jsonschema.validate(call.arguments, conv.tools[0].parameters)
    assert conv.last_stats.stop_reason == "grammar_complete"
    with pytest.raises(BadInputError, match="add_tool_result"):
        conv.send(None)
    with pytest.raises(BadInputError, match="no tool call with id"):
        conv.add_tool_result("call_nope", "x")
    conv.add_tool_result(call, {"forecast": "rain"})
    held = conv.n_tokens
    reply = conv.send(None, tool_choice="none", max_new_tokens=5)
    assert isinstance(reply, str) and conv.last_tool_calls == []
    assert conv.last_prefill_tokens < conv.n_tokens - held + 40  # only the new turn was fed (plus the call)
    assert [m["role"] for m in conv.history] == ["user", "assistant", "tool", "assistant"]


def test_max_rounds_and_bad_arguments(eng):
    conv = eng.create_conversation(tools=[get_weather], sampler={"temperature": 0}, max_new_tokens=100)
    with pytest.raises(BadInputError, match="tool_choice"):
        conv.send("x", tool_choice="nope")
    with pytest.raises(BadInputError, match="constraint"):
        conv.send("x", constraint={"regex": "a"})
    with pytest.raises(BadInputError, match="max_rounds"):
        conv.run("x", max_rounds=0)
    assert conv.history == []  # nothing happened
    no_fn = eng.create_conversation(tools=[{"name": "ext", "parameters": {"type": "object", "properties": {},
                                                                          "additionalProperties": False}}],
                                    sampler={"temperature": 0}, max_new_tokens=100)
    with pytest.raises(BadInputError, match="no Python function"):
        no_fn.run("Call it", tool_choice="required")
    assert no_fn.last_tool_calls and no_fn.last_tool_calls[0].name == "ext"
    loop = eng.create_conversation(tools=[get_weather], tool_choice="required", sampler={"temperature": 0},
                                   max_new_tokens=100)
    with pytest.raises(ToolCallError, match="after 1 rounds"):
        loop.run("Weather?", max_rounds=1)
    assert len(CALLS) == 1 and loop.last_tool_calls


def test_no_newline_piece_is_a_clear_error():
    e = Engine(tiny_bundle())
    conv = e.create_conversation(tools=[get_weather])
    with pytest.raises(BadInputError, match="vocabulary cannot write"):
        conv.send("Weather?")
    assert conv.history == []
    assert isinstance(conv.send("Hi", tool_choice="none", max_new_tokens=3), str)
