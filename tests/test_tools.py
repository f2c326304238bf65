"""Tool calls in each model family's own format (issue 19).

In process: `ToolCallParser` on outputs written as the real models emit them -- Qwen2.5's Hermes
<tool_call> blocks, Llama 3.1/3.2's {"name", "parameters"} (bare or after <|python_tag|>), Mistral's
[TOOL_CALLS][...], the generic {"tool_call"} / {"tool_calls"} -- fed whole, a few characters at a
time as streamed tokens come, and one character at a time (every marker split across pieces); and
`tool_format_of` on each family's chat template (tests/templates/, written after the real ones).

End to end: copies of the test model whose GGUF carries another family's chat template (gguf's own
gguf-new-metadata rewrites the metadata), each served by a real queen, hive and worker and asked
through the `openai` package, so each family's path runs on a real worker.
"""
import json
import sys
from pathlib import Path

import gguf
import jsonschema
import openai
import pytest

from conftest import REPO, start_queen

sys.path.insert(0, str(REPO))
import rbee  # noqa: E402

TEMPLATES = Path(__file__).resolve().parent / "templates"


def call_json(name, arguments, key="arguments", **more):
    """A call's JSON as the models write it: `"name"` first, then the arguments, ", " and ": " between."""
    return json.dumps(dict({"name": name, key: arguments}, **more), ensure_ascii=False)


WEATHER_PARIS = {"city": "Paris", "days": 2}
WEATHER_BERLIN = {"city": "Berlin", "days": 5}
SQL = {"query": "SELECT '}' AS closing, \"{\" AS opening FROM notes WHERE body LIKE '%\"quoted\" }{ text%'",
       "params": ["a]b", "{\"x\": [1, 2]}"], "limit": 10}
UNICODE = {"city": "Zürich", "note": "Grüße, 東京 and a tab\there", "days": 1}

