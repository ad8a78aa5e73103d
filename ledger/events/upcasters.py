"""Bring events stored under an older schema version up to the current one.

An upcaster is a small plain function from the stored payload (a dict, at version
``v``) to the payload at version ``v + 1``. They chain: a v1 payload of a type now
at v3 goes through the v1 and v2 upcasters in order. Types never change; new
fields get defaults, so most upcasts only fill in what older writers did not know.
"""

from __future__ import annotations

from typing import Any, Callable

Payload = dict[str, Any]

_UPCASTERS: dict[tuple[str, int], Callable[[Payload], Payload]] = {}


def upcaster(tag: str, from_version: int) -> Callable[[Callable[[Payload], Payload]], Callable[[Payload], Payload]]:
    """Register ``fn`` as the upcast of ``tag`` from ``from_version`` to ``from_version + 1``."""

    def register(fn: Callable[[Payload], Payload]) -> Callable[[Payload], Payload]:
        _UPCASTERS[(tag, from_version)] = fn
        return fn

    return register


def upcast(tag: str, payload: Payload, stored_version: int, current_version: int) -> Payload:
    """Apply every upcaster from ``stored_version`` up to ``current_version``."""
    for version in range(stored_version, current_version):
        step = _UPCASTERS.get((tag, version))
        if step is None:
            raise LookupError(f"no upcaster for {tag} from schema {version} to {version + 1}")
        payload = step(payload)
    return payload


@upcaster("shard.written", 1)
def _shard_written_v1_to_v2(payload: Payload) -> Payload:
    # Schema 1 writers stored every shard raw; v2 records the codec explicitly.
    # A v1 hash may also lack its algorithm prefix: v1 only ever used blake2b.
    upgraded = dict(payload)
    upgraded.setdefault("codec", "none")
    digest = upgraded.get("hash", "")
    if digest and ":" not in digest:
        upgraded["hash"] = f"blake2b:{digest}"
    return upgraded
