"""Tool calling in Gemma's format (edgelm/runtime/tools.py): schemas from annotated functions
validate the arguments they should (jsonschema); docstring styles; declarations checked with
the field named; OpenAI messages rendered by the Gemma template as alternating turns with
```tool_call / ```tool_output blocks; replies parsed, and streamed at every split into the
same content and calls; the call grammar accepts exactly one call (byte-level llguidance
matcher) and constrains the tiny model into calls that parse and validate."""

import dataclasses
import enum
import json
import re
from importlib.resources import files
from typing import Annotated, Any, List, Literal, Optional, TypedDict

import llguidance as llg
import pytest

from edgelm.errors import BadInputError
from edgelm.runtime.tools import (TRIGGER, Tool, ToolCall, ToolCallError, ToolCallStream, call_grammar,
                                  coerce_tools, gemma_tool_prompt, parse_docstring, parse_tool_calls, run_tool,
                                  tool_from_function, tool_messages)

jsonschema = pytest.importorskip("jsonschema")


def _valid(schema, value) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


# ----------------------------------------------------------------------------- schemas

class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


@dataclasses.dataclass
class Place:
    city: str
    country: str = "FR"


class Window(TypedDict):
    start: int
    end: int


def get_weather(city: str, days: int, unit: Unit = Unit.C, detailed: bool = False,
                hours: Optional[list[int]] = None, mood: Literal["sunny", "any"] = "any",
                place: Place | None = None, window: Window | None = None, tags: dict[str, float] | None = None,
                pair: tuple[int, str] | None = None, extra: Any = None, raw=None):
    """Get the weather
    for a city.

    Second paragraph, not in the description.

    Args:
        city (str): The city's name,
            in English.
        days: How many days.
        unit: The unit.

    Returns:
        The forecast.
    """


def test_schema_from_annotated_function():
    t = tool_from_function(get_weather)
    p = t.parameters
    assert t.name == "get_weather" and t.fn is get_weather
    assert t.description == "Get the weather for a city."
    assert p["type"] == "object" and p["additionalProperties"] is False
    assert p["required"] == ["city", "days"]
    props = p["properties"]
    assert props["city"] == {"type": "string", "description": "The city's name, in English."}
    assert props["days"] == {"type": "integer", "description": "How many days."}
    assert props["unit"] == {"enum": ["celsius", "fahrenheit"], "description": "The unit.", "default": "celsius"}
    assert props["hours"]["anyOf"] == [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]
    assert props["mood"]["enum"] == ["sunny", "any"]
    assert props["extra"] == {"default": None} and props["raw"] == {"default": None}
    good = [
        {"city": "Paris", "days": 3},
        {"city": "Paris", "days": 3, "unit": "fahrenheit", "detailed": True, "hours": [1, 2], "mood": "sunny",
         "place": {"city": "Lyon"}, "window": {"start": 1, "end": 2}, "tags": {"a": 1.5}, "pair": [1, "x"],
         "extra": [1, {"x": None}], "raw": "anything"},
        {"city": "Paris", "days": 0, "hours": None, "place": None},
    ]
    bad = [
        {"city": "Paris"},                                   # days is required
        {"city": "Paris", "days": 1.5},                      # not an integer
        {"city": "Paris", "days": True} if False else {"city": 3, "days": 1},
        {"city": "Paris", "days": 1, "unit": "kelvin"},       # not in the enum
        {"city": "Paris", "days": 1, "mood": "rainy"},
        {"city": "Paris", "days": 1, "hours": ["1"]},
        {"city": "Paris", "days": 1, "place": {"country": "FR"}},          # place.city required
        {"city": "Paris", "days": 1, "place": {"city": "a", "zip": 1}},     # no extra keys
        {"city": "Paris", "days": 1, "window": {"start": 1}},
        {"city": "Paris", "days": 1, "tags": {"a": "x"}},
        {"city": "Paris", "days": 1, "pair": [1, 2]},
        {"city": "Paris", "days": 1, "pair": [1]},
        {"city": "Paris", "days": 1, "other": 1},                           # additionalProperties
    ]
    for g in good:
        assert _valid(p, g), g
    for b in bad:
        assert not _valid(p, b), b


