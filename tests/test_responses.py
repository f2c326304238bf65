"""OpenAI's Responses API on the queen (PROTOCOL.md §13): first its pure parts in process -- the
input items as the chat messages a worker takes, the tools, the output and its `response.*`
events checked against the `openai` package's own types (pydantic, validated strictly), the store
and its bounds -- then the real `openai` package against a real queen, hive and worker on the real
model."""
import json
import os
import signal
import sys
import time

import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from conftest import REPO, raw_call, raw_request, rbee_processes, tracebacks

sys.path.insert(0, str(REPO))
import rbee  # noqa: E402

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def bad_field(function, *args):
    """Call `function`; it must raise a 400 INVALID_REQUEST; returns the field it names (OpenAI's `param`)."""
    with pytest.raises(rbee.InvalidRequest) as caught:
        function(*args)
    assert caught.value.status == 400
    return caught.value.details["field"]


# ============================================================================================
# The input: items -> chat messages
# ============================================================================================

def test_a_string_input_is_one_user_message_and_instructions_come_first_but_are_not_kept():
    job, added = rbee.response_request({"model": "m", "input": "hi", "instructions": "Be brief."})
    assert job["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert added == [{"role": "user", "content": "hi"}]   # what the conversation keeps: no instructions


def test_message_items_with_parts_and_every_role():
    messages = rbee.response_input_messages([
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be "},
                                                          {"type": "input_text", "text": "kind."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "bonjour", "annotations": []}]},
        {"type": "reasoning", "id": "rs_1", "summary": []}])
    assert messages == [{"role": "system", "content": "Answer in French."}, {"role": "system", "content": "Be kind."},
                        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"}]


def test_function_calls_join_their_assistant_turn_and_outputs_are_named_after_their_call():
    earlier = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_0", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_0", "name": "clock", "content": "noon"}]
    messages = rbee.response_input_messages([
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "weather",
         "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_2", "output": "sun"},
        {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "function_call_output", "call_id": "call_0", "output": "still noon"}], earlier)
    assert messages == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "name": "weather", "content": "sun"},
        {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_0", "name": "clock", "content": "still noon"}]   # (a call of `earlier`)
    # a call alone is an assistant turn of its own
    alone = rbee.response_input_messages([{"type": "function_call", "call_id": "c", "name": "f", "arguments": ""}])
    assert alone == [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}]
    assert earlier[1]["tool_calls"][0]["id"] == "call_0" and len(earlier) == 3   # `earlier` is left as it was


@pytest.mark.parametrize("value, field", [
    (None, "input"), ([], "input"), (42, "input"), (["hi"], "input[0]"),
    ([{"role": "wizard", "content": "hi"}], "input[0].role"),
    ([{"role": "user", "content": 3}], "input[0].content"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "data:..."}]}], "input[0].content[0]"),
    ([{"role": "user", "content": "hi"}, {"type": "web_search_call", "id": "ws"}], "input[1].type"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
    ([{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}], "input[0].arguments"),
    ([{"type": "function_call_output", "call_id": "nowhere", "output": "x"}], "input[0].call_id"),
])
def test_a_wrong_input_is_a_400_naming_the_item(value, field):
    assert bad_field(rbee.response_input_messages, value) == field


# ============================================================================================
# Tools, tool_choice, text.format, the sampling fields
# ============================================================================================

