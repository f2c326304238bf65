"""Reranking served by the queen (issue 20): /v1/rerank and /rerank on a real queen, hive and worker
of the tests' tiny reranker (tests/reranker.py: a BERT with a classification head and rank
pooling), asked with raw HTTP as Jina's and Cohere's clients and Open WebUI's external reranker
ask; its scores compared with llama-cpp-python's own rank pooling of the same pairs."""
import json

import pytest

import rbee
import reranker

from conftest import raw_call, worker_threads

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "it is a bear", "bread recipe: flour, water, salt and yeast",
             "london is the capital of england", "the cat sat on the mat"]


@pytest.fixture(scope="module")
def reference_scores(tiny_reranker):
    """llama-cpp-python's rank pooling of each (QUERY, document) pair alone, formatted by hand as llama.cpp's
    server formats it for this vocabulary: [CLS] query [SEP] [SEP] document [SEP] (SEP for its missing EOS);
    no flash attention, as an encoder's embeddings context has none (backends.engine.Embedder)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=tiny_reranker(), embedding=True, n_ctx=reranker.N_CTX, n_threads=worker_threads(),
                          flash_attn=False, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK, verbose=False)
    words = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)

    def score(document):
        llm._batch.reset()
        llm._ctx.kv_cache_clear()
        llm._batch.add_sequence([reranker.CLS] + words(QUERY) + [reranker.SEP] * 2 + words(document) + [reranker.SEP],
                                0, True)
        llm._ctx.decode(llm._batch)
        return llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)[0]
    scores = [score(d) for d in DOCUMENTS]
    llm.close()
    return scores


def rerank(queen, body, path="/v1/rerank"):
    return raw_call(int(queen.url.rsplit(":", 1)[1]), "POST", path, body, timeout=120)


def test_results_are_llama_cpps_scores_sorted_and_the_same_each_time(queen, tiny_reranker, reference_scores):
    model = "file:" + tiny_reranker()
    resp, answer = rerank(queen, {"model": model, "query": QUERY, "documents": DOCUMENTS})
    assert resp.status == 200, answer
    assert answer["model"] == model and answer["object"] == "list"
    results = answer["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    for r in results:
        assert abs(r["relevance_score"] - reference_scores[r["index"]]) < 1e-4
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}   # (returned unless asked not to, as Jina does)
    assert len({round(s, 3) for s in reference_scores}) == len(DOCUMENTS)   # (the scores tell the documents apart)
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 4 * len(DOCUMENTS)
    # the same again, on the path without /v1, with the documents as objects (Cohere's, Jina's `{text}`)
    again = rerank(queen, {"model": model, "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS]}, "/rerank")[1]
    assert again["results"] == results and again["usage"] == answer["usage"]


def test_top_n_and_return_documents(queen, tiny_reranker, reference_scores):
    model = "file:" + tiny_reranker()
    best = sorted(range(len(DOCUMENTS)), key=lambda k: -reference_scores[k])
    answer = rerank(queen, {"model": model, "query": QUERY, "documents": DOCUMENTS, "top_n": 2,
                            "return_documents": False})[1]
    assert [r["index"] for r in answer["results"]] == best[:2]
    assert all(set(r) == {"index", "relevance_score"} for r in answer["results"])
    everything = rerank(queen, {"model": model, "query": QUERY, "documents": DOCUMENTS, "top_n": 50})[1]
    assert [r["index"] for r in everything["results"]] == best


def test_a_document_over_the_context_is_cut(queen, tiny_reranker):
    model = "file:" + tiny_reranker()
    long_document = "the cat sat on the mat " * 200   # (1,200 words; the reranker's context holds 512 tokens)
    resp, answer = rerank(queen, {"model": model, "query": QUERY, "documents": [long_document, DOCUMENTS[0]]})
    assert resp.status == 200, answer
    assert answer["usage"]["prompt_tokens"] <= reranker.N_CTX + 20


@pytest.mark.parametrize("body, field", [
    ({"query": QUERY, "documents": []}, "documents"),
    ({"query": QUERY}, "documents"),
    ({"query": QUERY, "documents": ["x"] * 10000}, "documents"),
    ({"query": QUERY, "documents": ["fine", 3]}, "documents[1]"),
    ({"query": QUERY, "documents": ["fine", {"title": "no text"}]}, "documents[1]"),
    ({"documents": DOCUMENTS}, "query"),
    ({"query": QUERY, "documents": DOCUMENTS, "top_n": 0}, "top_n"),
    ({"query": QUERY, "documents": DOCUMENTS, "return_documents": "yes"}, "return_documents"),
])
def test_bad_input_is_a_400_naming_the_field(queen, tiny_reranker, body, field):
    for path in ("/v1/rerank", "/rerank"):
        resp, answer = rerank(queen, dict(body, model="file:" + tiny_reranker()), path)
        assert resp.status == 400 and answer["error"]["param"] == field, answer
        assert answer["error"]["type"] == "invalid_request_error"


def test_a_chat_model_cannot_rerank_and_a_reranker_cannot_embed(queen, model_ref, tiny_reranker):
    resp, answer = rerank(queen, {"model": model_ref, "query": QUERY, "documents": DOCUMENTS})
    assert resp.status == 400 and answer["error"]["param"] == "model" and "cannot rerank" in answer["error"]["message"]
    resp, answer = raw_call(int(queen.url.rsplit(":", 1)[1]), "POST", "/v1/embeddings",
                            {"model": "file:" + tiny_reranker(), "input": "some text"}, timeout=120)
    assert resp.status == 400 and answer["error"]["param"] == "model" and "only ranks" in answer["error"]["message"]


# -- in process: the pair as llama.cpp's server formats it ---------------------------------------

@pytest.fixture(scope="module")
def vocabularies(tiny_reranker):
    """The reranker's tokenizer alone (vocab_only), without and with a `tokenizer.chat_template.rerank`."""
    import llama_cpp
    load = lambda path: llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    return load(tiny_reranker()), load(tiny_reranker("[CLS] query: {query} [SEP] document: {document} [SEP]"))


def test_a_pair_is_bos_query_eos_sep_document_eos_with_sep_for_the_missing_eos(vocabularies):
    llm, _ = vocabularies
    words = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)
    query, document = words("what is the capital"), words("paris is the capital of france")
    assert rbee.rerank_tokens(llm, "what is the capital", "paris is the capital of france") == (
        [reranker.CLS] + query + [reranker.SEP, reranker.SEP] + document + [reranker.SEP])
    # cut to a context: the document loses its end, the query and the special tokens stay
    cut = rbee.rerank_tokens(llm, "what is the capital", "paris is the capital of france", len(query) + 7)
    assert cut == [reranker.CLS] + query + [reranker.SEP, reranker.SEP] + document[:3] + [reranker.SEP]


def test_a_gguf_rerank_template_is_filled_in_with_its_special_tokens_read(vocabularies):
    _, llm = vocabularies
    words = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)
    assert rbee.rerank_tokens(llm, "the cat", "a dog") == (
        [reranker.CLS] + words("query: the cat") + [reranker.SEP] + words("document: a dog") + [reranker.SEP])


def test_the_worker_refuses_a_bad_body_before_any_model_work():
    with pytest.raises(rbee.InvalidRequest) as refused:
        rbee.rerank_request({"query": "q", "documents": ["a", None]})
    assert refused.value.details == {"field": "documents[1]"}
    assert json.dumps(rbee.rerank_request({"query": "q", "documents": ["a"]})) == '["q", ["a"], false]'