def test_schema_annotated_typing_aliases_and_pydantic():
    def f(a: List[str], b: Annotated[int, "How many."], c: Optional[Literal[1, 2]] = None, d: tuple[float, ...] = ()):
        """:param a: The names,
            one per item.
        :param str c: Which one.
        """
    p = tool_from_function(f, name="alias-test").parameters
    assert p["properties"]["a"] == {"type": "array", "items": {"type": "string"}, "description": "The names, one per item."}
    assert p["properties"]["b"] == {"type": "integer", "description": "How many."}
    assert p["properties"]["c"]["description"] == "Which one."
    assert _valid(p, {"a": ["x"], "b": 1, "c": 2, "d": [1.5, 2]})
    assert not _valid(p, {"a": ["x"], "b": 1, "c": 3})

    pydantic = pytest.importorskip("pydantic")

    class Inner(pydantic.BaseModel):
        x: int

    class Query(pydantic.BaseModel):
        text: str
        inner: Inner

    def search(q: Query, limit: int = 5):
        """Search."""
    p = tool_from_function(search).parameters
    assert "Inner" in p["$defs"] and p["required"] == ["q"]
    assert _valid(p, {"q": {"text": "a", "inner": {"x": 1}}})
    assert not _valid(p, {"q": {"text": "a", "inner": {"x": "no"}}})


def test_docstring_styles():
    google = """Summary line.

    Args:
        a (int): First,
            continued.
        b: Second.
        *rest: Ignored star.

    Returns:
        Nothing.
    """
    assert parse_docstring(google) == ("Summary line.", {"a": "First, continued.", "b": "Second.", "rest": "Ignored star."})
    sphinx = """Do it.

    :param a: First.
    :param int b: Second,
        more.
    :type b: int
    :returns: x
    """
    assert parse_docstring(sphinx) == ("Do it.", {"a": "First.", "b": "Second, more."})
    google_next_line = """Args:
        a:
            On the next line.
    b: not an entry (outside the section)
    """
    assert parse_docstring(google_next_line) == ("", {"a": "On the next line."})
    assert parse_docstring("Get the weather: today.\nArgs:\n    a: x") == ("Get the weather: today.", {"a": "x"})
    assert parse_docstring(None) == ("", {})


def test_function_rejections_name_the_function():
    def star(a: int, *args): pass
    def kw(a: int, **opts): pass
    def pos(a: int, /): pass
    def weird(a: complex): pass
    cases = [(star, "function star: *args"), (kw, "function kw: **opts"), (pos, "function pos: a"),
             (weird, "function weird, parameter 'a': the type <class 'complex'> has no JSON schema"),
             (lambda x: x, "'<lambda>' must match")]
    for fn, needle in cases:
        with pytest.raises(BadInputError) as e:
            tool_from_function(fn)
        assert needle in str(e.value), (needle, str(e.value))


# ----------------------------------------------------------------------------- declarations

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}


def test_coerce_tools_accepts_every_form():
    def ping(host: str) -> str:
        """Ping a host."""
        return "pong " + host
    tools = coerce_tools([
        Tool("a", "A.", SCHEMA),
        ping,
        {"type": "function", "function": {"name": "b", "description": "B.", "parameters": SCHEMA, "strict": True}},
        {"name": "c", "parameters": {"properties": {}}},
        {"type": "function", "function": {"name": "d"}},
    ])
    assert [t.name for t in tools] == ["a", "ping", "b", "c", "d"]
    assert tools[1].description == "Ping a host." and tools[1].fn is ping
    assert tools[2].parameters == SCHEMA and tools[3].parameters == {"type": "object", "properties": {}}
    assert tools[4].parameters == {"type": "object", "properties": {}} and tools[4].description == ""
    assert tools[2].to_openai() == {"type": "function",
                                    "function": {"name": "b", "description": "B.", "parameters": SCHEMA}}
    assert coerce_tools(None) == [] and coerce_tools([]) == []