def test_function_tools_in_the_chat_shape_and_hosted_tools_left_out():
    weather = {"type": "function", "name": "weather", "description": "The weather of a city", "strict": True,
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    job, _ = rbee.response_request({"model": "m", "input": "hi", "tools": [weather, {"type": "web_search"}],
                                    "tool_choice": {"type": "function", "name": "weather"},
                                    "parallel_tool_calls": True})
    assert job["tools"] == [{"type": "function", "function": {"name": "weather", "description": "The weather of a city",
                                                               "parameters": weather["parameters"]}}]
    assert job["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert job["parallel_tool_calls"] is True
    response = rbee.response_object({"model": "m", "tools": [weather, {"type": "web_search"}]}, job, True)
    assert response["tools"] == [weather] and response["parallel_tool_calls"] is True
    for choice in ("auto", "none", "required"):
        assert rbee.response_request({"input": "x", "tool_choice": choice})[0]["tool_choice"] == choice
    plain, _ = rbee.response_request({"input": "x"})
    assert "tools" not in plain and "tool_choice" not in plain and plain["parallel_tool_calls"] is False


def test_text_format_max_output_tokens_and_sampling():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    job, _ = rbee.response_request({"input": "x", "max_output_tokens": 64, "temperature": 0, "top_p": 0.5,
                                    "text": {"format": {"type": "json_schema", "name": "n", "schema": schema,
                                                        "strict": True}}})
    assert job["json_schema"] == schema and "grammar" not in job
    assert (job["max_tokens"], job["temperature"], job["top_p"]) == (64, 0, 0.5)
    assert rbee.response_request({"input": "x", "text": {"format": {"type": "json_object"}}})[0]["grammar"] == "json"
    default, _ = rbee.response_request({"input": "x", "text": {"format": {"type": "text"}}})
    assert "grammar" not in default and "json_schema" not in default
    assert default["max_tokens"] == rbee.DEFAULT_N_CTX and default["temperature"] == 0.8


@pytest.mark.parametrize("body, field", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tools": [{"type": "web_search"}, {"type": "function", "name": "get weather"}]}, "tools[1].name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": "{}"}]}, "tools[0].parameters"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"text": "json"}, "text"),
    ({"instructions": ["be brief"]}, "instructions"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_a_wrong_field_is_a_400_naming_it(body, field):
    assert bad_field(rbee.response_request, dict({"input": "hi"}, **body)) == field


# ============================================================================================
# The output and its events, as the openai package's types read them
# ============================================================================================

def run_output(pieces, finish_reason="stop", body=None):
    """Feed `pieces` to a ResponseOutput as ResponsesApi does; returns (final response, events as
    they would leave: JSON at the moment each is sent)."""
    events = []

    def emit(kind, fields):
        events.append(json.loads(json.dumps(dict({"type": kind, "sequence_number": len(events)}, **fields))))
    body = body or {"model": "m", "input": "hi"}
    job, _ = rbee.response_request(body)
    output = rbee.ResponseOutput(rbee.response_object(body, job, True), emit)
    output.start()
    for piece in pieces:
        output.feed(piece)
    usage = rbee.response_usage({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    final = output.result(finish_reason, usage)
    output.finish(final)
    return json.loads(json.dumps(final)), events, output


def check_with_the_sdk(final, events):
    """Every event and the final response validate as the openai package's types (strictly)."""
    parsed = [STREAM_EVENT.validate_python(e) for e in events]
    assert [p.sequence_number for p in parsed] == list(range(len(events)))
    return Response.model_validate(final), parsed


def test_a_text_answer_streams_openais_event_sequence():
    pieces = [rbee.Token("Hello", 0), rbee.Token("", 1), rbee.Token(" world", 2)]
    final, events, output = run_output(pieces)
    response, parsed = check_with_the_sdk(final, events)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert response.output_text == "Hello world" and response.status == "completed"
    assert response.id.startswith("resp_") and response.output[0].id.startswith("msg_")
    assert {e["item_id"] for e in events[3:8]} == {response.output[0].id} == {events[8]["item"]["id"]}
    assert events[2]["item"]["status"] == "in_progress" and events[8]["item"]["status"] == "completed"
    assert events[6]["text"] == "Hello world" and events[7]["part"]["text"] == "Hello world"
    assert events[-1]["response"] == final and response.incomplete_details is None
    assert response.usage.input_tokens == 10 and response.usage.output_tokens == 5 and response.usage.total_tokens == 15
    assert output.message() == {"role": "assistant", "content": "Hello world"}


def test_tool_calls_stream_as_function_call_items_after_the_text():
    pieces = [rbee.Token("Checking.", 0), rbee.ToolCallDelta(0, "call_a", "weather", ""),
              rbee.ToolCallDelta(0, None, None, '{"city": '), rbee.ToolCallDelta(0, None, None, '"Paris"}'),
              rbee.ToolCallDelta(1, "call_b", "clock", "{}")]
    final, events, output = run_output(pieces, "tool_calls")
    response, _ = check_with_the_sdk(final, events)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    message, first, second = response.output
    assert message.type == "message" and response.output_text == "Checking."
    assert (first.type, first.call_id, first.name, json.loads(first.arguments)) == (
        "function_call", "call_a", "weather", {"city": "Paris"})
    assert (second.call_id, second.name, second.arguments) == ("call_b", "clock", "{}")
    assert first.id.startswith("fc_") and first.id != second.id and first.status == "completed"
    assert events[8]["item"]["arguments"] == "" and events[11]["arguments"] == '{"city": "Paris"}'
    assert [e["output_index"] for e in events[8:13]] == [1] * 5 and response.status == "completed"
    # the conversation a later turn continues: one assistant message with the text and both calls
    assert output.message() == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]}


def test_only_calls_make_no_message_and_the_sdks_stream_helper_accumulates_the_same_response():
    from openai.lib.streaming.responses._responses import ResponseStreamState
    final, events, output = run_output([rbee.ToolCallDelta(0, "call_a", "clock", "{}")], "tool_calls")
    response, parsed = check_with_the_sdk(final, events)
    assert [item.type for item in response.output] == ["function_call"] and response.output_text == ""
    assert output.message() == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]}
    state = ResponseStreamState(input_tools=[], text_format=openai.omit)   # (what responses.stream() runs)
    helper = [event for raw in parsed for event in state.handle_event(raw)]
    assert helper[-1].type == "response.completed" and helper[-1].response.output[0].arguments == "{}"


def test_an_answer_cut_by_max_output_tokens_is_incomplete_and_an_empty_one_still_has_a_message():
    final, events, _ = run_output([rbee.Token("Once upon", 0)], "length")
    response, _ = check_with_the_sdk(final, events)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and events[-1]["type"] == "response.incomplete"
    final, events, _ = run_output([])
    response, _ = check_with_the_sdk(final, events)
    assert [item.type for item in response.output] == ["message"] and response.output_text == ""


def test_a_call_whose_pieces_come_after_the_next_item_began_is_a_bug_said_so():
    output = rbee.ResponseOutput(rbee.response_object({"model": "m", "input": "x"}, rbee.response_request(
        {"input": "x"})[0], True))
    output.feed(rbee.ToolCallDelta(0, "call_a", "f", "{"))
    output.feed(rbee.Token("text", 0))
    with pytest.raises(rbee.InternalError):
        output.feed(rbee.ToolCallDelta(0, None, None, "}"))


# ============================================================================================
# The store: by count, by size, by age; deleted ones; store: false never reaches it
# ============================================================================================

def kept_response(n):
    return {"id": "resp_%d" % n, "object": "response"}


def test_the_store_keeps_the_newest_within_its_count_and_size():
    store = rbee.ResponseStore(limit=3, max_bytes=100, ttl=60)
    for n in range(5):
        store.put(kept_response(n), [{"role": "user", "content": str(n)}], 10)
    assert [store.get("resp_%d" % n) is not None for n in range(5)] == [False, False, True, True, True]
    assert store.get("resp_4").conversation == [{"role": "user", "content": "4"}] and store.size == 30
    store.put(kept_response(5), [], 80)   # 30 + 80 > 100: the oldest go until it fits
    assert [n for n in range(6) if store.get("resp_%d" % n)] == [3, 4, 5] and store.size == 100
    assert store.delete("resp_4") and not store.delete("resp_4") and store.get("resp_4") is None
    assert store.size == 90


def test_the_store_forgets_what_is_older_than_its_ttl():
    store = rbee.ResponseStore(limit=10, max_bytes=1000, ttl=0.3)
    store.put(kept_response(1), [], 1)
    time.sleep(0.2)
    store.put(kept_response(2), [], 1)
    assert store.get("resp_1") and store.get("resp_2")
    time.sleep(0.15)
    assert store.get("resp_1") is None and store.get("resp_2") is not None and store.size == 1
    time.sleep(0.2)
    assert store.get("resp_2") is None and store.size == 0 and not store.kept


# ============================================================================================
# End to end: the openai package against a real queen, hive and worker on the real model
# ============================================================================================

def client(queen):
    return openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0)


def port_of(queen):
    return int(queen.url.rsplit(":", 1)[1])


QUESTION = {"instructions": "Answer briefly.", "input": "How many legs does a cat have?", "temperature": 0,
            "max_output_tokens": 64}   # (the 135M model's answer, 16 tokens, ends well before; to "What is
# 2 + 2?" it said "The answer is 4." on one CPU and went on past 64 tokens on another, AVX-512, CPU)


def test_a_response_streamed_and_not_and_through_the_sdks_stream_helper(queen, model_ref, rbee_home):
    api = client(queen)
    # once first, so that the prompt cache holds the question for each of the three: a prompt evaluated whole
    # and one from a cached prefix may part at a near tie (PROTOCOL §18)
    api.responses.create(model=model_ref, **QUESTION)
    whole = api.responses.create(model=model_ref, **QUESTION)
    assert whole.output_text.strip() and whole.status == "completed" and whole.object == "response"
    assert whole.id.startswith("resp_") and whole.model == model_ref and whole.instructions == QUESTION["instructions"]
    assert [item.type for item in whole.output] == ["message"] and whole.output[0].role == "assistant"
    assert whole.usage.input_tokens > 10 and 0 < whole.usage.output_tokens < 64
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    events = list(api.responses.create(model=model_ref, stream=True, **QUESTION))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"} and len(kinds) > 9
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text   # temperature 0: the same answer
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    with api.responses.stream(model=model_ref, **QUESTION) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text
    # the bare path (llama.cpp's servers answer without /v1 too), on the wire: event names and no [DONE]
    conn, resp = raw_request(port_of(queen), "POST", "/responses", dict(QUESTION, model=model_ref, stream=True))
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    frames = [f for f in resp.read().decode().split("\n\n") if f.strip() and not f.startswith(":")]   # (pings)
    conn.close()
    assert frames[0].startswith("event: response.created\ndata: ") and "[DONE]" not in frames[-1]
    assert all(json.loads(f.split("\ndata: ", 1)[1])["type"] == f.split("\n", 1)[0][7:] for f in frames)
    assert tracebacks(queen.lines, rbee_home) == []


def test_previous_response_id_continues_the_conversation_the_queen_kept(queen, model_ref):
    api = client(queen)
    first = api.responses.create(model=model_ref, instructions="Be brief.", input="Name a large animal.", temperature=0,
                                 max_output_tokens=40)
    follow = "Repeat exactly what you said, word for word."
    second = api.responses.create(model=model_ref, previous_response_id=first.id, input=follow, temperature=0,
                                  max_output_tokens=60)
    assert second.previous_response_id == first.id and second.instructions is None
    # the worker's prompt held the first turn: more tokens than its whole ...
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # ... and exactly the conversation sent in full, without the first turn's instructions (not carried
    # over, as OpenAI has it: the template's default system message stands in their place)
    full = api.responses.create(model=model_ref, temperature=0, max_output_tokens=60, input=[
        {"role": "user", "content": "Name a large animal."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": follow}])
    assert second.usage.input_tokens == full.usage.input_tokens and second.output_text == full.output_text
    # a kept response is there to retrieve as it was answered, until deleted
    assert api.responses.retrieve(second.id).model_dump() == second.model_dump()
    api.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError) as gone:
        api.responses.retrieve(second.id)
    assert gone.value.body["code"] == "response_not_found" and second.id in gone.value.message


def test_store_false_keeps_nothing_to_continue_or_retrieve(queen, model_ref):
    api = client(queen)
    unkept = api.responses.create(model=model_ref, input="Say hi.", store=False, max_output_tokens=8)
    assert unkept.output_text and unkept.store is False
    with pytest.raises(openai.NotFoundError) as missing:
        api.responses.create(model=model_ref, input="Again.", previous_response_id=unkept.id)
    assert missing.value.body["param"] == "previous_response_id" and unkept.id in missing.value.message
    assert missing.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(unkept.id)
    with pytest.raises(openai.NotFoundError):   # (DELETE too)
        api.responses.delete(unkept.id)
    # errors before any worker: OpenAI's shape, with the field at fault
    with pytest.raises(openai.NotFoundError) as no_model:
        api.responses.create(model="no-such-model", input="hi")
    assert no_model.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        api.responses.create(model=model_ref, input=[{"role": "wizard", "content": "hi"}])
    assert bad.value.body["param"] == "input[0].role"
    response, body = raw_call(port_of(queen), "GET", "/responses/resp_nope")
    assert response.status == 404 and body["error"]["code"] == "response_not_found"


WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}


def test_a_required_function_call_and_its_output_answered_in_text(queen, model_ref):
    api = client(queen)
    asked = api.responses.create(model=model_ref, input="What is the weather in Paris?", tools=[WEATHER],
                                 tool_choice="required", temperature=0, max_output_tokens=200)
    calls = [item for item in asked.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id and calls[0].id.startswith("fc_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    assert asked.status == "completed" and asked.tool_choice == "required"
    # streamed: the call's item, its argument fragments, the same call
    events = list(api.responses.create(model=model_ref, input="What is the weather in Paris?", tools=[WEATHER],
                                       tool_choice="required", temperature=0, max_output_tokens=200, stream=True))
    added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    fragments = [e for e in events if e.type == "response.function_call_arguments.delta"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert added and added[0].item.name == "get_weather" and fragments and done
    assert "".join(e.delta for e in fragments if e.item_id == added[0].item.id) == done[0].arguments
    assert json.loads(done[0].arguments) == json.loads(calls[0].arguments) and events[-1].type == "response.completed"
    # the tool's output in the next turn (the conversation kept), answered in text (tool_choice none: the
    # model may not call again; the 135M model's text may still echo the call's words)
    result = "Sunny, 24 degrees, light wind"
    answer = api.responses.create(model=model_ref, previous_response_id=asked.id, tools=[WEATHER], tool_choice="none",
                                  temperature=0, max_output_tokens=48, input=[
                                      {"type": "function_call_output", "call_id": calls[0].call_id, "output": result}])
    assert answer.output_text.strip() and [item.type for item in answer.output] == ["message"]
    # the same turn sent whole, as a client that keeps its own history (Codex: store=False) sends it
    whole = api.responses.create(model=model_ref, tools=[WEATHER], tool_choice="none", temperature=0,
                                 max_output_tokens=48, store=False, input=[
                                     {"role": "user", "content": "What is the weather in Paris?"}] + [
                                     item.model_dump(exclude_none=True) for item in asked.output] + [
                                     {"type": "function_call_output", "call_id": calls[0].call_id, "output": result}])
    assert whole.output_text == answer.output_text and whole.usage.input_tokens == answer.usage.input_tokens
    # ... and as the chat API's messages: the worker saw the very conversation a chat client sends
    chat = api.chat.completions.create(model=model_ref, temperature=0, max_tokens=48, tool_choice="none", tools=[
        {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": result}])
    assert chat.choices[0].message.content == answer.output_text
    assert chat.usage.prompt_tokens == answer.usage.input_tokens


def test_text_format_json_schema_and_the_sdks_parse(queen, model_ref):
    api = client(queen)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    answer = api.responses.create(model=model_ref, input="Give me a person with a name and an age.", temperature=0,
                                  max_output_tokens=200, text={"format": {"type": "json_schema", "name": "person",
                                                                          "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(answer.output_text), schema)
    assert answer.text.format.type == "json_schema"

    class Person(pydantic.BaseModel):
        name: str
        age: int
    parsed = api.responses.parse(model=model_ref, input="Give me a person with a name and an age.", temperature=0,
                                 max_output_tokens=200, text_format=Person)
    assert isinstance(parsed.output_parsed, Person)
    anything = api.responses.create(model=model_ref, instructions="You answer in JSON.", temperature=0,
                                    input="Give me a person with name and age.", max_output_tokens=200,
                                    text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(anything.output_text), dict)


def test_an_error_after_the_stream_began_is_an_error_event_then_response_failed(queen, model_ref, tmp_path):
    api = client(queen)
    stream = api.responses.create(model=model_ref, input="Count to a thousand.", max_output_tokens=1500, temperature=0,
                                  stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    for pid, cmd in rbee_processes(str(tmp_path)):
        if " worker " in cmd:
            os.kill(pid, signal.SIGKILL)
    seen += list(stream)
    assert [e.type for e in seen[-2:]] == ["error", "response.failed"]
    assert "stopped mid-stream" in seen[-2].message and seen[-2].code == "worker_crashed"
    failed = seen[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.output[0].type == "message"
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
