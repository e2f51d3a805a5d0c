"""Byte and Hugging Face tokenizers: round trips, specials, selection by checkpoint contents."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from ultrakv.node.model.presets import preset_config
from ultrakv.node.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_round_trip_multibyte_utf8():
    tok = ByteTokenizer()
    text = "héllo wörld — 你好 🚀"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == ByteTokenizer.BOS == tok.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]


def test_byte_decode_skips_specials_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    assert tok.decode([256, *b"ok", 257, 300]) == "ok"
    assert tok.eos_token_ids == [257]
    half_rocket = list("🚀".encode())[:2]
    assert tok.decode(half_rocket) == "\ufffd"


@pytest.fixture
def hf_dir(tmp_path):
    """A checkpoint dir with a freshly trained BPE tokenizer.json and tokenizer_config.json."""
    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(["hello world", "the quick brown fox", "héllo 你好"] * 20,
                             trainer)
    # A post-processor that adds <s> by itself: encode(add_bos=False) must still not add it.
    rust.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", rust.token_to_id("<s>"))])
    rust.decoder = decoders.ByteLevel()
    rust.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return tmp_path


def test_hf_round_trip_and_specials_from_tokenizer_config(hf_dir):
    config = preset_config("tiny")
    config.bos_token_id, config.eos_token_ids = None, []
    tok = load_tokenizer(hf_dir, config)
    assert isinstance(tok, HFTokenizer)
    bos, eos = tok._tok.token_to_id("<s>"), tok._tok.token_to_id("</s>")
    assert tok.bos_token_id == bos and tok.eos_token_ids == [eos]
    text = "hello world, héllo 你好 fox"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids + [eos]) == text
    assert tok.vocab_size >= 256


def test_hf_specials_from_tokenizer_first_and_merge_generation_eos(hf_dir):
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    config = preset_config("tiny")
    config.bos_token_id, config.eos_token_ids = 5, [9]
    tok = HFTokenizer.from_directory(hf_dir, config)
    assert tok.bos_token_id == tok._tok.token_to_id("<s>")  # the tokenizer's own, not config's 5
    assert tok.eos_token_ids == [9, 7, tok._tok.token_to_id("</s>")]  # deduplicated


def test_hf_bos_only_where_the_tokenizer_adds_it(hf_dir):
    """SmolLM2's config names a BOS id but its tokenizer never adds one: add_bos_token false in
    tokenizer_config.json wins over the config, and so does a post-processor that adds nothing."""
    config = preset_config("tiny")
    config.bos_token_id = 1
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = HFTokenizer.from_directory(hf_dir, config)
    assert not tok.add_bos_token
    assert tok.encode("hello", add_bos=True) == tok.encode("hello", add_bos=False)

    data = json.loads((hf_dir / "tokenizer.json").read_text())
    data["post_processor"] = None
    (hf_dir / "tokenizer.json").write_text(json.dumps(data))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    tok = HFTokenizer.from_directory(hf_dir, config)
    assert not tok.add_bos_token and tok.encode("hello")[0] != tok.bos_token_id


def test_load_tokenizer_falls_back_to_bytes(tmp_path):
    config = preset_config("tiny")
    assert isinstance(load_tokenizer(None, config), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path, config), ByteTokenizer)
    config.vocab_size = 100
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        load_tokenizer(tmp_path, config)
