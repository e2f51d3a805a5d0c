"""The OpenAI-compatible HTTP API: the real ``openai`` client against a node server on
loopback (what single-process ``ultrakv serve`` runs), SSE on the wire, errors, /health and
/metrics, the engine's full-context session turns, and the pure request/response mapping."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import threading
import time

import grpc
import httpx
import openai
import pytest
from engine_requests import run_to_end
from ultrakv.client import Client
from ultrakv.client.cli import _node_config, build_parser
from ultrakv.cluster.etcd_server import free_port
from ultrakv.cluster.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_request,
    completion_request,
    error_response,
    http_body_limit,
    http_status,
    openai_rejection,
    user_session_id,
)
from ultrakv.cluster.validation import Limits, RequestRejected, validate_generate
from ultrakv.node import Engine, EngineConfig, GenerateRequest, SamplingParams
from ultrakv.node.chat import ChatMessage
from ultrakv.node.server import BackgroundServer, ServerSettings

BLOCK = 8
QUESTION = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=256, block_size=BLOCK, seed=0))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5, http_port=free_port())
    srv = BackgroundServer(engine, settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server.http.port}"


@pytest.fixture(scope="module")
def oai(base_url) -> openai.OpenAI:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        yield client


# --- through the openai client ----------------------------------------------------------------


def test_models_list_and_retrieve(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model"
    assert oai.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_completion_reports_usage_and_finish_reason(oai, engine):
    prompt = "The quick brown fox jumps over the lazy dog"
    r = oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0.0,
                               extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "tiny"
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    expected = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                        ignore_eos=True))[0]
    assert r.choices[0].text == expected.text  # the same greedy tokens as the engine's own
    assert r.usage.prompt_tokens == expected.prompt_tokens
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_stateless_requests_reuse_cached_prefixes(oai):
    prompt = "A shared system prompt that is long enough to fill several KV blocks. " * 2
    oai.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0.0)
    again = oai.completions.create(model="tiny", prompt=prompt + "Next question?", max_tokens=2)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(prompt) // BLOCK * BLOCK - BLOCK  # the repeated prefix came from cache
    assert cached % BLOCK == 0 and cached < again.usage.prompt_tokens


def test_chat_completion(oai):
    r = oai.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 10


def test_streamed_chat_completion_matches_the_unstreamed_one(oai):
    args = dict(model="tiny", messages=QUESTION, max_completion_tokens=7, temperature=0.0,
                seed=3, extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**args)
    chunks = list(oai.chat.completions.create(**args, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert len({c.id for c in chunks}) == 1


def _continued_tokens(engine: Engine, held_ids: list[int], messages: list[dict]) -> int:
    """Tokens of ``messages`` rendered once, continuing a session that holds ``held_ids`` (a
    reply's bytes that are not UTF-8 come back from the client as U+FFFD, so the session's
    own tokens stand for the earlier turns)."""
    tok = engine.tokenizer
    text = tok.chat_template.render([ChatMessage(**m) for m in messages])
    held = tok.decode(held_ids, skip_special_tokens=False)
    assert text.startswith(held)
    return len(held_ids) + len(tok.encode(text[len(held):], add_bos=False))


def test_two_turn_conversation_with_session_header_reports_cached_tokens(oai, server, engine):
    session = {"x-session-id": "oai-chat-1"}
    opening = [{"role": "user", "content": "A question no other test asks: why is the sky blue?"}]
    first = oai.chat.completions.create(model="tiny", messages=opening, max_tokens=6,
                                        temperature=0.0, extra_headers=session)
    assert first.usage.prompt_tokens_details.cached_tokens <= BLOCK  # the template's opener at most
    held_ids = engine.sessions.history("oai-chat-1")
    conversation = [*opening, {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And two more?"}]
    second = oai.chat.completions.create(model="tiny", messages=conversation, max_tokens=6,
                                         temperature=0.0, extra_headers=session)
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    assert len(held_ids) == held
    assert second.usage.prompt_tokens == _continued_tokens(engine, held_ids, conversation)
    assert second.usage.prompt_tokens_details.cached_tokens >= held // BLOCK * BLOCK - BLOCK
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    # The client resent the whole conversation; the session holds it once, not appended to itself.
    with Client(server.address, timeout=30) as grpc_client:
        info = grpc_client.get_session("oai-chat-1")
    assert info["num_tokens"] == second.usage.prompt_tokens + second.usage.completion_tokens
    assert info["turns"] == 2


def test_user_field_names_the_session(oai, server, engine):
    prompt = "Tell me a story about a dragon and a knight."
    first = oai.completions.create(model="tiny", prompt=prompt, max_tokens=4, user="story-7")
    follow = prompt + first.choices[0].text + " What happened next?"
    second = oai.completions.create(model="tiny", prompt=follow, max_tokens=4, user="story-7")
    assert second.usage.prompt_tokens == len(engine.tokenizer.encode(follow, add_bos=True))
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    with Client(server.address, timeout=30) as grpc_client:
        info = grpc_client.get_session("story-7")
    assert info["num_tokens"] == second.usage.prompt_tokens + second.usage.completion_tokens


def test_a_user_value_that_is_no_session_id_names_a_session_of_its_own(oai, server):
    # OpenAI clients send any end-user string as `user` (an email): it was a 400.
    prompt = "Tell me about the sea."
    first = oai.completions.create(model="tiny", prompt=prompt, max_tokens=4, user="alice@example.com")
    follow = prompt + first.choices[0].text + " And then?"
    second = oai.completions.create(model="tiny", prompt=follow, max_tokens=4, user="alice@example.com")
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    with Client(server.address, timeout=30) as grpc_client:
        info = grpc_client.get_session(user_session_id("alice@example.com"))
        assert info["turns"] == 2
    assert user_session_id("alice@example.com") != user_session_id("bob@example.com")


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"extra_headers": {"x-session-id": "no spaces allowed"}}, "x-session-id"),
    ({"extra_body": {"logprobs": True}}, "logprobs"),
    ({"model": "gpt-4"}, "model"),
])
def test_bad_chat_requests_get_an_openai_error_naming_the_field(oai, kwargs, param):
    args = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        oai.chat.completions.create(**args)
    err = caught.value
    assert err.status_code == (404 if param == "model" else 400)
    assert err.body["param"] == param
    assert param.split("[")[0] in err.message


# --- on the wire ---------------------------------------------------------------------------------


def test_completion_stream_is_server_sent_events_ending_in_done(base_url):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"prompt": 5}, "prompt", "prompt must be a string, a list of token ids"),
    ({"prompt": ["a", "b"]}, "prompt", "batched prompts are not supported"),
    ({"prompt": [-1, 2]}, "prompt", "prompt must be >= 0"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop", "stop must hold at most 16"),
    ({}, "prompt", "prompt is required"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens", "max_tokens must be in [1, 4096]"),
    ({"prompt": "x", "max_tokens": 2**40}, "max_tokens", "max_tokens is out of range"),
    ({"prompt": "x", "seed": 2**70}, "seed", "seed is out of range"),
    ({"prompt": [2**40]}, "prompt", "prompt token ids must be 32-bit integers"),
    # JSON's \ud800 escape decodes to a lone surrogate, which has no UTF-8 form (was a 500).
    ({"prompt": "a\ud800"}, "prompt", "prompt must be valid Unicode"),
    ({"prompt": "x", "stop": ["ok", "\udcff"]}, "stop[1]", "stop[1] must be valid Unicode"),
    ({"prompt": "x", "user": "\ud800"}, "user", "user must be valid Unicode"),
    # vLLM's sampling extensions this server does not implement are refused, not ignored.
    ({"prompt": "x", "repetition_penalty": 1.1}, "repetition_penalty", "not supported"),
    ({"prompt": "x", "min_p": 0.1}, "min_p", "not supported"),
    ({"prompt": "x", "min_tokens": 200}, "min_tokens", "not supported"),
])
def test_bad_completion_bodies(base_url, body, param, fragment):
    # json.dumps escapes non-ASCII (httpx's json= would refuse to encode a lone surrogate).
    r = httpx.post(base_url + "/v1/completions", content=json.dumps(body),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"]


def test_lone_surrogate_in_a_chat_message_is_400_naming_it(base_url):
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\ud800"}],
            "max_tokens": 2}
    r = httpx.post(base_url + "/v1/chat/completions", content=json.dumps(body),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[1].content"


def test_null_for_nullable_openai_fields_is_the_default(base_url):
    # OpenAI's spec lets n, stream, stream_options.include_usage be null; vLLM takes them.
    for path, body in (("/v1/completions", {"prompt": "Hello"}),
                       ("/v1/chat/completions", {"messages": QUESTION})):
        body = {**body, "max_tokens": 2, "n": None, "stream": None, "ignore_eos": None,
                "stream_options": {"include_usage": None}, "repetition_penalty": 1.0, "min_p": 0}
        r = httpx.post(base_url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2


def test_a_body_past_the_limit_is_413_before_it_is_read(base_url):
    # Nothing bounded a body: an 800 MB one held a coordinator's event loop for 13 s.
    limit = http_body_limit(Limits())
    huge = b'{"prompt": "' + b"a" * (limit + 1) + b'", "max_tokens": 2}'
    r = httpx.post(base_url + "/v1/completions", content=huge,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and f"at most {limit} bytes" in r.json()["error"]["message"]

    def chunks():  # no content-length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(limit // (1 << 20) + 1):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(base_url + "/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    # The largest prompt the limits allow, escaped as JSON writes non-ASCII, still fits.
    text = "\u00e9" * (Limits().max_prompt_bytes // 2)
    r = httpx.post(base_url + "/v1/completions", content=json.dumps({"prompt": text, "max_tokens": 1}),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text  # too long for tiny


def test_not_json_and_unknown_routes_are_openai_errors(base_url):
    r = httpx.post(base_url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == "request body must be valid JSON"
    r = httpx.get(base_url + "/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = httpx.get(base_url + "/v1/chat/completions", timeout=30)  # was type server_error
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"] == "GET is not allowed on /v1/chat/completions"
    # `curl -d` sends a form content type: the body was called "not a JSON object".
    r = httpx.post(base_url + "/v1/completions", content=b'{"prompt": "hi"}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 400 and "content-type: application/json" in r.json()["error"]["message"]


def test_too_long_prompt_is_400_before_the_stream_starts(base_url, engine):
    body = {"prompt": list(range(1, 10)) * (engine.max_model_len // 9 + 1), "max_tokens": 2,
            "stream": True}
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def _aborted(engine: Engine) -> int:
    return engine.stats()["requests"]["finished"].get("abort", 0)


def _wait_aborted(engine: Engine, count: int) -> None:
    deadline = time.monotonic() + 30
    while _aborted(engine) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted(engine) == count
    assert engine.stats()["requests"]["running"] == 0


def test_client_leaving_a_stream_aborts_its_request(base_url, engine):
    before = _aborted(engine)
    body = {"prompt": "Go on and on", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    _wait_aborted(engine, before + 1)


def test_client_leaving_before_the_answer_aborts_its_request(base_url, engine):
    before = _aborted(engine)
    body = {"prompt": "Go on and on", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/completions", json=body, timeout=0.3)
    _wait_aborted(engine, before + 1)


def test_a_second_turn_while_the_first_runs_is_429_naming_the_session(base_url, server, engine):
    # Turns of one session go one at a time; a second sent while the first streams is told
    # to wait (429 with retry-after on session_id over HTTP, RESOURCE_EXHAUSTED with a retry
    # hint over gRPC), not given a 500, and the first turn goes on undisturbed.
    session = {"x-session-id": "busy-1"}
    body = {"prompt": "Go on and on", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, headers=session, timeout=60) as first:
        lines = first.iter_lines()
        assert next(lines).startswith("data: ")  # the first turn is running
        r = httpx.post(base_url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2},
                       headers=session, timeout=30)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["param"] == "x-session-id" and "busy-1" in error["message"]  # as the client named it
        assert "already has a turn in progress" in error["message"]
        with Client(server.address, timeout=30) as grpc_client:
            result = grpc_client.process_request({"text": "Hi", "session_id": "busy-1", "max_length": 2})
        assert result["error_code"] == "RESOURCE_EXHAUSTED" and result["error_field"] == "session_id"
        assert result["retry_after_s"] >= 1.0
        events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]


def test_stopping_ends_running_generations_with_an_error_not_a_cut():
    # A server stopped with generations running cut its SSE streams off with no error event
    # and no [DONE], and answered a whole-body request with a plain-text 500. Near the end of
    # the grace period they now end with an UNAVAILABLE error (503, retry-after).
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=600, block_size=BLOCK, seed=0))
    # A 2 s grace: both generations (2300 tokens each, seconds of work) still run when it ends,
    # and the 0.4 s before uvicorn cancels what is left is ample for the error to go out.
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=2.0, http_port=free_port())
    srv = BackgroundServer(eng, settings).start()
    try:
        url = f"http://127.0.0.1:{srv.server.http.port}/v1/completions"
        body = {"prompt": "Go on and on", "max_tokens": 2300, "ignore_eos": True}
        answers: dict[str, httpx.Response] = {}
        whole = threading.Thread(target=lambda: answers.setdefault("whole", httpx.post(url, json=body, timeout=60)))
        whole.start()
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            deadline = time.monotonic() + 60
            while eng.stats()["requests"]["running"] < 2:  # both generating
                assert time.monotonic() < deadline
                time.sleep(0.02)
            stopper = threading.Thread(target=srv.stop)
            stopper.start()
            events = [line for line in lines if line]
        whole.join(60)
        stopper.join(60)
    finally:
        eng.shutdown()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "shutting down" in error["message"] and error["type"] == "service_unavailable"
    answer = answers["whole"]
    assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
    assert answer.headers["retry-after"] == "1"


def test_health_and_metrics_on_the_http_port(base_url, oai):
    r = httpx.get(base_url + "/health", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "models": ["tiny"]}
    assert httpx.get(base_url + "/health/live", timeout=30).status_code == 200
    oai.models.list()
    text = httpx.get(base_url + "/metrics", timeout=30).text
    assert 'ultrakv_http_requests_total{endpoint="/v1/models",status="200"}' in text
    assert "ultrakv_kv_cache_blocks{" in text  # the node's own registry


def test_http_port_in_use_is_refused_naming_it(engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = BackgroundServer(engine, ServerSettings(host="127.0.0.1", port=0, http_port=port,
                                                      grace_period_s=0.2))
        with pytest.raises(OSError, match=f"port {port} is already in use"):
            srv.start()
        srv.stop()


# --- the engine: full-context session turns ----------------------------------------------------


def test_full_context_turn_holds_the_prompt_once(engine):
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompt = "Once upon a time there was a small engine that cached everything."
    first = engine.generate([prompt], params, session_ids=["fc-1"])[0]
    follow = prompt + first.text + " The end?"
    req = GenerateRequest(prompt=follow, sampling=params, session_id="fc-1", full_context=True)
    second = run_to_end(engine, req)
    whole = engine.tokenizer.encode(follow, add_bos=True)
    assert second.prompt_token_ids == whole
    held = first.prompt_tokens + first.completion_tokens
    assert second.cached_tokens == held // BLOCK * BLOCK
    assert engine.sessions.history("fc-1") == whole + second.token_ids


def test_full_context_chat_equals_appending_the_new_messages(engine):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = engine.generate(QUESTION, params, session_ids=["fc-chat-a"])[0]
    engine.generate(QUESTION, params, session_ids=["fc-chat-b"])
    follow = [{"role": "user", "content": "More?"}]
    appended = engine.generate(follow, params, session_ids=["fc-chat-a"])[0]
    whole = [*QUESTION, {"role": "assistant", "content": first.text}, *follow]
    req = GenerateRequest(prompt=whole, sampling=params, session_id="fc-chat-b", full_context=True)
    resent = run_to_end(engine, req)
    assert resent.prompt_token_ids == appended.prompt_token_ids
    assert resent.cached_tokens >= (first.prompt_tokens + first.completion_tokens) // BLOCK * BLOCK
    assert engine.sessions.history("fc-chat-b") == engine.sessions.history("fc-chat-a")


# --- pure mapping ---------------------------------------------------------------------------------


def test_completion_body_becomes_the_grpc_request():
    body = CompletionRequest(prompt="hi", max_tokens=7, temperature=0.5, top_p=0.9, seed=11,
                             stop="\n")
    wire = completion_request(body, "s-1")
    assert wire.text == "hi" and wire.session_id == "s-1" and wire.full_context
    s = wire.sampling
    assert (s.max_length, s.temperature, s.top_p, s.seed, list(s.stop)) == (7, 0.5, 0.9, 11, ["\n"])
    stateless = completion_request(CompletionRequest(prompt=[[1, 2, 3]]), None)
    assert list(stateless.token_ids.ids) == [1, 2, 3] and not stateless.HasField("session_id")
    assert not stateless.sampling.HasField("max_length")  # the server default applies


def test_chat_body_becomes_a_messages_prompt():
    body = ChatCompletionRequest(messages=[
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    wire = chat_request(body, None)
    assert [(m.role, m.content) for m in wire.messages.messages] == [
        ("system", "Be kind."), ("user", "Hi there")]
    image = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(RequestRejected, match=r"messages\[0\].content\[0\].type must be text"):
        chat_request(image, None)


def test_rejections_map_to_http_statuses():
    E = grpc.StatusCode
    assert http_status(RequestRejected(E.INVALID_ARGUMENT, "x", "m")) == 400
    assert http_status(RequestRejected(E.UNAUTHENTICATED, "", "m")) == 401
    assert http_status(RequestRejected(E.PERMISSION_DENIED, "", "m")) == 403
    assert http_status(RequestRejected(E.NOT_FOUND, "session_id", "m")) == 404
    assert http_status(RequestRejected(E.RESOURCE_EXHAUSTED, "", "queue full", 1.0)) == 429
    assert http_status(RequestRejected(E.RESOURCE_EXHAUSTED, "text", "too long")) == 400
    assert http_status(RequestRejected(E.UNAVAILABLE, "", "m")) == 503
    assert http_status(RequestRejected(E.INTERNAL, "", "m")) == 500
    busy = error_response(RequestRejected(E.RESOURCE_EXHAUSTED, "", "slow down", 2.4))
    assert busy.status_code == 429 and busy.headers["retry-after"] == "2"


def test_wire_field_names_become_openai_names():
    body = CompletionRequest(prompt="hi", max_tokens=0)
    with pytest.raises(RequestRejected) as caught:
        validate_generate(completion_request(body, None), Limits())
    named = openai_rejection(caught.value)
    assert named.field == "max_tokens" and named.message.startswith("max_tokens must be in [1, ")
    user = openai_rejection(RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "session_id",
                                            "session_id must be ..."), "user")
    assert user.field == "user" and user.message == "user must be ..."


def test_cli_http_port_defaults():
    def server_settings(*argv: str):
        args = build_parser().parse_args(list(argv))
        return _node_config(args, default_device="cpu", default_http_port=8000).server

    assert server_settings("serve").http_port == 8000
    assert server_settings("serve", "--http-port", "0").http_port == 0
    assert build_parser().parse_args(["node"]).http_port is None  # nodes: off unless asked
    assert build_parser().parse_args(["coordinator", "--etcd", "x:1"]).http_port == 8000


# --- a coordinator in front of a node -------------------------------------------------------------


async def test_coordinator_without_nodes_is_alive_but_not_ready(etcd):
    from ultrakv.coordinator.server import CoordinatorServer, CoordinatorSettings

    settings = CoordinatorSettings(etcd=etcd.endpoint, prefix=f"/oai-{free_port()}/",
                                   host="127.0.0.1", port=0, http_port=free_port(),
                                   grace_period_s=0.2)
    server = CoordinatorServer(settings)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}",
                                     timeout=30) as http:
            health = await http.get("/health")
            assert health.status_code == 503 and "routing ring is empty" in health.json()["reason"]
            assert (await http.get("/health/live")).status_code == 200
            assert (await http.get("/v1/models")).json()["data"] == []
            r = await http.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        # `serve --detach --nodes N` reported serving here, before a node was on the ring.
        from ultrakv.client.cli import serves_as_started

        with Client(server.address, timeout=10) as grpc_client:
            assert (await asyncio.to_thread(grpc_client.health))["healthy"]  # alive
            # ... and not ready over gRPC either (the chart's probe with the HTTP port off
            # passed here: the client service reported SERVING on an empty ring).
            ready = await asyncio.to_thread(grpc_client.health, "ultrakv.v1.UltraKV")
            assert ready["status"] == "NOT_SERVING"
        assert not await asyncio.to_thread(serves_as_started, server.address, os.getpid())
    finally:
        await server.stop()


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_openai_client_through_a_coordinator(tmp_path):
    from ultrakv.client.local_cluster import ClusterSpec, LocalCluster

    node_http = free_port()
    spec = ClusterSpec(nodes=1, coordinators=1, data_dir=tmp_path, port=0, device="cpu", num_blocks=512,
                       http_port=free_port(), node_args=["--http-port", str(node_http)],
                       log_dir=tmp_path / "logs")
    with LocalCluster(spec) as cluster:
        base = f"http://127.0.0.1:{spec.http_port}"
        deadline = time.monotonic() + 60
        while httpx.get(base + "/health", timeout=10).status_code != 200:  # the ring has the node
            assert time.monotonic() < deadline, "coordinator /health never became ready"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{node_http}/health", timeout=10).json()["models"] == ["tiny"]
        with openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                           timeout=60) as oai:
            assert [m.id for m in oai.models.list().data] == ["tiny"]
            session = {"x-session-id": "via-coordinator"}
            first = oai.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5,
                                                extra_headers=session)
            conversation = [*QUESTION, {"role": "assistant",
                                        "content": first.choices[0].message.content},
                            {"role": "user", "content": "Why those?"}]
            stream = oai.chat.completions.create(model="tiny", messages=conversation,
                                                 max_tokens=5, extra_headers=session, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
            chunks = list(stream)
            usage = chunks[-1].usage
            assert usage.completion_tokens == 5
            held = first.usage.prompt_tokens + first.usage.completion_tokens
            assert usage.prompt_tokens_details.cached_tokens >= held - 2 * 16  # the node's blocks
            with pytest.raises(openai.BadRequestError) as caught:
                oai.completions.create(model="tiny", prompt="x", max_tokens=-3)
            assert caught.value.body["param"] == "max_tokens"
        with Client(cluster.address, timeout=30) as grpc_client:
            info = grpc_client.get_session("via-coordinator")
        assert info["num_tokens"] == usage.prompt_tokens + usage.completion_tokens


def test_coordinator_routes_sessionless_chats_by_their_first_message():
    from ultrakv.cluster.ring import HashRing
    from ultrakv.coordinator.server import ClusterBackend, CoordinatorSettings
    from ultrakv.v1 import types_pb2 as pb

    backend = ClusterBackend(CoordinatorSettings(etcd="127.0.0.1:2379"))
    backend.ring = HashRing(("n1", "n2", "n3", "n4"))

    def chat(*contents: str) -> pb.GenerateRequest:
        req = pb.GenerateRequest()
        for role, content in zip(("system", "user", "assistant"), contents, strict=False):
            req.messages.messages.add(role=role, content=content)
        return req

    def route(request: pb.GenerateRequest) -> str:  # nothing cached: the first-block choice
        return asyncio.run(backend.route(request))

    # One system prompt, different questions: one node, where the prefix is cached.
    assert len({route(chat("You are a pirate.", q)) for q in ("a", "b", "c")}) == 1
    # Different system prompts spread over the ring instead of all hashing alike.
    assert len({route(chat(f"System prompt number {i}.", "q")) for i in range(24)}) > 1


# --- through the edge: keys, tenants, slots, TLS ------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    from ultrakv.cluster.security import keys as keyfile

    path = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    out = {name: keyfile.create_key(path, tenant, "user")[0]
           for name, tenant in (("acme", "acme"), ("globex", "globex"))}
    out["path"] = str(path)
    return out


def _edge_server(engine, **security):
    from ultrakv.cluster.security.settings import SecuritySettings

    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.2, http_port=free_port(),
                              security=SecuritySettings(**security))
    return BackgroundServer(engine, settings)


def _openai(srv, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server.http.port}/v1", api_key=key,
                         max_retries=0, timeout=60)


def test_http_sessions_stay_with_the_tenant_of_the_key(engine, keys):
    with _edge_server(engine, keys_file=keys["path"]) as srv:
        r = httpx.get(f"http://127.0.0.1:{srv.server.http.port}/v1/models", timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        with _openai(srv, keys["acme"]) as acme, _openai(srv, keys["globex"]) as globex:
            session = {"x-session-id": "team-chat"}
            acme.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2,
                                         extra_headers=session)
            # globex's session of that id is its own: not acme's, and no sign acme has one.
            other = globex.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2,
                                                   extra_headers=session)
            details = other.usage.prompt_tokens_details
            assert details is None or not details.cached_tokens
        # The tenant came from the key, and each tenant's id is a session of its own.
        assert engine.sessions.get("acme~team-chat").salt == "acme"
        assert engine.sessions.get("globex~team-chat").salt == "globex"


def test_http_requests_give_their_tenant_slot_back(engine, keys):
    with _edge_server(engine, keys_file=keys["path"], tenant_max_running=1,
                      tenant_max_queued=0) as srv:
        base = f"http://127.0.0.1:{srv.server.http.port}"
        auth = {"authorization": f"Bearer {keys['acme']}"}
        with _openai(srv, keys["acme"]) as acme:
            for _ in range(2):  # answered, streamed to the end, refused by the engine
                acme.completions.create(model="tiny", prompt="hi", max_tokens=2)
                list(acme.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True))
                with pytest.raises(openai.BadRequestError):
                    acme.completions.create(model="tiny", prompt=[5] * 4000, max_tokens=2,
                                            stream=True)
            body = {"prompt": "hi", "max_tokens": 1000, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, headers=auth,
                              timeout=60) as r:  # and a stream left early
                next(r.iter_lines())
            deadline = time.monotonic() + 30
            while srv.server.security.slots._running and time.monotonic() < deadline:
                time.sleep(0.05)
            # One slot and no queue: had any of those kept it, this would be refused.
            assert acme.completions.create(model="tiny", prompt="hi", max_tokens=2).usage


def test_http_port_speaks_mutual_tls_when_the_client_port_does(engine, keys, tmp_path):
    from certs import make_pki  # tests/certs.py

    pki = make_pki(tmp_path)
    with _edge_server(engine, keys_file=keys["path"], tls_cert=pki.server_cert,
                      tls_key=pki.server_key, tls_client_ca=pki.ca_cert) as srv:
        url = f"https://127.0.0.1:{srv.server.http.port}/v1/models"
        auth = {"authorization": f"Bearer {keys['acme']}"}
        with_cert = ssl.create_default_context(cafile=pki.ca_cert)
        with_cert.load_cert_chain(pki.client_cert, pki.client_key)
        r = httpx.get(url, headers=auth, verify=with_cert, timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
        with pytest.raises(httpx.HTTPError):  # no client certificate
            httpx.get(url, headers=auth, verify=ssl.create_default_context(cafile=pki.ca_cert),
                      timeout=10)
        with pytest.raises(httpx.HTTPError):  # no plain-text HTTP beside it
            httpx.get(url.replace("https", "http"), headers=auth, timeout=10)
