"""Anthropic's Messages API on the queen (PROTOCOL.md §13).

In process: the pure conversions of a Messages request to the worker's /execute body (the
contract's OpenAI-shaped one), of the worker's pieces to Anthropic's content blocks and stream
events -- checked against the `anthropic` package's own types and its own stream accumulator --
and the error shapes. End to end: the real `anthropic` package (and `openai`, for the same
conversation in its words) against a real queen, hive and worker on the real model.
"""
import email.message
import json
import os
import signal
import sys
from types import SimpleNamespace

import anthropic
import jsonschema
import openai
import pydantic
import pytest
from anthropic._streaming import SSEDecoder
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse

from conftest import REPO, raw_call, raw_request, rbee_processes, run_rbee, sse_frames, start_queen, tracebacks

sys.path.insert(0, str(REPO))
import rbee  # noqa: E402

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}


def refused(field, function, *args, **kwargs):
    """Call `function`: it must raise INVALID_REQUEST naming `field`; returns the error."""
    with pytest.raises(rbee.InvalidRequest) as caught:
        function(*args, **kwargs)
    assert caught.value.details.get("field") == field, caught.value.envelope()
    assert caught.value.status == 400
    return caught.value


# -- tool-call ids ----------------------------------------------------------------------------

def test_tool_call_ids_are_toolu_outside_and_the_workers_own_inside():
    # the worker's ids (OpenAI-style, or a Mistral call's 9 letters and digits) come back exactly
    for worker_id in ("call_0a1b2c3d4e5f6a7b8c9d0e1f", "a1b2c3d4e"):
        assert rbee.anthropic_tool_id(worker_id) == "toolu_" + worker_id
        assert rbee.worker_tool_id(rbee.anthropic_tool_id(worker_id)) == worker_id
    # ids a client sends that rbee never made (a Claude session's, its own) name the call all the same
    assert rbee.worker_tool_id("toolu_01A09q90qw90lq917835lq9") == "01A09q90qw90lq917835lq9"
    assert rbee.worker_tool_id("my-own-id") == "my-own-id"


# -- requests: system, messages, tools, sampling ----------------------------------------------

def test_system_and_text_messages_become_the_workers_chat():
    body = {"system": [{"type": "text", "text": "You are brief."}, {"type": "text", "text": "Answer in French.",
                                                                    "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Bonjour."}]},
                         {"role": "user", "content": [{"type": "text", "text": "<reminder>be kind</reminder>"},
                                                      {"type": "text", "text": "How are you?"}]}]}
    assert rbee.anthropic_messages(body) == [
        {"role": "system", "content": "You are brief.\n\nAnswer in French."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "<reminder>be kind</reminder>\n\nHow are you?"}]
    assert rbee.anthropic_messages({"system": "Be brief.", "messages": [{"role": "user", "content": "x"}]})[0] == {
        "role": "system", "content": "Be brief."}
    assert rbee.anthropic_messages({"system": "", "messages": [{"role": "user", "content": "x"}]}) == [
        {"role": "user", "content": "x"}]


def test_tool_use_and_tool_result_blocks_become_tool_calls_and_tool_messages():
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "two tools", "signature": "sig"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "other-7", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "18 C"},
                                                                             {"type": "text", "text": "sunny"}]},
            {"type": "tool_result", "tool_use_id": "other-7", "content": "clock broken", "is_error": True},
            {"type": "text", "text": "Thanks!"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_call_02", "name": "get_time",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_call_02"}]}]}
    assert rbee.anthropic_messages(body) == [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "01", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "other-7", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "01", "name": "get_weather", "content": "18 C\n\nsunny"},
        {"role": "tool", "tool_call_id": "other-7", "name": "get_time", "content": "Error: clock broken"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_02", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "call_02", "name": "get_time", "content": ""}]


def test_text_before_a_tool_result_stays_before_it_and_an_unknown_call_has_no_name():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "first"}, {"type": "tool_result", "tool_use_id": "toolu_9", "content": "r"}]}]}
    assert rbee.anthropic_messages(body) == [{"role": "user", "content": "first"},
                                             {"role": "tool", "tool_call_id": "9", "content": "r"}]


