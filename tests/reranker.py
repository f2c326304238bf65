"""A tiny reranker GGUF for the tests (no reranker is in the registries here): llama.cpp's BERT
(LLM_ARCH_BERT) with a classification head as convert_hf_to_gguf.py writes a cross-encoder's
(bge-reranker: `cls`, a dense layer then tanh, and `cls.output`, one score), rank pooling, a
WordPiece vocabulary of a few hundred pieces, and random f32 weights from a fixed seed. Its
scores mean nothing, but they differ between documents and are the same on every run: enough
to check shapes, sorting, top_n and that rbee's scores are llama.cpp's own.

Its vocabulary has no EOS, but asks for BOS, EOS and SEP around a pair, as bge-reranker-v2-m3's
does: llama.cpp's server then formats a pair `[CLS] query [SEP] [SEP] document [SEP]` (SEP
standing in for the missing EOS), the shape bge-reranker's `<s> query </s></s> document </s>` has."""
import numpy

N_EMBD, N_HEAD, N_LAYER, N_FF, N_CTX = 64, 2, 2, 128, 512
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]     # (ids 0..4)
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))
WORDS = """the a an and or of to in on at by for with from as is are was were be been it its this that
these those there here what which who when where why how not no yes can will would should could may
i you he she we they me him her us them my your our their cat cats dog dogs sat mat bird fish house
car road city paris france london england capital country river sea mountain weather rain snow sun
spring summer winter bread recipe flour water salt yeast bake oven panda bear china animal forest
tree leaf green red blue black white small big long short old new good bad fast slow hot cold day
night time year week people man woman child book page word text query document search find rank
score model data code python function return add number list value test run make made eat food
apple orange music song play game team ball win lose school learn study read write computer
machine language english french giant species endemic called simply recipe""".split()
PIECES = ["s", "es", "ed", "ing", "er", "ly", "ion", "al", "y"]   # WordPiece continuations (##s, ...)
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()+=")


def vocabulary():
    """The token texts and types, in id order: word starts with llama.cpp's phantom space (as
    convert_hf_to_gguf.py writes a WordPiece vocabulary), continuations without it."""
    import gguf
    starts = list(dict.fromkeys(WORDS + CHARACTERS))
    texts = SPECIALS + ["\u2581" + w for w in starts] + PIECES + [c for c in CHARACTERS if c not in PIECES]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(texts) - len(SPECIALS))
    types[UNK] = gguf.TokenType.UNKNOWN
    return texts, types


def build(path, rerank_template=None, seed=20):
    """Write the reranker to `path` (with `tokenizer.chat_template.rerank` = `rerank_template`)."""
    import gguf
    rng = numpy.random.default_rng(seed)
    texts, types = vocabulary()

    def weights(*shape, scale=0.3):   # (numpy's shape: GGUF's dimensions reversed, as llama.cpp reads them)
        return (rng.standard_normal(shape) * scale).astype(numpy.float32)

    def norm(name):
        writer.add_tensor(name + ".weight", (1 + weights(N_EMBD, scale=0.1)))
        writer.add_tensor(name + ".bias", weights(N_EMBD, scale=0.1))

    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name("rbee-tiny-reranker")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_block_count(N_LAYER)
    writer.add_head_count(N_HEAD)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(texts)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    writer.add_bos_token_id(CLS)
    writer.add_sep_token_id(SEP)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    writer.add_mask_token_id(MASK)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(True)
    if rerank_template is not None:
        writer.add_chat_template([{"name": "rerank", "template": rerank_template}])
    writer.add_tensor("token_embd.weight", weights(len(texts), N_EMBD))
    writer.add_tensor("token_types.weight", weights(2, N_EMBD))
    writer.add_tensor("position_embd.weight", weights(N_CTX, N_EMBD))
    norm("token_embd_norm")
    for layer in range(N_LAYER):
        block = "blk.%d." % layer
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(block + part + ".weight", weights(N_EMBD, N_EMBD))
            writer.add_tensor(block + part + ".bias", weights(N_EMBD, scale=0.1))
        norm(block + "attn_output_norm")
        writer.add_tensor(block + "ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(block + "ffn_up.bias", weights(N_FF, scale=0.1))
        writer.add_tensor(block + "ffn_down.weight", weights(N_EMBD, N_FF))
        writer.add_tensor(block + "ffn_down.bias", weights(N_EMBD, scale=0.1))
        norm(block + "layer_output_norm")
    writer.add_tensor("cls.weight", weights(N_EMBD, N_EMBD))     # the head's dense layer (then tanh)
    writer.add_tensor("cls.bias", weights(N_EMBD, scale=0.1))
    writer.add_tensor("cls.output.weight", weights(1, N_EMBD, scale=1.0))   # one score
    writer.add_tensor("cls.output.bias", weights(1, scale=0.1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
