"""Fill-in-the-middle (issue 19, item 5) and Ollama's /api/show read from the GGUF (item 4).

The test model, SmolLM2, has no FIM tokens; `model_copy` gives copies whose GGUF declares three of
its own special tokens as FIM_PRE, FIM_SUF and FIM_MID (the same weights and vocabulary). A real
queen, hive and worker serve them; the `ollama` and `openai` packages and raw HTTP (llama.cpp's
/infill) ask. The worker's prompt is checked by what the model makes of it: the greedy text of
llama-cpp-python's own Llama on the FIM token sequence built by hand, and its length."""
import json
import sys

import llama_cpp
import ollama
import openai
import pytest

from conftest import REPO, raw_call, raw_request, start_queen, tracebacks

sys.path.insert(0, str(REPO))
import rbee  # noqa: E402

# SmolLM2's <repo_name>, <file_sep>, <filename> (its own special tokens) as FIM_PRE, FIM_SUF, FIM_MID;
# its <reponame> (4) is FIM_REP already, found by its text as llama.cpp finds it
FIM_TOKENS = {"fim_pre": 3, "fim_suf": 5, "fim_mid": 6}
FIM_REP, FIM_SEP = 4, 7   # (FIM_SEP: <gh_stars>, declared only in the "fim-repo" copy)
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\n\nprint(add(1, 2))\n"
EXTRA = [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}]
OPTIONS = {"temperature": 0, "num_predict": 24}


@pytest.fixture
def fim_model(model_copy):
    return model_copy("fim", special_tokens=FIM_TOKENS)


@pytest.fixture
def queen(roles, env):
    return start_queen(roles, env)


def text_tokens(llm, text):
    """A user's text as format_infill tokenizes it: no BOS, no special tokens read."""
    return llm.tokenize(text.encode(), add_bos=False, special=False)


def fim_sequence(llm, prefix, suffix, extra=(), sep=None):
    """llama.cpp's server's infill prompt (format_infill), by hand: the extra files first (FIM_REP
    "myproject\\n", each file after FIM_SEP "NAME\\n", or after a "--- snippet ---" line without
    FIM_SEP), then FIM_PRE prefix FIM_SUF suffix FIM_MID. SmolLM2 adds no BOS."""
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"
    head = [FIM_REP] + text_tokens(llm, "myproject\n") if extra else []
    for item in extra:
        head += [sep] + text_tokens(llm, item["filename"] + "\n") if sep else text_tokens(
            llm, "\n\n--- snippet ---\n\n")
        head += text_tokens(llm, item["text"])
    head += [sep] + text_tokens(llm, "filename\n") if extra and sep else []
    return head + [FIM_TOKENS["fim_pre"]] + text_tokens(llm, prefix) + [FIM_TOKENS["fim_suf"]] + text_tokens(
        llm, suffix) + [FIM_TOKENS["fim_mid"]]


def greedy(llm, tokens, n=24):
    """What llama-cpp-python's own Llama writes after these tokens at temperature 0 (the same weights:
    the copies differ from the test model only in their header)."""
    return llm.create_completion(tokens, max_tokens=n, temperature=0)["choices"][0]["text"]


# -- the worker's prompt, through every API -------------------------------------------------------

def test_ollama_generate_with_a_suffix_fills_in_the_middle(queen, fim_model, reference_llm):
    """Ollama's insert: `prompt` + `suffix` become [FIM_PRE] prefix [FIM_SUF] suffix [FIM_MID], no
    template (raw or not): the text is the one the reference writes after exactly those tokens."""
    tokens = fim_sequence(reference_llm, PREFIX, SUFFIX)
    expected = greedy(reference_llm, tokens)
    assert expected != greedy(reference_llm, text_tokens(reference_llm, PREFIX))   # (the suffix matters)
    api, model = ollama.Client(host=queen.url), "file:" + fim_model
    whole = api.generate(model=model, prompt=PREFIX, suffix=SUFFIX, options=OPTIONS)
    assert whole.response == expected and whole.prompt_eval_count == len(tokens)
    parts = list(api.generate(model=model, prompt=PREFIX, suffix=SUFFIX, options=OPTIONS, stream=True))
    assert "".join(p.response for p in parts) == expected and parts[-1].done
    assert api.generate(model=model, prompt=PREFIX, suffix=SUFFIX, raw=True, options=OPTIONS).response == expected
    # a cursor at the start of the file: an empty prompt with a suffix is no load
    start = api.generate(model=model, prompt="", suffix=SUFFIX, options=OPTIONS)
    assert start.done_reason != "load"
    assert start.response == greedy(reference_llm, fim_sequence(reference_llm, "", SUFFIX))