@pytest.mark.parametrize("messages, field", [
    (None, "messages"), ([], "messages"), ("hi", "messages"),
    ([{"role": "system", "content": "x"}], "messages[0]"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image", "source": {}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}],
     "messages[0].content[0]"),
    ([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "a"}]}], "messages[0].content[0]"),
    ([{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": "{}"}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "tool_result"}]}], "messages[0].content[0].tool_use_id"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                    "content": [{"type": "image", "source": {}}]}]}],
     "messages[0].content[0].content"),
])
def test_what_this_model_cannot_read_is_a_400_that_names_the_field(messages, field):
    refused(field, rbee.anthropic_messages, {"messages": messages})


def test_a_system_that_is_no_text_is_refused():
    refused("system", rbee.anthropic_messages, {"system": [{"type": "image"}], "messages": [
        {"role": "user", "content": "x"}]})


def test_tools_and_tool_choice_as_the_workers():
    converted = rbee.anthropic_tools({"tools": [WEATHER, CLOCK]})
    assert converted == {
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                    "parameters": WEATHER["input_schema"]}},
                  {"type": "function", "function": {"name": "get_time", "parameters": CLOCK["input_schema"]}}],
        "tool_choice": "auto", "parallel_tool_calls": True}
    for choice, expected in (({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
                             ({"type": "tool", "name": "get_time"},
                              {"type": "function", "function": {"name": "get_time"}})):
        assert rbee.anthropic_tools({"tools": [WEATHER, CLOCK], "tool_choice": choice})["tool_choice"] == expected
    single = rbee.anthropic_tools({"tools": [WEATHER], "tool_choice": {"type": "any",
                                                                       "disable_parallel_tool_use": True}})
    assert single["parallel_tool_calls"] is False
    assert rbee.anthropic_tools({}) == {} and rbee.anthropic_tools({"tools": [], "tool_choice": {"type": "none"}}) == {}


@pytest.mark.parametrize("body, field", [
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "any"}, "tool_choice"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}},
     "tool_choice.disable_parallel_tool_use"),
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"tools": [dict(WEATHER, name="get weather")]}, "tools[0].name"),
    ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
    ({"tools": [dict(WEATHER, description=7)]}, "tools[0].description"),
])
def test_tools_rbee_cannot_run_are_a_400(body, field):
    refused(field, rbee.anthropic_tools, body)


def test_the_whole_execute_body():
    body = {"model": "claude-sonnet-4-5", "max_tokens": 32000, "system": "Be brief.", "temperature": 0.2, "top_k": 5,
            "top_p": 0.9, "stop_sequences": ["END"], "metadata": {"user_id": "u1"}, "stream": True,
            "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}}
    job = rbee.anthropic_job(body)
    assert job == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                   "tools": rbee.anthropic_tools(body)["tools"],
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                   "parallel_tool_calls": False, "max_tokens": rbee.DEFAULT_N_CTX,   # (a slot's context at most)
                   "temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop": ["END"]}
    plain = rbee.anthropic_job({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert plain == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 1.0}
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    structured = rbee.anthropic_job({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                                     "output_config": {"effort": "low", "format": {"type": "json_schema",
                                                                                   "schema": schema}}})
    assert structured["json_schema"] == schema
    # count_tokens: the conversation and the tools, no max_tokens needed
    assert rbee.anthropic_job({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]},
                              count_only=True) == {"messages": [{"role": "user", "content": "hi"}],
                                                   **rbee.anthropic_tools({"tools": [WEATHER]})}


@pytest.mark.parametrize("extra, field", [
    ({"max_tokens": None}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"stop_sequences": "END"}, "stop_sequences"), ({"stop_sequences": [""]}, "stop_sequences"),
    ({"stop_sequences": ["x"] * 17}, "stop_sequences"), ({"stream": "yes"}, "stream"),
    ({"output_config": "json"}, "output_config"), ({"output_config": {"format": {"type": "json"}}},
                                                   "output_config.format"),
    ({"output_config": {"format": {"type": "json_schema", "schema": "{}"}}}, "output_config.format"),
])
def test_max_tokens_is_required_and_the_rest_typed(extra, field):
    body = dict({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}, **extra)
    if body["max_tokens"] is None:
        del body["max_tokens"]
    refused(field, rbee.anthropic_job, body)


