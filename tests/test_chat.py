"""Chat prompts: messages rendered by the chat template, in the engine, on the wire and in
sessions (a session's next turn prefills only the template's new tokens)."""

from __future__ import annotations

import pytest
from engine_requests import run_to_end
from ultrakv.client import Client
from ultrakv.node import Engine, EngineConfig, GenerateRequest, SamplingParams
from ultrakv.node.chat import ChatMessage, ChatTemplate
from ultrakv.node.server import BackgroundServer, ServerSettings

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=128, block_size=8))
    yield eng
    eng.shutdown()


def test_messages_prompt_is_rendered_by_the_template(engine):
    out = engine.generate(QUESTION, GREEDY)[0]
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt_token_ids == engine.tokenizer.encode(text, add_bos=False)
    assert out.completion_tokens == 4
    # ChatMessage objects and dicts are the same prompt.
    again = engine.generate([[ChatMessage(**m) for m in QUESTION]], GREEDY)[0]
    assert again.token_ids == out.token_ids


def test_session_turn_sends_only_new_messages_and_prefills_only_the_delta(engine):
    first = engine.generate(QUESTION, GREEDY, session_ids=["chat-1"])[0]
    history = first.prompt_token_ids + first.token_ids
    follow_up = [{"role": "user", "content": "And 3+3?"}]
    second = engine.generate(follow_up, GREEDY, session_ids=["chat-1"])[0]
    assert second.prompt_token_ids[: len(history)] == history
    whole = [*QUESTION, {"role": "assistant", "content": first.text}, *follow_up]
    rendered = engine.tokenizer.chat_template.render([ChatMessage(**m) for m in whole])
    held = engine.tokenizer.decode(history, skip_special_tokens=False)
    assert rendered.startswith(held)
    assert second.prompt_token_ids[len(history):] == engine.tokenizer.encode(rendered[len(held):], add_bos=False)
    bs = engine.config.block_size
    assert second.cached_tokens == len(history) // bs * bs  # only the new tokens were computed
    assert engine.sessions.get("chat-1").messages[-1] == ChatMessage("assistant", second.text)


def test_bad_messages_are_invalid_requests(engine):
    from ultrakv.cluster.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"messages\[0\].role must be one of"):
        engine.validate(GenerateRequest(prompt=[{"role": "robot", "content": "hi"}]))
    refusing = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="refused by the chat template: roles must alternate"):
        refusing.render([ChatMessage("user", "hi")])


def test_client_dict_api_sends_messages(engine):
    server = BackgroundServer(engine, ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.2)).start()
    try:
        with Client(server.address, timeout=30) as c:
            r = c.process_request({"messages": QUESTION, "max_length": 4, "temperature": 0.0})
            assert r["success"], r
            assert r["response"]["token_ids"] == engine.generate(QUESTION, GREEDY)[0].token_ids
            bad = c.process_request({"messages": [{"role": "robot", "content": "x"}], "max_length": 4})
            assert not bad["success"] and "messages[0].role" in bad["error"]
    finally:
        server.stop()


def test_a_resumed_chat_turn_keeps_the_whole_reply(engine):
    """A turn whose node died mid-stream is resumed elsewhere with the tokens already sent
    (``resume_token_ids``). The session kept only the resumed attempt's text as the
    assistant's reply, so the reply's start (which the client had) was lost and the next turn
    rendered a shorter conversation than its history."""
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    whole = run_to_end(engine, GenerateRequest(prompt=QUESTION, sampling=sampling, session_id="unbroken"))
    sent = whole.token_ids[:5]  # what the first attempt streamed before its node died
    rest = SamplingParams(max_tokens=12 - len(sent), temperature=0.0, ignore_eos=True)
    resumed = run_to_end(engine, GenerateRequest(prompt=QUESTION, sampling=rest, session_id="resumed",
                                           resume_token_ids=sent))
    assert sent + resumed.token_ids == whole.token_ids
    kept = engine.sessions.get("resumed")
    assert kept.token_ids == engine.sessions.get("unbroken").token_ids
    assert kept.messages[-1] == ChatMessage("assistant", whole.text)
    assert kept.messages == engine.sessions.get("unbroken").messages
