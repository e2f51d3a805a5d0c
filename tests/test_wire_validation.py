"""Edge validation as pure functions (the loopback tests cover the same cases over gRPC)."""

from __future__ import annotations

import grpc
import pytest
from ultrakv.cluster.errors import PromptTooLongError, QueueFullError, SessionNotFoundError
from ultrakv.cluster.session_keys import client_session_id, session_key, split_session_key
from ultrakv.cluster.validation import (
    Limits,
    Malformed,
    RequestRejected,
    rejection_for_client,
    rejection_from_error,
    tolerant_deserializer,
    validate_batch,
    validate_generate,
    validate_max_age,
    validate_session_id,
    validate_session_key,
)
from ultrakv.v1 import types_pb2 as pb

LIMITS = Limits(max_tokens_limit=100, default_max_length=7, max_prompt_bytes=10)


def reject(request: pb.GenerateRequest, **kw) -> RequestRejected:
    with pytest.raises(RequestRejected) as err:
        validate_generate(request, LIMITS, **kw)
    return err.value


def test_normalizes_defaults():
    out = validate_generate(pb.GenerateRequest(text="hi"), LIMITS)
    assert out.request_id and out.sampling.max_length == 7
    assert out.priority == pb.PRIORITY_NORMAL and not out.HasField("session_id")


def test_limits_are_named_in_messages():
    r = reject(pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_length=101)))
    assert (r.code, r.field, r.message) == (grpc.StatusCode.INVALID_ARGUMENT,
                                            "sampling.max_length",
                                            "max_length must be in [1, 100], got 101")
    r = reject(pb.GenerateRequest(text="x" * 11))
    assert r.code == grpc.StatusCode.RESOURCE_EXHAUSTED and r.field == "text"
    assert reject(pb.GenerateRequest(text="hi"), require_request_id=True).field == "request_id"
    assert reject(pb.GenerateRequest(text="hi", request_id="r" * 129)).field == "request_id"
    assert reject(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, -2]))).field == "token_ids"
    assert reject(pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(
        stop=[""]))).field == "sampling.stop"
    assert reject(pb.GenerateRequest(text="")).field == "text"


@pytest.mark.parametrize("sid", ["a", "user_123", "A.b:c-d_e", "x" * 128])
def test_good_session_ids(sid):
    assert validate_session_id(sid) == sid


@pytest.mark.parametrize("sid", ["", "x" * 129, "a/b", "a\\b", "a b", "é", "a\x00"])
def test_bad_session_ids(sid):
    with pytest.raises(RequestRejected) as err:
        validate_session_id(sid)
    assert err.value.field == "session_id"


def test_session_keys_are_the_tenants_own_and_cannot_alias():
    """Two tenants' equal ids are two keys; no tenant's key equals another's or any client's
    id ("~" is in neither a tenant nor an id); the open tenant's key is the id itself."""
    tenants, ids = ["", "a", "a.b", "acme"], ["s", "b~s", "acme~s", "a.b:s"]
    keys = {(t, i): session_key(t, i) for t in tenants for i in ids if "~" not in i}
    assert len(set(keys.values())) == len(keys)
    for (tenant, sid), key in keys.items():
        assert split_session_key(key) == (tenant, sid) and client_session_id(key) == sid
        assert validate_session_key(key) == key
    assert session_key("", "user_123") == "user_123"  # single-tenant ids and checkpoints
    longest = session_key("t" * 128, "s" * 128)
    assert validate_session_key(longest) == longest
    assert validate_generate(pb.GenerateRequest(text="hi", session_id=longest, tenant="t" * 128),
                             LIMITS, keyed=True).session_id == longest


@pytest.mark.parametrize("key", ["~s", "a~", "a~b~c", "a b~s", "t" * 129 + "~s", "a~" + "s" * 129])
def test_bad_session_keys(key):
    with pytest.raises(RequestRejected) as err:
        validate_session_key(key)
    assert err.value.field == "session_id"