# -- answers: stop reasons, content blocks, stream events ------------------------------------

@pytest.mark.parametrize("stats, stops, expected", [
    ({"stop_reason": "eos"}, None, ("end_turn", None)),
    ({"stop_reason": "tool_calls"}, None, ("tool_use", None)),
    ({"stop_reason": "max_tokens"}, ["x"], ("max_tokens", None)),
    ({"stop_reason": "stop", "stop_sequence": "END"}, ["x", "END"], ("stop_sequence", "END")),
    # a stop of the chat template's own (not the request's): the model's end of turn
    ({"stop_reason": "stop", "stop_sequence": "<|im_end|>"}, ["END"], ("end_turn", None)),
    ({"stop_reason": "stop"}, None, ("end_turn", None)),
])
def test_stop_reasons(stats, stops, expected):
    assert rbee.anthropic_stop(stats, stops) == expected


def run_pieces(steps):
    """Feed (kind, args) steps to an AnthropicContent; returns it and the stream's events."""
    content, events = rbee.AnthropicContent(), []
    for kind, args in steps:
        events += getattr(content, kind)(*args)
    events += content.finish()
    return content, events


def assert_known_fields(model, data):
    """Every field of `data` is one the SDK's model declares (its models keep unknown ones as
    extras, silently), down through the nested models."""
    if isinstance(model, pydantic.BaseModel):
        assert set(data) <= set(type(model).model_fields), (type(model).__name__, set(data))
        for name, value in data.items():
            assert_known_fields(getattr(model, name), value)
    elif isinstance(model, list):
        for item, value in zip(model, data):
            assert_known_fields(item, value)