def test_coerce_tools_rejections_name_the_field():
    cases = [
        ("x", "tools must be a list"),
        ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name must match"),
        ([{"name": "a"}, {"name": "x" * 65}], "tools[1].name must match"),
        ([{"name": "a"}, {"name": "b"}, {"type": "function", "function": {"name": "a"}}],
         "tools[2].function.name 'a' repeats tools[0]"),
        ([{"name": "a", "parameters": [1]}], "tools[0].parameters must be a JSON schema object, got list"),
        ([{"name": "a", "parameters": {"type": "array"}}], 'tools[0].parameters.type must be "object"'),
        ([{"name": "a", "description": 5}], "tools[0].description must be a string"),
        ([{"type": "tool", "function": {"name": "a"}}], 'tools[0].type must be "function"'),
        ([{"type": "function", "function": "a"}], "tools[0].function must be an object"),
        ([{"name": "a", "strict": "yes"}], "tools[0].strict must be true or false"),
        ([{"name": "a", "parameters": {"type": "object", "default": {1, 2}}}], "tools[0].parameters is not JSON"),
        ([3], "tools[0] must be a Tool, a function or a function declaration, got int"),
        ([lambda *a: 0], "tools[0]: the tool name '<lambda>'"),
    ]
    for tools, needle in cases:
        with pytest.raises(BadInputError) as e:
            coerce_tools(tools)
        assert needle in str(e.value), (needle, str(e.value))


def test_tool_call_to_openai_and_ids():
    calls = [ToolCallStream([]) for _ in range(2)]
    _, (c,) = parse_tool_calls('```tool_call\n{"name": "a", "arguments": {"x": 1}}\n```', [{"name": "a"}])
    assert re.fullmatch(r"call_[0-9a-f]{24}", c.id)
    assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}}
    assert calls[0].calls == []


def test_prompt_declares_tools_and_the_format():
    p = gemma_tool_prompt([{"name": "get_weather", "description": "Weather.", "parameters": SCHEMA}])
    assert '```tool_call\n{"name": "function_name", "arguments": {"parameter": "value"}}\n```' in p
    assert "one call per block" in p and "nothing else" in p and "```tool_output" in p
    decl = p.splitlines()[-1]
    assert json.loads(decl) == {"name": "get_weather", "description": "Weather.", "parameters": SCHEMA}
    assert gemma_tool_prompt([]) == ""


# ----------------------------------------------------------------------------- messages

def _gemma_template():
    from edgelm.runtime.conversation import ChatTemplate

    return ChatTemplate(files("edgelm").joinpath("templates/gemma.jinja").read_text(), bos_token="<bos>")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": SCHEMA}},
         {"name": "get_time", "description": "Time.", "parameters": {"type": "object", "properties": {}}}]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    {"role": "assistant", "content": "21 degrees at noon."},
    {"role": "user", "content": "Thanks."},
]


