"""Security at the client-facing edge: API keys, tenants, roles, request signing, IP rules,
rate limits and tenant quotas, and the events they raise.

The decisions are pure (``EdgeSecurity.check_call`` takes headers and a peer address and
returns a :class:`Principal` or raises :class:`Denied`), so the gRPC interceptor
(interceptor.py) and the OpenAI HTTP API apply the same rules.
"""