def sdk_accumulates(events, ending=("end_turn", None)):
    """The whole stream, as AnthropicApi writes it around `events`, checked event by event against
    the SDK's own types and accumulated by the SDK's own code: the final Message it makes."""
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}
    frames = [start, {"type": "ping"}] + [dict({"type": name}, **data) for name, data in events] + [
        {"type": "message_delta", "delta": {"stop_reason": ending[0], "stop_sequence": ending[1]},
         "usage": {"input_tokens": 7, "output_tokens": 3}}, {"type": "message_stop"}]
    snapshot, bufs = None, {}
    for frame in frames:
        if frame["type"] == "ping":
            continue
        event = STREAM_EVENT.validate_python(frame)
        assert_known_fields(event, frame)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def test_text_then_two_tool_calls_as_blocks_and_as_the_streams_events():
    content, events = run_pieces([
        ("text", ("Let me ",)), ("text", ("",)), ("text", ("check.",)),
        ("tool_call", (0, "call_a", "get_weather", "")), ("tool_call", (0, None, None, '{"city": ')),
        ("tool_call", (0, None, None, '"Paris"}')),
        ("tool_call", (1, "call_b", "get_time", "{}"))])
    assert events == [
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Let me "}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "check."}}),
        ("content_block_stop", {"index": 0}),
        ("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_call_a",
                                                               "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}}),
        ("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}}),
        ("content_block_stop", {"index": 1}),
        ("content_block_start", {"index": 2, "content_block": {"type": "tool_use", "id": "toolu_call_b",
                                                               "name": "get_time", "input": {}}}),
        ("content_block_delta", {"index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        ("content_block_stop", {"index": 2})]
    whole = content.content()
    assert whole == [{"type": "text", "text": "Let me check."},
                     {"type": "tool_use", "id": "toolu_call_a", "name": "get_weather", "input": {"city": "Paris"}},
                     {"type": "tool_use", "id": "toolu_call_b", "name": "get_time", "input": {}}]
    # the SDK's accumulator makes the same message of the stream as the whole answer
    final = sdk_accumulates(events, ("tool_use", None))
    assert [b.model_dump(exclude_none=True) for b in final.content] == whole
    assert final.stop_reason == "tool_use" and final.usage.input_tokens == 7 and final.usage.output_tokens == 3
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": whole,
               "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 7, "output_tokens": 3}}
    answer = Message.model_validate(message)
    assert_known_fields(answer, message)
    assert answer.content[1].input == {"city": "Paris"}


def test_text_after_a_call_is_a_block_of_its_own_and_the_worker_pieces_are_taken_as_they_come():
    content = rbee.AnthropicContent()
    events = content.add(rbee.Token("Hi", 0)) + content.tool_call(0, "call_x", "get_time", "{}") + content.add(
        rbee.Token(" bye", 1)) + content.finish()
    assert [(name, data["index"]) for name, data in events] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2)]
    assert [b["type"] for b in content.content()] == ["text", "tool_use", "text"]
    assert sdk_accumulates(events).content[2].text == " bye"
    empty, events = run_pieces([])
    assert empty.content() == [] and events == [] and sdk_accumulates(events).content == []


def test_a_call_the_worker_never_started_is_an_internal_error_and_one_written_badly_is_its_text():
    with pytest.raises(rbee.InternalError):
        rbee.AnthropicContent().tool_call(3, None, None, "{}")
    # a call cut by max_tokens, or unconstrained JSON that is no object: what the model wrote, as text
    for arguments in ('{"city": ', "[1]"):
        content, _ = run_pieces([("tool_call", (0, "call_a", "f", arguments))])
        assert content.content() == [{"type": "text", "text": "f(%s)" % arguments}]


# -- errors and keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("err, kind", [
    (rbee.InvalidRequest("bad"), "invalid_request_error"),
    (rbee.InvalidRequest("too big", status=413), "invalid_request_error"),
    (rbee.InvalidApiKey("Invalid API key"), "authentication_error"),
    (rbee.AccessDenied("no"), "permission_error"),
    (rbee.ModelNotFound("no model"), "not_found_error"),
    (rbee.SlotsBusy("full"), "overloaded_error"),
    (rbee.InternalError("bug"), "api_error"),
    (rbee.WorkerCrashed("gone"), "api_error"),
    (rbee.InsufficientRam("no room"), "api_error"),
])
def test_errors_in_anthropics_shape(err, kind):
    body = rbee.anthropic_error(err)
    assert body == {"type": "error", "error": {"type": kind, "message": err.message}}
    assert ErrorResponse.model_validate(body).error.type == kind


def request_with(headers):
    message = email.message.Message()   # (http.server's headers: names in any case)
    for name, value in headers.items():
        message[name] = value
    return rbee.Request(SimpleNamespace(headers=message, read_body=lambda: b""), {}, {})


def test_the_key_as_x_api_key_or_as_a_bearer_where_the_queen_allows_it():
    for headers in ({"X-Api-Key": "k1"}, {"x-api-key": "k1"}, {"Authorization": "Bearer k1"}):
        request_with(headers).require_bearer("k1", x_api_key=True)
    with pytest.raises(rbee.InvalidApiKey):
        request_with({"x-api-key": "k2"}).require_bearer("k1", x_api_key=True)
    missing = pytest.raises(rbee.MissingApiKey)
    with missing as caught:
        request_with({}).require_bearer("k1", x_api_key=True)
    assert "x-api-key" in caught.value.message
    with pytest.raises(rbee.MissingApiKey):   # the worker's and the hive's keys come as bearers only
        request_with({"x-api-key": "k1"}).require_bearer("k1")


def test_the_keep_alive_ping_is_an_event_the_sdk_reads_as_a_ping():
    frames = list(SSEDecoder().iter_bytes(iter([rbee.AnthropicStream.ping_frame])))
    assert [(f.event, f.json()) for f in frames] == [("ping", {"type": "ping"})]


# ============================================================================================
# End to end: the real `anthropic` package against a real queen, hive and worker on the real model
# ============================================================================================

SYSTEM = "You are a helpful assistant who answers briefly."
TWO_TURNS = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital of France is Paris."},
             {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}]
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
TEMPLATES = REPO / "tests" / "templates"   # each family's chat template (test_tools.py)
GREEDY = {"temperature": 0}   # (this SDK has no temperature argument any more; older clients, Claude Code, send it)


def client(queen, **kw):
    kw = kw or {"api_key": "unused"}
    return anthropic.Anthropic(base_url=queen.url, max_retries=0, **kw)


def openai_client(queen):
    return openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0)


