"""Anthropic's Messages API on the queen (PROTOCOL.md §13).

In process: the pure conversions of a Messages request to the worker's /execute body (the
contract's OpenAI-shaped one), of the worker's pieces to Anthropic's content blocks and stream
events -- checked against the `anthropic` package's own types and its own stream accumulator --
and the error shapes.
"""
import email.message
import sys
from types import SimpleNamespace

import pydantic
import pytest
from anthropic._streaming import SSEDecoder
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse

from conftest import REPO

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
    assert rbee.anthropic_tool_id("call_0a1b") == "toolu_0a1b"
    assert rbee.worker_tool_id("toolu_0a1b") == "call_0a1b"
    assert rbee.anthropic_tool_id("xyz") == "toolu_xyz"   # an id of another shape keeps all of itself
    # ids a client sends that rbee never made (a Claude session's) are the worker's ids all the same
    assert rbee.worker_tool_id("toolu_01A09q90qw90lq917835lq9") == "call_01A09q90qw90lq917835lq9"
    assert rbee.worker_tool_id("my-own-id") == "my-own-id"
    for worker_id in ("call_1", "call_" + "f" * 24):
        assert rbee.worker_tool_id(rbee.anthropic_tool_id(worker_id)) == worker_id


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
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_02"}]}]}
    assert rbee.anthropic_messages(body) == [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_01", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "other-7", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "call_01", "name": "get_weather", "content": "18 C\n\nsunny"},
        {"role": "tool", "tool_call_id": "other-7", "name": "get_time", "content": "Error: clock broken"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_02", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "call_02", "name": "get_time", "content": ""}]


def test_text_before_a_tool_result_stays_before_it_and_an_unknown_call_has_no_name():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "first"}, {"type": "tool_result", "tool_use_id": "toolu_9", "content": "r"}]}]}
    assert rbee.anthropic_messages(body) == [{"role": "user", "content": "first"},
                                             {"role": "tool", "tool_call_id": "call_9", "content": "r"}]


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
    # count_tokens: the conversation and the tools, no max_tokens needed
    assert rbee.anthropic_job({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]},
                              count_only=True) == {"messages": [{"role": "user", "content": "hi"}],
                                                   **rbee.anthropic_tools({"tools": [WEATHER]})}


@pytest.mark.parametrize("extra, field", [
    ({"max_tokens": None}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"stop_sequences": "END"}, "stop_sequences"), ({"stop_sequences": [""]}, "stop_sequences"),
    ({"stop_sequences": ["x"] * 17}, "stop_sequences"), ({"stream": "yes"}, "stream"),
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
        ("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_a",
                                                               "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}}),
        ("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}}),
        ("content_block_stop", {"index": 1}),
        ("content_block_start", {"index": 2, "content_block": {"type": "tool_use", "id": "toolu_b",
                                                               "name": "get_time", "input": {}}}),
        ("content_block_delta", {"index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        ("content_block_stop", {"index": 2})]
    whole = content.content()
    assert whole == [{"type": "text", "text": "Let me check."},
                     {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
                     {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}]
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


def test_a_call_the_worker_never_started_or_whose_arguments_are_no_object_is_an_internal_error():
    with pytest.raises(rbee.InternalError):
        rbee.AnthropicContent().tool_call(3, None, None, "{}")
    for arguments in ('{"city": ', "[1]"):
        content, _ = run_pieces([("tool_call", (0, "call_a", "f", arguments))])
        with pytest.raises(rbee.InternalError):
            content.content()


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