# (format, the model's whole output, the content it holds, the calls [(name, arguments)])
OUTPUTS = {
    # Qwen2.5 (and Hermes 2 Pro): JSON inside <tool_call></tool_call>, one block per call, "\n" between
    "hermes-one": ("hermes", '<tool_call>\n%s\n</tool_call>' % call_json("get_weather", WEATHER_PARIS),
                   "", [("get_weather", WEATHER_PARIS)]),
    "hermes-two-parallel": (
        "hermes", '<tool_call>\n%s\n</tool_call>\n<tool_call>\n%s\n</tool_call>' % (
            call_json("get_weather", WEATHER_PARIS), call_json("get_time", {"timezone": "Europe/Berlin"})),
        "", [("get_weather", WEATHER_PARIS), ("get_time", {"timezone": "Europe/Berlin"})]),
    "hermes-text-before": (
        "hermes", "I'll look up the forecast for you.\n<tool_call>\n%s\n</tool_call>" % call_json(
            "get_weather", WEATHER_BERLIN), "I'll look up the forecast for you.\n", [("get_weather", WEATHER_BERLIN)]),
    "hermes-braces-and-quotes": ("hermes", '<tool_call>\n%s\n</tool_call>' % call_json("run_sql", SQL), "",
                                 [("run_sql", SQL)]),
    "hermes-unicode": ("hermes", '<tool_call>\n%s\n</tool_call>' % call_json("get_weather", UNICODE), "",
                       [("get_weather", UNICODE)]),
    # Hermes 2 Pro's own training data puts "arguments" before "name"
    "hermes-arguments-first": (
        "hermes", '<tool_call>\n{"arguments": {"city": "Paris", "days": 2}, "name": "get_weather"}\n</tool_call>',
        "", [("get_weather", WEATHER_PARIS)]),
    "hermes-no-arguments": ("hermes", '<tool_call>\n{"name": "list_cities", "arguments": {}}\n</tool_call>', "",
                            [("list_cities", {})]),
    "hermes-plain-text": ("hermes", "Paris is sunny today; take <b>sunglasses</b> and 2 < 3 {maybe}.",
                          "Paris is sunny today; take <b>sunglasses</b> and 2 < 3 {maybe}.", []),
    # Llama 3.1 / 3.2 with custom tools: the whole answer is one JSON object of "name" and "parameters"
    "llama3-json": ("llama3", call_json("get_weather", WEATHER_PARIS, key="parameters"), "",
                    [("get_weather", WEATHER_PARIS)]),
    "llama3-python-tag": ("llama3", "<|python_tag|>" + call_json("get_weather", WEATHER_BERLIN, key="parameters"), "",
                          [("get_weather", WEATHER_BERLIN)]),
    # Llama 3.2 3B writes "type" first now and then (llama.cpp's Llama 3.x parser takes it)
    "llama3-type-function": (
        "llama3", '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', "",
        [("get_weather", WEATHER_PARIS)]),
    "llama3-braces-and-quotes": ("llama3", call_json("run_sql", SQL, key="parameters"), "", [("run_sql", SQL)]),
    "llama3-plain-text": ("llama3", "It is sunny in Paris. Use {city} as a placeholder.",
                          "It is sunny in Paris. Use {city} as a placeholder.", []),
    "llama3-json-that-is-no-call": ("llama3", '{"city": "Paris", "forecast": "sunny"}',
                                    '{"city": "Paris", "forecast": "sunny"}', []),
    # Mistral: [TOOL_CALLS] then a JSON array of calls; Nemo's carry a 9-character id, v0.3 puts a space first
    "mistral-nemo-with-id": (
        "mistral", "[TOOL_CALLS][%s]" % call_json("get_weather", WEATHER_PARIS, id="Xy3kP9qLm"), "",
        [("get_weather", WEATHER_PARIS)]),
    "mistral-v3-two": (
        "mistral", "[TOOL_CALLS] [%s, %s]" % (call_json("get_weather", WEATHER_PARIS),
                                              call_json("get_weather", WEATHER_BERLIN)),
        "", [("get_weather", WEATHER_PARIS), ("get_weather", WEATHER_BERLIN)]),
    "mistral-text-before": ("mistral", "Let me check that.[TOOL_CALLS][%s]" % call_json("get_weather", WEATHER_BERLIN),
                            "Let me check that.", [("get_weather", WEATHER_BERLIN)]),
    "mistral-braces-and-quotes": ("mistral", "[TOOL_CALLS][%s]" % call_json("run_sql", SQL), "", [("run_sql", SQL)]),
    "mistral-plain-text": ("mistral", "The [weather] in Paris is {sunny}.", "The [weather] in Paris is {sunny}.", []),
    # generic: the answer is one JSON object naming a call or a list of calls
    "generic-one": ("generic", json.dumps({"tool_call": {"name": "get_weather", "arguments": WEATHER_PARIS}}), "",
                    [("get_weather", WEATHER_PARIS)]),
    "generic-two": ("generic", json.dumps({"tool_calls": [{"name": "get_weather", "arguments": WEATHER_PARIS},
                                                          {"name": "run_sql", "arguments": SQL}]}),
                    "", [("get_weather", WEATHER_PARIS), ("run_sql", SQL)]),
    "generic-plain-text": ("generic", "Paris will be sunny {mostly}.", "Paris will be sunny {mostly}.", []),
}


def by_tokens(text, size=3):
    """The text in pieces of `size` characters, as a streamed answer comes."""
    return [text[i:i + size] for i in range(0, len(text), size)]


SPLITS = {"whole": lambda text: [text], "tokens": by_tokens, "chars": lambda text: list(text)}


def parse(fmt, pieces, **options):
    """Feed the pieces, then finish: (the parser, every piece it gave, in order)."""
    parser = rbee.ToolCallParser(fmt, **options)
    given = []
    for piece in pieces:
        given += parser.feed(piece)
    given += parser.finish()
    return parser, given


def content_of(given):
    return "".join(piece[1] for piece in given if piece[0] == "content")


def streamed_calls(given):
    """The calls as their pieces stream them: [(id, name, arguments joined)] by index, checking that
    only a call's first piece names it and that indexes come in order."""
    calls = []
    for piece in given:
        if piece[0] != "call":
            assert piece[0] == "content" and len(piece) == 2, piece
            continue
        _, index, call_id, name, fragment = piece
        assert isinstance(fragment, str), piece
        if index == len(calls):
            assert name, "a call's first piece names it: %r" % (piece,)
            calls.append([call_id, name, fragment])
        else:
            assert index == len(calls) - 1 and call_id is None and name is None, piece
            calls[index][2] += fragment
    return [tuple(call) for call in calls]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", OUTPUTS)
