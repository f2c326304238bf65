"""Agents on the queen (issue 19): tool calls and structured outputs through the OpenAI and Ollama
APIs, driven by the real `openai` and `ollama` packages against a real queen, hive and worker on the
real model. The test model's template knows no tools: its calls take the generic format, which a
grammar makes valid whenever a call is required (the other families: tests/test_tools.py)."""
import concurrent.futures
import json

import jsonschema
import ollama
import openai
import pytest

from conftest import start_queen


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                                            "days": {"type": "integer"}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather forecast of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
ANSWER_SCHEMA = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 40},
                                                  "population_millions": {"type": "number"},
                                                  "languages": {"type": "array", "items": {"type": "string",
                                                                                           "maxLength": 20},
                                                                "maxItems": 3}},
                 "required": ["capital", "population_millions", "languages"], "additionalProperties": False}


def client(queen):
    return openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0)


def assert_valid_call(call, name, schema):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_required_tool_call_is_a_valid_call_streamed_and_not_and_its_result_gets_a_text_answer(queen, model_ref):
    api = client(queen)
    answer = api.chat.completions.create(model=model_ref, messages=ASK, tools=TOOLS, tool_choice="required",
                                         temperature=0, max_tokens=80)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert_valid_call(call, call.function.name, TOOLS[[t["function"]["name"] for t in TOOLS].index(
        call.function.name)]["function"]["parameters"])
    assert choice.message.content is None

    # streamed: the first delta of the call has its id and name, the fragments make its arguments
    chunks = list(api.chat.completions.create(model=model_ref, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                              stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in deltas[1:]) and len(deltas) > 2
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)

    # the second turn: the call and its result in the history, the model answers in text
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": deltas[0].id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": deltas[0].id, "content": "Sunny, 24 degrees, light wind"}]
    second = api.chat.completions.create(model=model_ref, messages=history, tools=TOOLS, tool_choice="none",
                                         temperature=0, max_tokens=30)
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.content.strip()
    assert not second.choices[0].message.tool_calls


def test_tool_choice_none_never_calls_and_is_the_plain_chat(queen, model_ref):
    api = client(queen)
    plain = api.chat.completions.create(model=model_ref, messages=ASK, temperature=0, max_tokens=24)
    for seed in range(3):
        none = api.chat.completions.create(model=model_ref, messages=ASK, tools=TOOLS, tool_choice="none",
                                           temperature=0.9, seed=seed, max_tokens=24)
        assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason != "tool_calls"
    greedy = api.chat.completions.create(model=model_ref, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0,
                                         max_tokens=24)
    assert greedy.choices[0].message.content == plain.choices[0].message.content


def test_a_strict_json_schema_answer_validates_and_a_schema_with_no_grammar_is_a_400(queen, model_ref):
    api = client(queen)
    ask = [{"role": "user", "content": "Describe France as JSON: its capital, population and languages."}]
    answer = api.chat.completions.create(model=model_ref, messages=ask, temperature=0, max_tokens=120, response_format={
        "type": "json_schema", "json_schema": {"name": "country", "schema": ANSWER_SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), ANSWER_SCHEMA)
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=model_ref, messages=ask, max_tokens=10, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}})
    assert "json_schema" in str(refused.value) and "not" in str(refused.value)
    with pytest.raises(openai.BadRequestError) as unknown:
        api.chat.completions.create(model=model_ref, messages=ask, tools=TOOLS, max_tokens=10,
                                    tool_choice={"type": "function", "function": {"name": "launch_rocket"}})
    assert "tool_choice" in str(unknown.value)


def test_grammar_constrained_and_plain_requests_in_one_batch_each_get_their_solo_text(roles, env, model_ref):
    # (--kv-split: each slot its own part of the KV cache; in the shared one, a text is its solo text up to a
    # near tie, docs/PROTOCOL.md §18)
    queen = start_queen(roles, env, "--kv-split")
    api = client(queen)
    ask = [{"role": "user", "content": "Name a large city and its country as JSON."}]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"]}

    def constrained():
        return api.chat.completions.create(
            model=model_ref, messages=ask, temperature=0, max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
        ).choices[0].message.content

    def called():
        return api.chat.completions.create(model=model_ref, messages=ASK, tools=TOOLS, temperature=0, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}}
                                           ).choices[0].message.tool_calls[0].function.arguments

    def plain():
        return api.chat.completions.create(model=model_ref, messages=[{"role": "user", "content": "Tell me a joke."}],
                                           temperature=0, max_tokens=32).choices[0].message.content
    for request in (constrained, called, plain):   # once first, so that the prompt cache holds what the batch
        request()   # will find: a prompt evaluated whole and one from a cached prefix may part at a near tie (§18)
    alone = [constrained(), called(), plain()]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = [pool.submit(f) for f in (constrained, called, plain)]
    assert [f.result() for f in together] == alone and all(alone)
    loaded = [e["human"] for e in queen.events if e.get("action") == "model_loaded"]
    assert loaded and all("4 slots each with 2,048 tokens" in human for human in loaded), loaded


def test_ollama_chat_with_tools_and_a_format_schema(queen, model_ref):
    api = ollama.Client(host=queen.url)
    tools = [dict(t, function=dict(t["function"])) for t in TOOLS]
    answer = api.chat(model=model_ref, messages=ASK, tools=tools, options={"temperature": 0, "num_predict": 80},
                      format=None)
    assert answer.done
    # Ollama has no tool_choice: with tools the model may answer in text or call; a call is well formed
    for call in answer.message.tool_calls or ():
        assert call.function.name in ("get_weather", "get_time") and isinstance(call.function.arguments, dict)
    structured = api.chat(model=model_ref, messages=[{"role": "user", "content": "Describe France as JSON."}],
                          format=ANSWER_SCHEMA, options={"temperature": 0, "num_predict": 120})
    jsonschema.validate(json.loads(structured.message.content), ANSWER_SCHEMA)
    streamed = "".join(part.message.content for part in api.chat(
        model=model_ref, messages=[{"role": "user", "content": "Describe France as JSON."}], format=ANSWER_SCHEMA,
        options={"temperature": 0, "num_predict": 120}, stream=True))
    assert streamed == structured.message.content
    # a call and its result (arguments as an object, the result by tool_name), as Ollama's clients send them
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 24 degrees"}]
    second = api.chat(model=model_ref, messages=history, options={"temperature": 0, "num_predict": 30})
    assert second.message.content.strip()
    with pytest.raises(ollama.ResponseError) as refused:
        api.chat(model=model_ref, messages=ASK, format={"type": "no-such-type"})
    assert refused.value.status_code == 400 and "format" in str(refused.value) or "json_schema" in str(refused.value)