def test_a_keyed_request_names_a_session_of_its_own_tenant():
    r = reject(pb.GenerateRequest(text="hi", session_id="acme~s", tenant="globex"), keyed=True)
    assert (r.field, r.message) == ("session_id", "session_id 'acme~s' is not a session of "
                                                  "tenant 'globex'")
    r = reject(pb.GenerateRequest(text="hi", session_id="acme~s", tenant="acme"))
    assert r.field == "session_id" and "[A-Za-z0-9._:-]" in r.message  # a client's id: no "~"
    assert reject(pb.GenerateRequest(text="hi", session_id="x" * 129)).message == (
        "session_id must be at most 128 bytes, got 129")  # the client's limit, whatever its tenant


def test_an_error_names_the_session_by_the_clients_id():
    r = rejection_for_client(SessionNotFoundError("acme~s"), "acme~s")
    assert (r.code, r.field, r.message) == (grpc.StatusCode.NOT_FOUND, "session_id",
                                            "session_id 's' not found")
    assert rejection_for_client(SessionNotFoundError("s"), "s").message == "session_id 's' not found"


def test_batch_envelope_and_max_age():
    assert validate_batch(pb.BatchRequest(), LIMITS) == 8
    with pytest.raises(RequestRejected) as err:
        validate_batch(pb.BatchRequest(requests=[pb.GenerateRequest()] * 257), LIMITS)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(RequestRejected):
        validate_max_age(float("nan"))
    assert validate_max_age(0.0) == 0.0


def test_engine_errors_map_to_statuses():
    assert rejection_from_error(QueueFullError("full", 2.5)).retry_after_s == 2.5
    assert rejection_from_error(QueueFullError("full")).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rejection_from_error(PromptTooLongError("prompt", "too long")).code == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rejection_from_error(SessionNotFoundError("s")).code == grpc.StatusCode.NOT_FOUND
    r = rejection_from_error(ValueError("top_k must be >= 0, got -1"))
    assert (r.code, r.field) == (grpc.StatusCode.INVALID_ARGUMENT, "top_k")
    back = RequestRejected.from_detail(r.to_detail())
    assert (back.code, back.field, back.message) == (r.code, r.field, r.message)


def test_tolerant_deserializer_names_the_bad_field():
    data = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id="r1", text="ok", sampling=pb.SamplingOptions(stop=["zz"]))).SerializeToString()
    parse = tolerant_deserializer(pb.GenerateStreamRequest)
    assert isinstance(parse(data), pb.GenerateStreamRequest)
    assert parse(data.replace(b"ok", b"\xff\xff")) == Malformed("text", "r1")
    assert parse(data.replace(b"zz", b"\xc3(")) == Malformed("sampling.stop", "r1")
    assert parse(b"\xff\xff\xff").field == ""


def _chat(*pairs: tuple[str, str]) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs]))


def test_chat_messages_are_validated_naming_field_and_limit():
    limits = Limits(max_prompt_bytes=10, max_chat_messages=2)
    assert validate_generate(_chat(("user", "hi")), limits).WhichOneof("prompt") == "messages"
    with pytest.raises(RequestRejected) as err:
        validate_generate(pb.GenerateRequest(messages=pb.ChatMessages()), limits)
    assert (err.value.field, err.value.message) == ("messages", "messages must hold at least one message")
    with pytest.raises(RequestRejected) as err:
        validate_generate(_chat(("user", "a"), ("assistant", "b"), ("user", "c")), limits)
    assert (err.value.code, err.value.field) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "messages")
    assert "at most 2 messages, got 3" in err.value.message
    with pytest.raises(RequestRejected) as err:
        validate_generate(_chat(("user", "0123456789x")), limits)
    assert "at most 10 bytes of content, got 11" in err.value.message
    with pytest.raises(RequestRejected) as err:
        validate_generate(_chat(("user", "a"), ("robot", "b")), limits)
    assert err.value.field == "messages[1].role"
    assert err.value.message == "messages[1].role must be one of system, user, assistant, tool, got 'robot'"