def test_each_familys_real_output_parses_to_its_text_and_calls(case, split):
    fmt, text, content, calls = OUTPUTS[case]
    parser, given = parse(fmt, SPLITS[split](text))
    if calls:   # beside calls, the whitespace the model put between text and markers may go
        assert content_of(given).rstrip() == content.rstrip(), given
        assert content_of(given).startswith(content.rstrip())
    else:
        assert content_of(given) == content, given
    assert [(c["name"], json.loads(c["arguments"])) for c in parser.calls] == calls
    streamed = streamed_calls(given)
    assert [(name, json.loads(arguments)) for _, name, arguments in streamed] == calls
    # the fragments of each call join to exactly its whole arguments
    assert [arguments for _, _, arguments in streamed] == [c["arguments"] for c in parser.calls]
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in parser.calls)


@pytest.mark.parametrize("split", SPLITS)
def test_a_marker_split_across_two_pieces_never_shows_as_text(split):
    cases = {"hermes": ("Checking.<tool", '_call>\n%s\n</tool_call>' % call_json("get_weather", WEATHER_PARIS)),
             "mistral": ("Checking.[TOOL_", "CALLS][%s]" % call_json("get_weather", WEATHER_PARIS)),
             "llama3": ("<|python_", "tag|>%s" % call_json("get_weather", WEATHER_PARIS, key="parameters"))}
    for fmt, (first, second) in cases.items():
        pieces = SPLITS[split](first) + SPLITS[split](second)
        parser, given = parse(fmt, pieces)
        text = content_of(given)
        assert text == ("" if fmt == "llama3" else "Checking."), (fmt, given)
        assert [(c["name"], json.loads(c["arguments"])) for c in parser.calls] == [("get_weather", WEATHER_PARIS)]


def test_text_before_a_call_streams_before_the_call_ends():
    """Nothing waits for the end: the text before a marker comes out once the marker is there, the
    call's name once its arguments begin, and its arguments as they come."""
    parser = rbee.ToolCallParser("hermes")
    given = []
    for piece in by_tokens('Sure, one moment.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'):
        given += parser.feed(piece)
    assert content_of(given).rstrip() == "Sure, one moment."
    assert streamed_calls(given) and streamed_calls(given)[0][1:] == ("get_weather", '{"city": "Pa')


def test_with_parallel_calls_off_the_first_call_is_the_answer():
    """What the worker asks by default (parallel_tool_calls false, as llama.cpp's server): the first
    whole call ends the turn; a second one the model goes on to write is not read."""
    fmt, text, _, calls = OUTPUTS["hermes-two-parallel"]
    parser = rbee.ToolCallParser(fmt, parallel=False)
    first_ends = text.index("</tool_call>")
    parser.feed(text[:first_ends])
    assert parser.done and [(c["name"], json.loads(c["arguments"])) for c in parser.calls] == calls[:1]
    parser.feed(text[first_ends:])
    parser.finish()
    assert [(c["name"], json.loads(c["arguments"])) for c in parser.calls] == calls[:1]


def test_mistral_call_ids_are_what_its_template_takes_back():
    """Mistral Nemo's template raises on any call id that is not 9 letters or digits when the call
    comes back in the history. The model writes its id after the arguments, when the call's first
    piece (with its id) has streamed already: the parser gives every Mistral call such an id."""
    text = "[TOOL_CALLS][%s, %s]" % (call_json("get_weather", WEATHER_PARIS, id="Xy3kP9qLm"),
                                    call_json("get_weather", WEATHER_BERLIN, id="a1B2c3D4e"))
    parser, given = parse("mistral", by_tokens(text))
    ids = [c["id"] for c in parser.calls]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(len(i) == 9 and i.isalnum() for i in ids), ids
    assert [call_id for call_id, _, _ in streamed_calls(given)] == ids