def test_tool_messages_render_on_the_gemma_template():
    msgs, extra = tool_messages(CHAT, TOOLS, template_reads_tools=False)
    assert extra == {}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n") and msgs[0]["content"].endswith(
        json.dumps({"name": "get_time", "description": "Time.", "parameters": {"type": "object", "properties": {}}}))
    assert msgs[2]["content"] == ('Let me look.\n```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n'
                                  '```tool_call\n{"name": "get_time", "arguments": {}}\n```')
    assert "tool_calls" not in msgs[2]
    assert msgs[3]["content"] == ('```tool_output\n{"name": "get_weather", "content": {"temp": 21}}\n```\n'
                                  '```tool_output\n{"name": "get_time", "content": "noon"}\n```')
    text = _gemma_template().render(msgs)
    turns = re.findall(r"<start_of_turn>(\w+)\n", text)
    assert turns == ["user", "model", "user", "model", "user", "model"]
    assert text.count("```tool_call\n") == 3 and text.count("```tool_output\n") == 2  # 3: the prompt's example
    # the model turn holds the calls as the model writes them, so they parse back
    model_turn = text.split("<start_of_turn>model\n")[1].split("<end_of_turn>")[0]
    content, calls = parse_tool_calls(model_turn, TOOLS)
    assert content == "Let me look." and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert CHAT[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # input untouched


def test_tool_messages_edges():
    # no system message: one is made; results followed by a user message: one user turn
    msgs, _ = tool_messages([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c9", "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": "and?"}], TOOLS)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"] == gemma_tool_prompt(TOOLS)
    assert msgs[3]["content"] == '```tool_output\n{"name": "get_time", "content": "noon"}\n```\n\nand?'
    text = _gemma_template().render(msgs)
    assert re.findall(r"<start_of_turn>(\w+)\n", text) == ["user", "model", "user", "model"]
    # no tools, no tool fields: the very same messages
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    out, extra = tool_messages(plain, None)
    assert out == plain and all(a is b for a, b in zip(out, plain)) and extra == {}
    # a template that reads tools: arguments as dicts, tools as a kwarg
    out, extra = tool_messages(CHAT, TOOLS, template_reads_tools=True)
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[3] is CHAT[3] and extra == {"tools": [t.to_openai() for t in coerce_tools(TOOLS)]}


def test_tool_messages_rejections():
    bad_id = CHAT[:3] + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]
    bad_args = [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "a", "arguments": "{x"}}]}]
    list_args = [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "a", "arguments": "[1]"}}]}]
    cases = [(bad_id, "messages[3].tool_call_id 'call_x' matches no earlier assistant tool call"),
             (bad_args, "messages[0].tool_calls[0].function.arguments is not valid JSON"),
             (list_args, "messages[0].tool_calls[0].function.arguments must be a JSON object"),
             ([{"role": "bot", "content": ""}], "messages[0].role must be one of"),
             ([{"role": "tool", "tool_call_id": "1", "content": 5}], "messages[0].tool_call_id '1'")]
    for msgs, needle in cases:
        with pytest.raises(BadInputError) as e:
            tool_messages(msgs, TOOLS)
        assert needle in str(e.value), (needle, str(e.value))


# ----------------------------------------------------------------------------- parsing

W = '```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
T = '```tool_call\n{"name": "get_time", "arguments": {}}\n```'
TEXTS = {
    "plain": ("Just text, with ``` and `` and <tool and ```tool_cal.", "Just text, with ``` and `` and <tool and ```tool_cal.", []),
    "call": (W, "", [("get_weather", {"city": "Paris"}, '{"city": "Paris"}')]),
    "text_then_calls": ("I'll check.\n\n" + W + "\n" + T + "\n", "I'll check.",
                        [("get_weather", {"city": "Paris"}, '{"city": "Paris"}'), ("get_time", {}, "{}")]),
    "between": ("a " + T + " b " + T + " c", "a  b  c", [("get_time", {}, "{}"), ("get_time", {}, "{}")]),
    "tricky_args": ('```tool_call\n {"name":"get_weather",\n"arguments" :{"city": "P}\\"```\\n"} }  \n```tail',
                    "tail", [("get_weather", {"city": 'P}"```\n'}, '{"city": "P}\\"```\\n"}')]),
    "args_first": ('```tool_call\n{"arguments": {"city": "Rome"}, "name": "get_weather"}\n```', "",
                   [("get_weather", {"city": "Rome"}, '{"city": "Rome"}')]),
    "parameters_alias": ('```tool_call\n{"name": "get_weather", "parameters": {"city": "X"}}\n```', "",
                         [("get_weather", {"city": "X"}, '{"city": "X"}')]),
    "no_args": ('```tool_call\n{"name": "get_time"}\n```', "", [("get_time", {}, "{}")]),
    "xml": ('ok <tool_call>{"name": "get_time", "arguments": {"a": [1, {"b": 2}]}}</tool_call>', "ok",
            [("get_time", {"a": [1, {"b": 2}]}, '{"a": [1, {"b": 2}]}')]),
    "unicode": ('é ' + '```tool_call\n{"name": "get_weather", "arguments": {"city": "Zürich ☃"}}\n```', "é",
                [("get_weather", {"city": "Zürich ☃"}, '{"city": "Zürich ☃"}')]),
}


def _summary(calls):
    return [(c.name, c.arguments, c.arguments_json) for c in calls]