def test_openai_completions_and_llama_cpps_infill(queen, fim_model, reference_llm):
    """OpenAI's `suffix` on /v1/completions, and llama.cpp's /infill (input_prefix + prompt: the text
    before the cursor; input_extra: other files), whole and streamed in /completion's shape."""
    tokens = fim_sequence(reference_llm, PREFIX, SUFFIX)
    expected = greedy(reference_llm, tokens)
    model, port = "file:" + fim_model, int(queen.url.rsplit(":", 1)[1])
    api = openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0)
    done = api.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=24, temperature=0)
    assert done.choices[0].text == expected and done.usage.prompt_tokens == len(tokens)
    body = {"model": model, "input_prefix": "def add(a, b):\n", "prompt": "    ", "input_suffix": SUFFIX,
            "n_predict": 24, "temperature": 0}
    resp, answer = raw_call(port, "POST", "/infill", body)
    assert resp.status == 200 and answer["content"] == expected and answer["stop"] is True
    assert answer["tokens_evaluated"] == len(tokens) and answer["tokens_predicted"] == answer["timings"]["predicted_n"]
    assert answer["stop_type"] == ("limit" if answer["tokens_predicted"] == 24 else "eos")
    # the repo-level pattern: the other files before the FIM prefix (this model has FIM_REP, no FIM_SEP)
    with_extra = fim_sequence(reference_llm, PREFIX, SUFFIX, EXTRA)
    resp, answer = raw_call(port, "POST", "/infill", dict(body, input_extra=EXTRA))
    assert answer["tokens_evaluated"] == len(with_extra) and answer["content"] == greedy(reference_llm, with_extra)
    conn, resp = raw_request(port, "POST", "/infill", dict(body, stream=True))
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    frames = [f for f in resp.read().decode().split("\n\n") if f and f != ":"]
    conn.close()
    assert all(f.startswith("data: ") for f in frames) and "data: [DONE]" not in frames
    chunks = [json.loads(f[6:]) for f in frames]
    assert "".join(c["content"] for c in chunks) == expected
    assert chunks[-1]["stop"] is True and not any(c["stop"] for c in chunks[:-1])
    assert chunks[-1]["tokens_evaluated"] == len(tokens)


def test_a_model_without_fim_tokens_refuses_a_suffix(queen, model_path, rbee_home):
    """Never a completion that ignores the suffix: 400 INVALID_REQUEST (field `suffix`) that says why,
    in each API's own shape."""
    model, port = "file:" + model_path, int(queen.url.rsplit(":", 1)[1])
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=queen.url).generate(model=model, prompt=PREFIX, suffix=SUFFIX)
    assert refused.value.status_code == 400 and "fill-in-the-middle (FIM)" in refused.value.error
    api = openai.OpenAI(base_url=queen.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=8)
    assert bad.value.body["param"] == "suffix" and "FIM" in bad.value.body["message"]
    resp, answer = raw_call(port, "POST", "/infill", {"model": model, "input_prefix": PREFIX, "input_suffix": SUFFIX})
    assert resp.status == 400 and answer["error"]["param"] == "suffix"
    assert answer["error"]["code"] == "invalid_request"
    # the same model without a suffix still answers, and none of it was a bug
    assert api.completions.create(model=model, prompt=PREFIX, max_tokens=4).choices[0].text
    assert tracebacks(queen.lines, rbee_home) == []


# -- Ollama's show, from the GGUF on the node that has the model -----------------------------------

def test_ollama_show_reads_capabilities_template_and_model_info_from_the_gguf(queen, fim_model, model_path,
                                                                               reference_llm):
    api = ollama.Client(host=queen.url)
    for path in (fim_model, model_path):   # (cataloged on localhost, no worker started)
        assert api.pull("file:" + path).status == "success"
    fim, plain = api.show("file:" + fim_model), api.show("file:" + model_path)
    assert fim.capabilities == ["completion", "tools", "insert"]
    assert plain.capabilities == ["completion", "tools"]
    assert plain.template == reference_llm.metadata["tokenizer.chat_template"]
    # Continue's autocomplete asks for `.Suffix` in the template (as Ollama's FIM models have it)
    assert ".Suffix" in fim.template and reference_llm.metadata["tokenizer.chat_template"] in fim.template
    assert ".Suffix" not in plain.template
    for shown in (fim, plain):
        info = shown.modelinfo
        assert info["general.architecture"] == "llama" and info["llama.context_length"] == 8192
        assert info["llama.embedding_length"] == 576 and info["general.file_type"] == 3
        assert "general.parameter_count" not in info   # (not in this GGUF: never made up)
        assert not [k for k in info if k.startswith("tokenizer.chat_template")]   # (that is `template`)
        assert shown.details.family == "llama" and shown.details.families == ["llama"]
        assert shown.details.parameter_size == "135M" and shown.details.quantization_level == "Q4_1"
    assert fim.modelinfo["tokenizer.ggml.fim_pre_token_id"] == 3
    assert "tokenizer.ggml.fim_pre_token_id" not in plain.modelinfo
    with pytest.raises(ollama.ResponseError) as missing:
        api.show("no-such-model")
    assert missing.value.status_code == 404