@pytest.mark.parametrize("split", SPLITS)
def test_no_json_after_a_marker_is_text_not_a_call(split):
    cases = {"hermes": "<tool_call>\nget_weather(city='Paris')\n</tool_call>",
             "mistral": "[TOOL_CALLS]get_weather city=Paris",
             "llama3": "<|python_tag|>brave_search.call(query=\"weather Paris\")"}
    for fmt, text in cases.items():
        parser, given = parse(fmt, SPLITS[split](text))
        assert parser.calls == [] and streamed_calls(given) == [], (fmt, given)
        assert content_of(given) == text, (fmt, given)


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),   # cut by max_tokens
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": }}]'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2'),
])
def test_a_call_written_badly_is_the_call_as_it_streamed_and_its_index_serves_once(fmt, text):
    """Unconstrained, a model may write bad JSON (OpenAI warns of its own): a call whose pieces
    went is never taken back, so the whole answer says what the stream said; the client checks."""
    for split in SPLITS.values():
        parser, given = parse(fmt, split(text))
        assert [(c["id"], c["name"], c["arguments"]) for c in parser.calls] == streamed_calls(given), given
        assert [c["name"] for c in parser.calls] == ["get_weather"]


def test_a_bad_call_then_a_good_one_are_two_calls_with_two_indexes():
    text = '<tool_call>{"name": "f", "arguments": "x"}</tool_call>\n<tool_call>{"name": "g", "arguments": {"a": 1}}'
    for split in SPLITS.values():
        parser, given = parse("hermes", split(text))
        assert [(c["name"], c["arguments"]) for c in parser.calls] == [("f", "x"), ("g", '{"a": 1}')]
        assert [(name, arguments) for _, name, arguments in streamed_calls(given)] == [("f", "x"), ("g", '{"a": 1}')]


def test_a_tool_call_marker_that_is_one_special_token_is_kept(reference_llm):
    """Special tokens come as "" (llama-cpp-python's way) unless they are the format's markers:
    SmolLM2's <|im_end|> is one special token, <tool_call> is plain text in its vocabulary."""
    assert rbee.marker_tokens(reference_llm, ["<|im_end|>", "<tool_call>"]) == [2]


@pytest.mark.parametrize("schema", [{"type": "object", "properties": []}, {"type": "object", "properties": {"a": 5}},
                                    {"type": "array", "items": 5}, {"oneOf": [{}, 3]}, {"not": {}}])
def test_a_schema_the_converter_cannot_take_is_a_400_and_the_callers_schema_is_left_as_it_was(schema):
    with pytest.raises(rbee.InvalidRequest) as refused:
        rbee.schema_grammar(schema)
    assert refused.value.status == 400 and refused.value.details == {"field": "json_schema"}
    with_refs = {"$defs": {"city": {"type": "string"}}, "type": "object", "properties": {"c": {"$ref": "#/$defs/city"}}}
    rbee.schema_grammar(with_refs)
    assert with_refs["properties"]["c"] == {"$ref": "#/$defs/city"}


# -- the families' templates -------------------------------------------------------------------

def smollm2_template(model_path):
    field = gguf.GGUFReader(model_path).fields["tokenizer.chat_template"]
    return field.contents()


def test_tool_format_of_each_familys_template(model_path):
    assert rbee.tool_format_of((TEMPLATES / "qwen2.5.jinja").read_text()) == "hermes"
    assert rbee.tool_format_of((TEMPLATES / "llama3.1.jinja").read_text()) == "llama3"
    assert rbee.tool_format_of((TEMPLATES / "mistral.jinja").read_text()) == "mistral"
    assert rbee.tool_format_of(smollm2_template(model_path)) == "generic"   # SmolLM2's own knows no tools


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
                                                   "days": {"type": "integer"}},
                  "required": ["city", "days"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather forecast of a city",
                                                 "parameters": WEATHER_SCHEMA}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                              "parameters": {"type": "object",
                                                             "properties": {"timezone": {"type": "string"}}}}}


