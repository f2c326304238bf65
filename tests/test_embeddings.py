"""Embeddings served by the queen (issue 20): the real `openai` and `ollama` packages against a real
queen, hive and worker on the test model, its vectors compared with llama-cpp-python's own
`Llama(embedding=True).embed` with the same pooling (mean: the model declares none, as a chat
model) and flash attention on, as the worker's context has it."""
import concurrent.futures
import json
import math

import numpy
import ollama
import openai
import pytest

import rbee

from conftest import assert_no_rbee_left, raw_request, run_rbee, worker_threads

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "def add(a, b): return a + b",
         "A long text about the weather in the mountains, where it rains a lot in spring and snows in winter, "
         "the paths are steep, the huts are small, and the shepherds bring their flocks down to the valley "
         "before the first storms of the autumn come over the ridge."]   # (about 60 tokens)


@pytest.fixture(scope="module")
def reference_vectors(model_path):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=model_path, embedding=True, n_ctx=2048, n_threads=worker_threads(),
                          flash_attn=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
    vectors = [llm.embed(text, normalize=True) for text in TEXTS]   # (each alone: rbee's vector of a text)
    llm.close()
    return vectors


def close(got, expected):
    return numpy.abs(numpy.array(got) - numpy.array(expected)).max() < 1e-4


def test_openai_embeddings_are_llama_cpp_pythons_alone_and_eight_at_once(queen, model_ref, reference_vectors):
    api = openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0)
    answer = api.embeddings.create(model=model_ref, input=TEXTS)   # (the package asks for base64)
    vectors = [d.embedding for d in sorted(answer.data, key=lambda d: d.index)]
    assert [len(v) for v in vectors] == [576] * len(TEXTS)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-5 for v in vectors)
    assert all(close(v, r) for v, r in zip(vectors, reference_vectors))
    assert answer.usage.prompt_tokens > len(TEXTS) and answer.model == model_ref
    floats = api.embeddings.create(model=model_ref, input=TEXTS[1], encoding_format="float").data[0].embedding
    assert close(floats, reference_vectors[1])   # one text alone: the vector it has in a batch
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda k: api.embeddings.create(model=model_ref, input=TEXTS[k % 4]).data[0].embedding,
                                 range(8)))
    assert all(close(v, reference_vectors[k % 4]) for k, v in enumerate(together))
    short = api.embeddings.create(model=model_ref, input=TEXTS[0], dimensions=64).data[0].embedding
    assert len(short) == 64 and abs(math.sqrt(sum(x * x for x in short)) - 1) < 1e-5


def test_ollama_embed_and_the_older_embeddings(queen, model_ref, reference_vectors):
    api = ollama.Client(host=queen.url)
    answer = api.embed(model=model_ref, input=TEXTS)
    assert all(close(v, r) for v, r in zip(answer.embeddings, reference_vectors))
    assert answer.prompt_eval_count > len(TEXTS)
    assert close(api.embed(model=model_ref, input=TEXTS[2]).embeddings[0], reference_vectors[2])
    assert close(api.embeddings(model=model_ref, prompt=TEXTS[3]).embedding, reference_vectors[3])
    # Ollama truncates an input over the context unless told not to
    long_text = "word " * 3000
    assert len(api.embed(model=model_ref, input=long_text).embeddings[0]) == 576
    with pytest.raises(ollama.ResponseError) as refused:
        api.embed(model=model_ref, input=long_text, truncate=False)
    assert refused.value.status_code == 400 and "context" in str(refused.value)


def test_chat_beside_embeddings_keeps_its_text(queen, model_ref):
    api = openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "Tell me about the sea."}]
    alone = api.chat.completions.create(model=model_ref, messages=ask, temperature=0, max_tokens=40)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        chat = pool.submit(api.chat.completions.create, model=model_ref, messages=ask, temperature=0, max_tokens=40)
        for _ in range(2):
            pool.submit(api.embeddings.create, model=model_ref, input=TEXTS * 4)
    assert chat.result().choices[0].message.content == alone.choices[0].message.content


@pytest.mark.parametrize("value", [[], [1.5], [None], ["ok", 3.2], [""], ["x"] * 10000, {"a": 1}])
def test_bad_input_is_a_400_in_each_apis_shape(queen, model_ref, value):
    api = openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        api.embeddings.create(model=model_ref, input=value, encoding_format="float")
    assert refused.value.body["param"].startswith("input")
    # (the `ollama` package checks its types first: the same body, sent as it is)
    conn, resp = raw_request(int(queen.url.rsplit(":", 1)[1]), "POST", "/api/embed", {"model": model_ref,
                                                                                        "input": value})
    assert resp.status == 400 and isinstance(json.loads(resp.read())["error"], str)
    conn.close()


def test_the_embed_command_prints_a_vector_a_line_and_leaves_nothing(env, model_ref, reference_vectors, tmp_path):
    done = run_rbee(["embed", "--model", model_ref, TEXTS[0], TEXTS[1]], env)
    assert done.returncode == 0, done.stderr
    vectors = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(vectors) == 2 and close(vectors[0], reference_vectors[0]) and close(vectors[1], reference_vectors[1])
    assert "2 vectors of 576 dimensions" in done.stderr
    as_json = run_rbee(["embed", "--model", model_ref, "--json", "--quiet", TEXTS[2]], env)
    assert as_json.returncode == 0 and as_json.stderr == ""
    event, = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert event["event"] == "embedding" and event["index"] == 0 and close(event["embedding"], reference_vectors[2])
    refused = run_rbee(["embed", "--model", model_ref, "word " * 3000], env)
    assert refused.returncode != 0 and "context" in refused.stderr and not refused.stdout
    assert_no_rbee_left(str(tmp_path))   # (each command's ephemeral queen, its hive and worker: gone)


@pytest.mark.parametrize("metadata, kind", [
    ({"general.architecture": "llama"}, "chat"),                                    # the test model
    ({"general.architecture": "llama", "llama.pooling_type": "0"}, "chat"),        # (pooling none: a chat model)
    ({"general.architecture": "nomic-bert", "nomic-bert.pooling_type": 1}, "embedding"),
    ({"general.architecture": "bert"}, "embedding"),
    ({"general.architecture": "qwen3", "qwen3.pooling_type": "3"}, "embedding"),  # Qwen3-Embedding: last token
    ({"general.architecture": "bert", "bert.pooling_type": 4}, "rerank"),          # bge-reranker
])
def test_what_a_model_is_for_comes_from_its_gguf(metadata, kind):
    assert rbee.model_kind(metadata) == kind