def test_parse_tool_calls_handcrafted():
    for key, (text, content, calls) in TEXTS.items():
        got_content, got = parse_tool_calls(text, TOOLS)
        assert (got_content, _summary(got)) == (content, calls), key
    # a bare JSON call is a call only when it names a tool and has arguments
    bare = ' {"name": "get_weather", "arguments": {"city": "Oslo"}} '
    assert _summary(parse_tool_calls(bare, TOOLS)[1]) == [("get_weather", {"city": "Oslo"}, '{"city": "Oslo"}')]
    for not_a_call in ('{"name": "other", "arguments": {}}', '{"name": "get_time"}', '{"a": 1}', "{bad"):
        assert parse_tool_calls(not_a_call, TOOLS) == (not_a_call, [])


def test_parse_tool_calls_errors():
    repeated = '```tool_call\n{"name": "get_time", "arguments": {}, "arguments": {"a": 1}}\n```'
    second_key = repeated.rindex('"arguments')
    trailing_comma = '```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n```'
    cases = [
        (trailing_comma, f"tool call 1: malformed JSON at character {trailing_comma.index(',}') + 1}: "
         "Expecting property name enclosed in double quotes", False),
        ('```tool_call\n{"name": "nope", "arguments": {}}\n```',
         "tool call 1: unknown function 'nope'; the functions are: get_weather, get_time", False),
        (T + '```tool_call\n{"name": "get_time", "arguments": [1]}\n```',
         "tool call 2: the arguments must be a JSON object, got list", False),
        ('```tool_call\n{"arguments": {}}\n```', 'tool call 1: no "name" string', False),
        (repeated, f"tool call 1: malformed JSON at character {second_key}: the key 'arguments' repeats", False),
        ('```tool_call\n{"name": "get_time"} junk\n```', "tool call 1: expected ``` after the call at character", False),
        ('hi ```tool_call\n{"name": "get_time", "argu', "tool call 1: the ```tool_call block is not closed", True),
        ('hi ```tool_call\n{"name": "get_time", "arguments": {}}\n``', "tool call 1: the ```tool_call block is not closed", True),
        ('<tool_call>{"name": "get_time"}', "the <tool_call> block is not closed", True),
    ]
    for text, needle, partial in cases:
        with pytest.raises(ToolCallError) as e:
            parse_tool_calls(text, TOOLS)
        assert needle in str(e.value) and e.value.text == text and e.value.partial is partial, (needle, str(e.value))
    text = 'Checking. ' + T + ' ```tool_call\n{"name": "get_weather", "arguments": {"ci'
    content, calls = parse_tool_calls(text, TOOLS, allow_unclosed=True)
    assert content == 'Checking.  ```tool_call\n{"name": "get_weather", "arguments": {"ci' and len(calls) == 1


def _stream(pieces, tools=TOOLS, allow_unclosed=False):
    s = ToolCallStream(tools)
    events = [e for p in pieces for e in s.feed(p)]
    return events + s.finish(allow_unclosed=allow_unclosed), s


def _reassemble(events):
    content, calls, args, started = "", [], {}, {}
    for e in events:
        if e[0] == "content":
            assert e[1]
            content += e[1]
        elif e[0] == "call_start":
            assert e[1] == len(calls) and e[1] not in started
            started[e[1]] = (e[2], e[3])
            args[e[1]] = ""
        elif e[0] == "call_args":
            assert e[1] in started
            args[e[1]] += e[2]
        else:
            call = e[2]
            assert (call.id, call.name) == started[e[1]] and args[e[1]] == call.arguments_json
            calls.append(call)
    return content, calls


def test_stream_equals_parse_at_every_split():
    for key, (text, content, calls) in TEXTS.items():
        if key == "plain":
            text = text + " ```tool_call\n" + '{"name": "get_time", "arguments": {}}\n```'
            calls = [("get_time", {}, "{}")]
            content = parse_tool_calls(text, TOOLS)[0]
        splits = [[text]] + [[text[:i], text[i:]] for i in range(1, len(text))] + [list(text)]
        splits.append([text[i:i + 3] for i in range(0, len(text), 3)])
        for pieces in splits:
            events, s = _stream(pieces)
            got_content, got = _reassemble(events)
            assert (got_content.strip(), _summary(got)) == (content, calls), (key, pieces)
            assert _summary(s.calls) == calls