def test_each_template_renders_tools_calls_and_results_as_its_family_does():
    """The templates in llama-cpp-python's own formatter (what a worker renders with): the tools, an
    assistant's call with its arguments as an object, the tool's result."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Weather in Paris for 2 days?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a1B2c3D4e", "type": "function",
                     "function": {"name": "get_weather", "arguments": WEATHER_PARIS}}]},
                {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather", "content": '{"sky": "sunny"}'}]
    expected = {
        "qwen2.5": ['<tools>\n%s\n</tools>' % json.dumps(WEATHER_TOOL, ensure_ascii=False),
                    '<|im_start|>assistant\n<tool_call>\n%s\n</tool_call><|im_end|>' % call_json(
                        "get_weather", WEATHER_PARIS),
                    '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>',
                    "You are helpful.\n\n# Tools"],
        "llama3.1": ['"name": "get_weather"', 'Respond in the format {"name": function name, "parameters": ',
                     "<|start_header_id|>assistant<|end_header_id|>\n\n%s<|eot_id|>" % call_json(
                         "get_weather", WEATHER_PARIS, key="parameters"),
                     '<|start_header_id|>ipython<|end_header_id|>\n\n', "Environment: ipython\n",
                     "Weather in Paris for 2 days?<|eot_id|>"],
        "mistral": ["[AVAILABLE_TOOLS][%s][/AVAILABLE_TOOLS][INST]Weather in Paris for 2 days?[/INST]" % json.dumps(
                        WEATHER_TOOL),
                    '[TOOL_CALLS][%s]</s>' % call_json("get_weather", WEATHER_PARIS, id="a1B2c3D4e"),
                    '[TOOL_RESULTS]{"content": {"sky": "sunny"}, "call_id": "a1B2c3D4e"}[/TOOL_RESULTS]'],
    }
    for family, parts in expected.items():
        formatter = Jinja2ChatFormatter((TEMPLATES / (family + ".jinja")).read_text(), eos_token="</s>",
                                        bos_token="<s>")
        prompt = formatter(messages=messages, tools=[WEATHER_TOOL]).prompt
        for part in parts:
            assert part in prompt, (family, part, prompt)
        # without tools each still renders the chat
        plain = formatter(messages=messages[:2]).prompt
        assert "Weather in Paris for 2 days?" in plain and "get_weather" not in plain, (family, plain)


def test_a_model_copy_carries_the_template_and_loads(model_copy):
    import llama_cpp

    template = (TEMPLATES / "qwen2.5.jinja").read_text()
    path = model_copy("qwen2.5", TEMPLATES / "qwen2.5.jinja", {"eot": 2})
    assert model_copy("qwen2.5", TEMPLATES / "qwen2.5.jinja", {"eot": 2}) == path   # made once
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=1, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == template
    assert llm.metadata["tokenizer.ggml.eot_token_id"] == "2" and llm.n_vocab() == 49152
    assert llm.create_completion("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]


# -- end to end: each family's copy of the model on a real worker ---------------------------------

FAMILIES = {"qwen2.5": "qwen2.5.jinja", "llama3.1": "llama3.1.jinja", "mistral": "mistral.jinja", "plain": None}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_named_tool_is_called_in_each_familys_format_on_a_real_worker(family, model_copy, model_path, roles, env):
    template = FAMILIES[family]
    path = model_copy(family, TEMPLATES / template) if template else model_path
    model = "file:" + path
    api = openai.OpenAI(base_url=start_queen(roles, env).url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What will the weather be in Rome for the next 3 days?"}]
    ask = dict(model=model, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], temperature=0, max_tokens=80,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    answer = api.chat.completions.create(**ask)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)

    # streamed: the same call, its fragments joined
    chunks = list(api.chat.completions.create(stream=True, **ask))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # the call and its result back in the history: the family's template renders them, the model answers
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "name": "get_weather",
                           "content": json.dumps({"forecast": ["sunny", "cloudy", "rain"]})}]
    followed = api.chat.completions.create(model=model, messages=history, tools=[WEATHER_TOOL], temperature=0,
                                           max_tokens=8, tool_choice="none")
    # (the model was never trained on this family's template: whether it says anything is its own affair)
    assert followed.choices[0].finish_reason in ("stop", "length") and not followed.choices[0].message.tool_calls
    before = api.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0)
    assert followed.usage.prompt_tokens > before.usage.prompt_tokens + 10   # the call and its result were rendered