def test_a_message_is_the_chat_llama_cpp_python_makes_of_the_same_conversation(queen, model_ref, reference_llm):
    answer = client(queen).messages.create(model=model_ref, system=SYSTEM, messages=TWO_TURNS, max_tokens=32,
                                           extra_body=GREEDY, metadata={"user_id": "u-1"})
    conversation = [{"role": "system", "content": SYSTEM}, TWO_TURNS[0], TWO_TURNS[1],
                    {"role": "user", "content": "And of Italy?"}]
    expected = reference_llm.create_chat_completion(messages=conversation, max_tokens=32, temperature=0)
    assert [b.type for b in answer.content] == ["text"]
    assert answer.content[0].text == expected["choices"][0]["message"]["content"]
    assert answer.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[expected["choices"][0]["finish_reason"]]
    assert answer.stop_sequence is None
    assert answer.usage.input_tokens == expected["usage"]["prompt_tokens"]
    assert answer.usage.output_tokens == expected["usage"]["completion_tokens"]
    assert answer.id.startswith("msg_") and answer.type == "message" and answer.role == "assistant"
    assert answer.model == model_ref


def test_a_stream_is_anthropics_event_by_event_and_the_sdk_makes_the_same_message_of_it(queen, model_ref):
    api = client(queen)
    asked = dict(model=model_ref, system=SYSTEM, messages=TWO_TURNS, max_tokens=24, extra_body=GREEDY)
    whole = api.messages.create(**asked)
    with api.messages.stream(**asked) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text and text
    assert final.content[0].text == text and final.stop_reason == whole.stop_reason
    # (the second asks the same: its prompt comes from the worker's cache, which Anthropic counts apart)
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == whole.usage.input_tokens
    assert final.usage.cache_read_input_tokens == whole.usage.input_tokens - 1
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.id.startswith("msg_") and final.model == model_ref
    # on the wire: the event names and the order Anthropic's streams have, each data's type its event
    body = {"model": model_ref, "max_tokens": 24, "temperature": 0, "stream": True, "system": SYSTEM,
            "messages": TWO_TURNS}
    conn, resp = raw_request(int(queen.url.rsplit(":", 1)[1]), "POST", "/v1/messages", body)
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    frames = [(event, data) for event, data, _ in sse_frames(resp)]
    conn.close()
    names = [event for event, _ in frames]
    assert all(data["type"] == event for event, data in frames)
    deltas = len(names) - 6
    assert names == ["message_start", "ping", "content_block_start"] + ["content_block_delta"] * deltas + [
        "content_block_stop", "message_delta", "message_stop"] and deltas >= 1
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    assert "".join(data["delta"]["text"] for event, data in frames if event == "content_block_delta") == text
    assert frames[-2][1]["delta"] == {"stop_reason": whole.stop_reason, "stop_sequence": None}
    assert frames[-2][1]["usage"] == {"input_tokens": 1, "cache_read_input_tokens": whole.usage.input_tokens - 1,
                                      "cache_creation_input_tokens": 0, "output_tokens": whole.usage.output_tokens}