# -- in process: the header reader and the prompt builder against llama.cpp's own vocabulary ------

def vocab_only(path):
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def test_gguf_metadata_finds_the_fim_tokens_llama_cpp_finds(model_path, model_copy, tmp_path):
    copies = [model_path, model_copy("fim", special_tokens=FIM_TOKENS),
              model_copy("fim-repo", special_tokens=dict(FIM_TOKENS, fim_sep=FIM_SEP)),
              # older GGUFs' names of the three (llama.cpp reads them too)
              model_copy("fim-old-names", special_tokens={"prefix": 3, "suffix": 5, "middle": 6})]
    for path in copies:
        llm, metadata = vocab_only(path), rbee.gguf_metadata(path)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        for part in ("pre", "suf", "mid", "pad", "rep", "sep"):
            token = getattr(llama_cpp, "llama_vocab_fim_" + part)(vocab)
            assert metadata.get(rbee.FIM_KEY % part) == (None if token == llama_cpp.LLAMA_TOKEN_NULL else token), (
                path, part)
        assert metadata["general.architecture"] == "llama" and rbee.gguf_layers(path) == 30
        assert metadata["tokenizer.chat_template"] == llm.metadata["tokenizer.chat_template"]
    # without the vocabulary read, only what is declared
    assert rbee.FIM_KEY % "rep" not in rbee.gguf_metadata(model_path, find_fim=False)
    # what is no GGUF, or only the start of one, is None (the catalog's check says MODEL_NOT_FOUND)
    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as f:
        cut.write_bytes(f.read(4096))
    assert rbee.gguf_metadata(str(cut)) is None and rbee.gguf_metadata(__file__) is None
    import gguf   # the names of general.file_type's values, as the gguf package has them
    assert rbee.GGUF_FILE_TYPES == {t.value: t.name.replace("MOSTLY_", "").replace("ALL_", "").replace("_MOE", "")
                                    for t in gguf.LlamaFileType if 0 <= t.value <= 38}


def test_fim_prompt_follows_llama_cpps_format_infill(model_copy, model_path):
    """FimPrompt's tokens, by hand: the repo-level pattern with FIM_SEP, snippets without it, and what
    is cut when the prompt is longer than a slot's context (the prefix's start, the suffix's end)."""
    for sep, path in ((None, model_copy("fim", special_tokens=FIM_TOKENS)),
                      (FIM_SEP, model_copy("fim-repo", special_tokens=dict(FIM_TOKENS, fim_sep=FIM_SEP)))):
        llm = vocab_only(path)
        fim = rbee.FimPrompt(llm)
        job = rbee.Job({"prompt": PREFIX, "suffix": SUFFIX, "extra": EXTRA}, 2048)
        assert fim.render(job, 2048) == fim_sequence(llm, PREFIX, SUFFIX, EXTRA, sep)
        assert fim.render(rbee.Job({"prompt": PREFIX, "suffix": SUFFIX}, 2048), 2048) == fim_sequence(
            llm, PREFIX, SUFFIX)
    long_prefix, long_suffix = "".join("x%d = %d\n" % (k, k) for k in range(600)), "y = 1\n" * 600
    tokens = fim.render(rbee.Job({"prompt": long_prefix, "suffix": long_suffix, "max_tokens": 100}, 2048), 2048)
    assert len(tokens) == 2048 - 100
    prefix, suffix = tokens[1:tokens.index(FIM_TOKENS["fim_suf"])], tokens[tokens.index(FIM_TOKENS["fim_suf"]) + 1:-1]
    assert prefix == text_tokens(llm, long_prefix)[-len(prefix):] and len(prefix) >= (2048 - 100 - 3) * 3 // 4
    assert suffix == text_tokens(llm, long_suffix)[:len(suffix)]
    with pytest.raises(rbee.InvalidRequest) as no_fim:
        rbee.FimPrompt(vocab_only(model_path)).render(rbee.Job({"prompt": PREFIX, "suffix": SUFFIX}, 2048), 2048)
    assert no_fim.value.details == {"field": "suffix"}
    for body, field in (({"prompt": "x", "suffix": 3}, "suffix"), ({"prompt": "x", "extra": []}, "extra"),
                        ({"messages": [{"role": "user", "content": "x"}], "suffix": "y"}, "suffix"),
                        ({"prompt": "x", "suffix": "y", "extra": [{"filename": "a"}]}, "extra")):
        with pytest.raises(rbee.InvalidRequest) as bad:
            rbee.Job(body, 2048)
        assert bad.value.details == {"field": field}, body