def test_stream_is_eager():
    """Content goes out as soon as it cannot start a block; arguments as soon as they arrive;
    call_start once the name is complete."""
    text = "Sure ``` thing <b> ``" + W
    s, seen = ToolCallStream(TOOLS), ""
    trig = (TRIGGER, "<tool_call>")
    for i, ch in enumerate(text[:len("Sure ``` thing <b> ``")]):
        seen += "".join(e[1] for e in s.feed(ch) if e[0] == "content")
        prefix = text[:i + 1]
        hold = max((n for t in trig for n in range(1, len(t)) if prefix.endswith(t[:n])), default=0)
        assert seen == prefix[:len(prefix) - hold]
    events = s.feed('```tool_call\n{"name": "get_weather"')
    assert events[0] == ("content", "``") and events[1][0] == "call_start" and events[1][3] == "get_weather"
    assert s.feed(', "arguments": {"ci') == [("call_args", 0, '{"ci')]
    assert s.feed('ty": "Pa') == [("call_args", 0, 'ty": "Pa')]
    assert s.feed('ris"}') == [("call_args", 0, 'ris"}')]
    assert s.feed("}\n`") == [] and s.feed("``")[0][0] == "call_end"


def test_stream_errors_and_unclosed():
    text = 'a ```tool_call\n{"name": "get_weather", "arguments": {"city": "Pa'
    with pytest.raises(ToolCallError) as e:
        _stream(list(text))
    assert e.value.partial and e.value.text == text and "not closed" in str(e.value)
    events, s = _stream(list(text), allow_unclosed=True)
    kinds = [ev[0] for ev in events]
    assert kinds[:2] == ["content", "content"] and kinds[-1] == "call_args" and set(kinds) == {
        "content", "call_start", "call_args"}
    assert s.unclosed == text[2:] and s.calls == []
    events, s = _stream([text[:20]], allow_unclosed=True)  # nothing of the call streamed yet
    assert "".join(ev[1] for ev in events if ev[0] == "content") == text[:20] and s.unclosed == text[2:20]
    for bad, needle in [('```tool_call\n{"name": "nope", "arguments": {}}\n```', "unknown function 'nope'"),
                        ('```tool_call\n{"name": "get_time", "arguments": {,}}\n``` more', "malformed JSON"),
                        ('```tool_call\n{"name": "get_time"} x```', "expected ```"),
                        ('```tool_call\n{"name": "get_time", "arguments": {}, "arguments": {}}\n```', "repeats")]:
        with pytest.raises(ToolCallError) as e:
            _stream(list(bad))
        assert needle in str(e.value) and not e.value.partial and e.value.text.startswith(bad[:10])


def test_run_tool():
    def add(a: int, b: int = 1):
        return {"sum": a + b}

    def boom(x: str):
        raise ValueError("no " + x)
    calls = {c.name: c for c in [ToolCall("call_1", "add", {"a": 2}, '{"a": 2}'),
                                 ToolCall("call_2", "boom", {"x": "way"}, '{"x": "way"}')]}
    add_t, boom_t = coerce_tools([add, boom])
    assert run_tool(add_t, calls["add"]) == '{"sum": 3}'
    assert run_tool(tool_from_function(lambda a: f"got {a}", name="add"), calls["add"]) == "got 2"
    assert run_tool(boom_t, calls["boom"]) == "error: ValueError: no way"
    with pytest.raises(BadInputError, match="has no function"):
        run_tool(Tool("add"), calls["add"])


# ----------------------------------------------------------------------------- grammar

class _Bytes:
    """A byte-level vocabulary for llguidance: token i < 256 is byte i, 256 is the stop token."""

    def __init__(self):
        self.tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]
        self.eos_token_id, self.bos_token_id, self.special_token_ids = 256, None, [256]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


