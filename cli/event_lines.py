"""How one stored event prints in ``replay`` and ``tail``: a human line or a JSON object."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import msgspec

from ledger import StoredEvent


def event_fields(stored: StoredEvent) -> dict[str, Any]:
    """An event's own fields as plain data (without its tag)."""
    fields = msgspec.to_builtins(stored.event)
    fields.pop("tag", None)
    return fields


def event_to_json(stored: StoredEvent) -> dict[str, Any]:
    """One line of ``replay --json``: the envelope, then the event's fields."""
    return {
        "seq": stored.seq,
        "tag": stored.tag,
        "epoch": stored.epoch,
        "event_id": stored.event_id,
        "recorded_at": stored.recorded_at,
        "schema_version": stored.schema_version,
        **event_fields(stored),
    }


def event_to_line(stored: StoredEvent) -> str:
    """One line of human ``replay``/``tail`` output."""
    when = datetime.fromtimestamp(stored.recorded_at, tz=timezone.utc).strftime("%H:%M:%S")
    fields = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in event_fields(stored).items())
    return f"{stored.seq:>7}  {when}  e{stored.epoch:<3} {stored.tag:<30} {fields}"


def format_event(stored: StoredEvent, as_json: bool) -> str:
    """One output line of ``replay``/``tail``, human or JSON."""
    return json.dumps(event_to_json(stored)) if as_json else event_to_line(stored)