def test_a_stop_sequence_ends_the_message_and_is_named(queen, model_ref):
    api = client(queen)
    free = api.messages.create(model=model_ref, messages=PARIS, max_tokens=40, extra_body=GREEDY).content[0].text
    words = free.split()
    assert len(words) > 3, free
    stop = " " + words[2]
    stopped = api.messages.create(model=model_ref, messages=PARIS, max_tokens=40, extra_body=GREEDY, stop_sequences=[
        "never in it", stop])
    assert stopped.content[0].text == free[:free.index(stop)]
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    with api.messages.stream(model=model_ref, messages=PARIS, max_tokens=40, extra_body=GREEDY,
                             stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_any_tool_choice_is_a_tool_use_whose_input_matches_the_schema_whole_or_streamed(queen, model_ref):
    api = client(queen)
    answer = api.messages.create(model=model_ref, messages=PARIS, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                 tool_choice={"type": "any"})
    calls = [b for b in answer.content if b.type == "tool_use"]
    assert calls and answer.stop_reason == "tool_use", answer
    for call in calls:
        assert call.name == "get_weather" and call.id.startswith("toolu_")
        jsonschema.validate(call.input, WEATHER["input_schema"])
    with api.messages.stream(model=model_ref, messages=PARIS, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                             tool_choice={"type": "any"}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in final.content] == [
        (b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in answer.content]
    partial = {}   # each tool_use block's input_json_deltas, put together: its input
    for e in events:
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta":
            partial[e.index] = partial.get(e.index, "") + e.delta.partial_json
    assert {k: json.loads(text) for k, text in partial.items()} == {
        k: b.input for k, b in enumerate(final.content) if b.type == "tool_use"}
    # (a named tool with parallel use off: the families' test below)


def test_a_tool_result_turn_is_answered_in_text_as_the_openai_api_answers_the_same_conversation(queen, model_ref):
    turns = PARIS + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_call_01abc", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_call_01abc",
                                      "content": [{"type": "text", "text": "18 degrees and sunny"}]}]}]
    answer = client(queen).messages.create(model=model_ref, messages=turns, max_tokens=40, extra_body=GREEDY,
                                           tools=[WEATHER], tool_choice={"type": "none"})
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text
    assert answer.stop_reason in ("end_turn", "max_tokens")
    # the same conversation in OpenAI's words (the worker's lingua franca) is the same prompt and text
    same = openai_client(queen).chat.completions.create(model=model_ref, max_tokens=40, temperature=0, messages=[
        PARIS[0], {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_01abc", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_01abc", "content": "18 degrees and sunny"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "description": WEATHER["description"],
                                                 "parameters": WEATHER["input_schema"]}}], tool_choice="none")
    assert same.choices[0].message.content == answer.content[0].text
    assert same.usage.prompt_tokens == answer.usage.input_tokens


@pytest.mark.parametrize("family", ["mistral", "qwen2.5"])
def test_a_tool_use_goes_back_with_its_result_through_the_familys_own_template(family, model_copy, roles, env):
    """A copy of the model with another family's chat template (Mistral's takes a call's id back
    only as the 9 letters and digits it was made with; Qwen's is Hermes'): the call, sent back
    as the SDK makes its param, with its result, renders and is answered."""
    model = "file:" + model_copy(family, TEMPLATES / ("%s.jinja" % family))
    api = client(start_queen(roles, env))
    answer = api.messages.create(model=model, messages=PARIS, max_tokens=80, extra_body=GREEDY, tools=[WEATHER, CLOCK],
                                 tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    assert answer.stop_reason == "tool_use", answer
    [call] = [b for b in answer.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER["input_schema"])
    turn = dict(model=model, tools=[WEATHER, CLOCK], tool_choice={"type": "none"})
    followed = api.messages.create(max_tokens=8, extra_body=GREEDY, messages=PARIS + [answer.to_param(), {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                     "content": "18 degrees and sunny"}]}], **turn)
    assert followed.stop_reason in ("end_turn", "max_tokens") and all(b.type == "text" for b in followed.content)
    # the call and its result were rendered: more than the question alone
    assert followed.usage.input_tokens > api.messages.count_tokens(messages=PARIS, **turn).input_tokens


def test_structured_output_is_json_that_matches_the_schema(queen, model_ref):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    answer = client(queen).messages.create(model=model_ref, max_tokens=60, extra_body=GREEDY, messages=[
        {"role": "user", "content": "Give me a person."}], output_config={"format": {"type": "json_schema",
                                                                                      "schema": schema}})
    jsonschema.validate(json.loads(answer.content[0].text), schema)


def test_count_tokens_is_the_prompt_of_the_message_and_grows_with_a_tool(queen, model_ref):
    api = client(queen)
    plain = api.messages.count_tokens(model=model_ref, system=SYSTEM, messages=TWO_TURNS)
    answer = api.messages.create(model=model_ref, system=SYSTEM, messages=TWO_TURNS, max_tokens=1)
    assert plain.input_tokens == answer.usage.input_tokens > 10
    with_tool = api.messages.count_tokens(model=model_ref, system=SYSTEM, messages=TWO_TURNS, tools=[WEATHER])
    assert with_tool.input_tokens > plain.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        api.messages.count_tokens(model="claude-opus-4-1", messages=TWO_TURNS)


