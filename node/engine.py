"""The node engine: model + paged KV cache + sessions + continuous batching.

PUBLIC SURFACE (implementation in progress; signatures are the contract):

    engine = Engine(EngineConfig(model="tiny", device="cpu"))
    outs = engine.generate([[1, 2, 3], "Hello"], SamplingParams(max_tokens=16, temperature=0.0))
    outs[0].token_ids, outs[0].text, outs[0].cached_tokens, outs[0].finish_reason

    # asyncio streaming, for servers (a background thread drives the step loop):
    async for delta in engine.stream(GenerateRequest(prompt="Hi", session_id="s1")):
        delta.token_ids, delta.text, delta.finished, delta.output   # output on the last delta
    engine.abort(request_id)              # frees that sequence's blocks at once

    engine.tokenizer.encode(text) / .decode(ids);  engine.max_model_len; engine.model_name
    engine.validate(request) -> None      # raises InvalidRequestError / PromptTooLongError
    engine.stats() -> dict                # requests, tokens, cache (hits, misses, hit_tokens,
                                          # evictions, blocks_used, blocks_free, policy), sessions, queue
    engine.get_session(id) -> SessionInfo # SessionNotFoundError if unknown
    engine.list_sessions() -> list[SessionInfo]
    engine.delete_session(id) -> None
    engine.cleanup_sessions(max_age_s) -> int   # sessions removed
    engine.clear_cache() -> int                 # cached blocks dropped
    engine.export_session(id) -> SessionState   # history + KV of its full blocks
    engine.import_session(state) -> None
    engine.shutdown()
"""
