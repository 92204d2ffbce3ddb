"""The spec memo's fingerprint: what a remembered key (or environment) is valid for.

A short-lived CLI process cannot amortise imports, so a spec file it has seen before is answered
from a memo keyed by this fingerprint instead of being parsed again. Imports only xxhash: the CLI's
fast lane imports this module.
"""

from __future__ import annotations

__all__ = ["spec_fingerprint"]

_MEMO_VERSION = b"dockyard-spec-memo/1\0"


def spec_fingerprint(spec: bytes, engine_url: str) -> str:
    """What a memoised key is valid for: the spec file's bytes, seen by one engine."""
    from xxhash import xxh3_128_hexdigest

    return xxh3_128_hexdigest(_MEMO_VERSION + engine_url.encode() + b"\0" + spec)