def test_errors_are_anthropics_and_the_sdk_raises_its_own(queen, model_ref, rbee_home):
    api = client(queen)
    with pytest.raises(anthropic.NotFoundError) as missing:
        api.messages.create(model="claude-sonnet-4-5", messages=PARIS, max_tokens=8)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        with api.messages.stream(model="claude-sonnet-4-5", messages=PARIS, max_tokens=8) as stream:
            list(stream)
    with pytest.raises(anthropic.BadRequestError) as image:
        api.messages.create(model=model_ref, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert image.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0]" in image.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as long:
        api.messages.create(model=model_ref, max_tokens=8, messages=[{"role": "user", "content": "word " * 9000}],
                            stream=True)
    assert "holds 8,192" in long.value.body["error"]["message"]
    # max_tokens is required (the SDK checks it too: the wire, then), and unknown paths answer in the shape
    port = int(queen.url.rsplit(":", 1)[1])
    resp, body = raw_call(port, "POST", "/v1/messages", {"model": model_ref, "messages": PARIS})
    assert resp.status == 400 and body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: is required: the most tokens to generate "
                                                    "(a positive integer)"}}
    resp, body = raw_call(port, "POST", "/v1/messages/batches", {})
    assert resp.status == 404 and body["error"]["type"] == "not_found_error"
    assert tracebacks(queen.lines, rbee_home) == []


def test_an_error_after_the_stream_began_is_an_error_event(queen, model_ref, tmp_path):
    with client(queen).messages.stream(model=model_ref, messages=[{"role": "user", "content": "Count to a thousand."}],
                                       max_tokens=1500, extra_body=GREEDY) as stream:
        events = iter(stream)
        next(events)
        for pid, cmd in rbee_processes(str(tmp_path)):
            if " worker " in cmd:
                os.kill(pid, signal.SIGKILL)
        with pytest.raises(anthropic.APIStatusError) as died:
            for _ in events:
                pass
    assert died.value.body["type"] == "error" and died.value.body["error"]["type"] == "api_error"


def test_an_alias_named_like_a_claude_model_is_that_model(queen, model_ref, env):
    assert run_rbee(["models", "alias", "claude-sonnet-4-5", model_ref], env).returncode == 0
    api = client(queen)
    direct = api.messages.create(model=model_ref, messages=PARIS, max_tokens=8, extra_body=GREEDY)
    aliased = api.messages.create(model="claude-sonnet-4-5", messages=PARIS, max_tokens=8, extra_body=GREEDY)
    assert aliased.model == "claude-sonnet-4-5" and aliased.content[0].text == direct.content[0].text
    assert api.messages.count_tokens(model="claude-sonnet-4-5", messages=PARIS).input_tokens == (
        direct.usage.input_tokens)


def test_the_key_as_x_api_key_or_bearer_is_asked_for_and_never_shown(roles, env, model_ref, tmp_path):
    key = "sk-rbee-test-anthropic-0123456789"
    queen = start_queen(roles, dict(env, RBEE_API_KEY=key))
    for wrong in ({"api_key": "wrong"}, {"auth_token": "wrong"}):
        with pytest.raises(anthropic.AuthenticationError) as refused:
            client(queen, **wrong).messages.create(model=model_ref, messages=PARIS, max_tokens=4)
        assert refused.value.body["error"]["type"] == "authentication_error"
    resp, body = raw_call(int(queen.url.rsplit(":", 1)[1]), "POST", "/v1/messages/count_tokens",
                          {"model": model_ref, "messages": PARIS})
    assert resp.status == 401 and body["error"] == {"type": "authentication_error", "message": (
        "Missing API key (Authorization: Bearer ... or x-api-key: ...)")}
    for right in ({"api_key": key}, {"auth_token": key}):   # x-api-key, and a bearer (Claude Code's token)
        assert client(queen, **right).messages.create(model=model_ref, messages=PARIS, max_tokens=4).content
    assert openai_client(queen).with_options(api_key=key).models.list().data   # the other APIs: as before
    for pid, cmd in rbee_processes(str(tmp_path)):
        assert key not in cmd, cmd
    logs = [os.path.join(d, f) for d, _, files in os.walk(str(tmp_path)) for f in files if f.endswith(".log")]
    assert logs and not [p for p in logs if key in open(p, errors="replace").read()]
    assert not [line for line in queen.lines if key in line]
