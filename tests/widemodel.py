"""A wide model for the RPC tensor cache (the tests and `make bench`): ggml's RPC client offers a
weight's hash instead of its bytes only for a tensor over 10 MiB (ggml-rpc.cpp's HASH_THRESHOLD),
and no tensor of SmolLM2-135M's layers comes near one (0.55 MB at most). This model has SmolLM2's
tokenizer (its GGUF's tokenizer fields, copied) over two llama layers whose every weight matrix
is over that threshold in f32 (n_embd 256, 81 heads of 128, n_ff 10368: 10.6 MB each, 74 MB a
layer), random from a fixed seed: its text means nothing, but it is the same on every run, so a
reload whose weights came from a cache shows in its text as well as in its bytes."""
import hashlib
import os

import numpy

N_EMBD, N_HEAD, HEAD_DIM, N_FF, N_LAYER, N_CTX = 256, 81, 128, 10368, 2, 2048


def cached(tokenizer_gguf):
    """The model's path beside the GGUF at `tokenizer_gguf` (its tokenizer's), under a digest of
    this builder: built the first time, by whichever test session or bench run asks first."""
    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    path = os.path.join(os.path.dirname(tokenizer_gguf), "rbee-wide.%s.gguf" % digest)
    if not os.path.exists(path):
        partial = "%s.%d.partial" % (path, os.getpid())
        build(partial, tokenizer_gguf)
        os.replace(partial, path)
    return path


def build(path, tokenizer_gguf, seed=22):
    """Write the model to `path`, with the tokenizer of the GGUF at `tokenizer_gguf`."""
    import gguf
    rng = numpy.random.default_rng(seed)

    def weights(*shape):   # (numpy's shape: GGUF's dimensions reversed, as llama.cpp reads them)
        return (rng.standard_normal(shape, dtype=numpy.float32) / numpy.sqrt(shape[-1])).astype(numpy.float32)

    reader = gguf.GGUFReader(tokenizer_gguf)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("rbee-wide-test-model")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_block_count(N_LAYER)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = 0
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
            if key == "tokenizer.ggml.tokens":
                vocab = len(field.data)
    writer.add_vocab_size(vocab)
    writer.add_tensor("token_embd.weight", weights(vocab, N_EMBD))
    writer.add_tensor("output_norm.weight", numpy.ones(N_EMBD, dtype=numpy.float32))
    for layer in range(N_LAYER):
        block = "blk.%d." % layer
        writer.add_tensor(block + "attn_norm.weight", numpy.ones(N_EMBD, dtype=numpy.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            writer.add_tensor(block + name + ".weight", weights(N_HEAD * HEAD_DIM, N_EMBD))
        writer.add_tensor(block + "attn_output.weight", weights(N_EMBD, N_HEAD * HEAD_DIM))
        writer.add_tensor(block + "ffn_norm.weight", numpy.ones(N_EMBD, dtype=numpy.float32))
        writer.add_tensor(block + "ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(block + "ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(block + "ffn_down.weight", weights(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