BYTES = llg.LLTokenizer(llg.TokenizerWrapper(_Bytes()), n_vocab=257, eos_token=[256], slices=[])
GRAMMAR_TOOLS = [
    {"name": "get_weather", "description": "Has } and \" and \n in it.", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"], "additionalProperties": False}},
    {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
]

BOUNDED = [
    {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}},
    {"name": "set_mode", "parameters": {
        "type": "object", "properties": {"mode": {"enum": ["on", "off"]}, "level": {
            "type": "number", "minimum": 0, "maximum": 2, "multipleOf": 0.5}},
        "required": ["mode"], "additionalProperties": False}},
]


def _accepts(grammar: str, text: str) -> bool:
    m = llg.LLMatcher(BYTES, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m.consume_tokens(list(text.encode())) and m.is_accepting()


def test_call_grammar_accepts_exactly_one_call():
    fenced = llg.LLMatcher.grammar_from_lark(call_grammar(GRAMMAR_TOOLS, fenced=True))
    after = llg.LLMatcher.grammar_from_lark(call_grammar(GRAMMAR_TOOLS, fenced=False))
    only_time = llg.LLMatcher.grammar_from_lark(call_grammar(GRAMMAR_TOOLS, fenced=True, name="get_time"))
    good = ['{"name": "get_weather", "arguments": {"city": "Paris"}}',
            '{"name": "get_weather", "arguments": {"city": "Rome", "days": 7}}',
            '{"name": "get_time", "arguments": {}}']
    bad = ['{"name": "get_wether", "arguments": {"city": "Paris"}}',     # wrong name
           '{"name": "get_weather", "arguments": {"city": "Oslo"}}',      # not in the enum
           '{"name": "get_weather", "arguments": {"city": "Rome", "days": 8}}',
           '{"name": "get_weather", "arguments": {"days": 1}}',           # city required
           '{"name": "get_weather", "arguments": {"city":"Paris"}}',      # not compact
           '{"name": "get_weather", "arguments": {"city": "Paris"} }',
           '{"name": "get_time", "arguments": {"x": 1}}']
    for call in good:
        assert _accepts(fenced, f"{TRIGGER}\n{call}\n```"), call
        assert _accepts(after, f"\n{call}\n```"), call
        assert not _accepts(fenced, f"{TRIGGER}\n{call}\n```\n")
        assert not _accepts(fenced, f"{call}")
        assert not _accepts(after, f"{TRIGGER}\n{call}\n```")
        assert _accepts(only_time, f"{TRIGGER}\n{call}\n```") == ("get_time" in call)
        # what the grammar produces parses back to the same call
        assert _summary(parse_tool_calls(f"{TRIGGER}\n{call}\n```", GRAMMAR_TOOLS)[1])[0][2] == \
            call.split('"arguments": ', 1)[1][:-1]
    for call in bad:
        assert not _accepts(fenced, f"{TRIGGER}\n{call}\n```"), call
    assert not _accepts(fenced, f"{TRIGGER}\n{good[0]}\n```{TRIGGER}\n{good[2]}\n```")  # one call only
    with pytest.raises(BadInputError, match="'nope', which is not one of the tools"):
        call_grammar(GRAMMAR_TOOLS, fenced=True, name="nope")
    with pytest.raises(BadInputError, match="at least one tool"):
        call_grammar([], fenced=True)


def test_call_grammar_from_functions_with_defs():
    """A pydantic model's $defs, defaults, descriptions and an own x-guidance compile."""
    pydantic = pytest.importorskip("pydantic")

    class Inner(pydantic.BaseModel):
        x: int

    def f(inner: Inner, flag: bool = False):
        """F.

        Args:
            inner: Has } in it.
        """
    loose = {"name": "loose", "parameters": {"type": "object", "x-guidance": {"whitespace_flexible": True}}}
    g = llg.LLMatcher.grammar_from_lark(call_grammar([f, loose], fenced=True))
    assert _accepts(g, TRIGGER + '\n{"name": "f", "arguments": {"inner": {"x": 3}, "flag": true}}\n```')
    assert not _accepts(g, TRIGGER + '\n{"name": "f", "arguments": {"inner": {"x": "3"}}}\n```')
    assert _accepts(g, TRIGGER + '\n{"name": "loose", "arguments": { "a" :1 }}\n```')


def test_call_grammar_random_walks_give_valid_calls():
    """Random bytes under the grammar's mask, until it stops: every walk is one fenced call
    that parses, names a tool and validates."""
    import random

    import numpy as np

    grammar = llg.LLMatcher.grammar_from_lark(call_grammar(BOUNDED, fenced=True))
    schemas = {t["name"]: t["parameters"] for t in BOUNDED}
    names = set()
    for seed in range(30):
        rng, m, out = random.Random(seed), llg.LLMatcher(BYTES, grammar, log_level=0), bytearray()
        while not m.is_stopped():
            mask = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")[:257]
            allowed = [int(i) for i in np.flatnonzero(mask)]
            ascii_ = [i for i in allowed if 32 <= i < 127 or i == 10] or allowed  # mostly readable
            tok = 256 if 256 in allowed and rng.random() < 0.5 else rng.choice(ascii_)
            assert m.consume_token(tok), m.get_error()
            if tok == 256:
                break
            out.append(tok)
            assert len(out) < 400
        text = out.decode()
        content, (call,) = parse_tool_calls(text, BOUNDED)
        assert content == "" and text == f"{TRIGGER}\n" + json.dumps(
            {"name": call.name, "arguments": call.arguments}, ensure_ascii=False) + "\n```"
        jsonschema.validate(call.arguments, schemas[call.name])
        names.add(call.name)
    assert names == set(schemas)


@pytest.fixture(scope="module")
def tiny():
    from edgelm.runtime.engine import Engine

    from .tiny_bundle import tiny_bundle
    return Engine(tiny_bundle())


def test_constrained_calls_on_the_tiny_model(tiny):
    """At temperature 1 the random tiny model, constrained by the call grammar, writes calls
    that parse, name a tool and validate against its schema."""
    from edgelm.runtime.constrained import Constraint

    tools = coerce_tools(BOUNDED)
    # the tiny vocabulary (ASCII 32..126) cannot spell the fence's newlines: spaces instead,
    # which the parser reads the same (test_real_model_calls has the exact grammar)
    grammar = call_grammar(tools, fenced=True)
    constraint = Constraint(tiny, lark=grammar.replace("\\n", " "))
    _generate_calls(tiny, constraint, tools, range(4), "hello the")


@pytest.mark.slow
def test_real_model_calls(real_int8_bundle):
    """The real 270M, prompted with the tool prompt through its template and constrained by
    the exact call grammar, writes calls that parse and validate."""
    from edgelm.runtime.constrained import Constraint
    from edgelm.runtime.conversation import get_chat_template, prompt_ids
    from edgelm.runtime.engine import Engine

    eng = Engine(real_int8_bundle, max_tokens=1024)
    tools = coerce_tools(BOUNDED)
    msgs, _ = tool_messages([{"role": "user", "content": "What is the weather in Rome for 3 days?"}], tools)
    prompt = prompt_ids(eng, get_chat_template(eng).render(msgs))
    _generate_calls(eng, Constraint(eng, lark=call_grammar(tools, fenced=True)), tools, [None, 0, 1], prompt)


def _generate_calls(eng, constraint, tools, seeds, prompt):
    from edgelm.runtime.session import GenerationStats

    schemas = {t.name: t.parameters for t in tools}
    for seed in seeds:
        s = eng.create_session({"temperature": 0.0 if seed is None else 1.0, "seed": seed})
        text, stats = "", None
        for item in s.generate(prompt, max_new_tokens=200, constraint=constraint):
            if isinstance(item, GenerationStats):
                stats = item
            else:
                text += item
        assert stats.stop_reason == "grammar_complete", (seed, text)
        content, calls = parse_tool_calls(text, tools)
        assert content == "" and len(calls) == 1, text
        jsonschema.validate(calls[0].arguments, schemas[calls[0].name])
        assert _reassemble(_stream(list(text), tools)[0])[1][0].arguments == calls[0].arguments
