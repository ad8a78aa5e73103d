"""Encode events for the log and decode them back, upcasting older schema versions.

One module-level decoder handles the fast path (payload at the current schema);
older payloads are decoded to plain dicts, upcast, then converted. Every failure
names the sequence number: an event is never skipped. This is the only place
stored payloads become events (:func:`decode` for one, :func:`decode_many` for a
run of rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import msgspec

from ledger.errors import CorruptLedgerError, SchemaTooNewError, UnknownEventError
from ledger.events.types import EVENT_TYPES, AnyEvent, Event, StepCompleted
from ledger.events.upcasters import upcast

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)
_dict_decoder = msgspec.json.Decoder(dict)


def encode(event: Event) -> bytes:
    """The JSON payload of an event (its tag included), as stored in the log.

    Raises ``ValueError`` for an event that would not decode back (a wrong field type,
    or a NaN/inf float, which JSON stores as ``null``): stored, it would make every
    later read of the log fail.
    """
    return encode_checked(event)[0]


def encode_checked(event: Event) -> tuple[bytes, Event]:
    """:func:`encode`, plus the event as a reader will decode it from those bytes (the check's by-product)."""
    payload = _encoder.encode(event)
    try:
        stored = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ValueError(
            f"refusing to store a {event.__struct_config__.tag} event that would not read back ({exc}); "
            "check the field types (NaN/inf floats cannot be stored)"
        ) from exc
    return payload, stored


@dataclass(frozen=True)
class StepPayloadFrame:
    """How the encoder frames a ``step.completed`` payload around its step's digits.

    ``prefix`` is everything before the digits (the tag, then the step's key) and
    ``follower`` the character right after them. The store's replay path reads the
    step of a payload framed like this straight from the stored text, without
    decoding it (a million step events are most of a long log, and the fold needs
    nothing else from them); a payload framed any other way is decoded by :func:`decode`.
    """

    tag: str
    schema_version: int
    prefix: str
    follower: str


def _step_payload_frame() -> StepPayloadFrame:
    # Derived from the encoder itself, so a change to the event's fields or their order
    # moves the frame with it instead of silently misreading payloads.
    text = _encoder.encode(StepCompleted(step=7)).decode()
    head, key, rest = text.partition('"step":7')
    if not key or not rest or rest[0] in "0123456789":
        raise RuntimeError(f"unexpected step.completed encoding {text!r}")
    return StepPayloadFrame(tag=StepCompleted.__struct_config__.tag, schema_version=StepCompleted.SCHEMA,
                            prefix=head + '"step":', follower=rest[0])


STEP_PAYLOAD_FRAME = _step_payload_frame()


def encode_many_checked(events: Sequence[Event]) -> tuple[list[bytes], list[Event]]:
    """:func:`encode_checked` for a batch: the read-back check is one ``decode_lines`` call.

    JSON escapes newlines inside strings, so newline-joined payloads hold one event per
    line. If any event would not read back, the per-event path raises naming it.
    """
    payloads = [_encoder.encode(event) for event in events]
    try:
        stored = _decoder.decode_lines(b"\n".join(payloads))
    except msgspec.ValidationError:
        stored = []
    if len(stored) != len(payloads):
        for event in events:
            encode_checked(event)  # raises the one-line error for the first bad event
        raise ValueError("events did not read back one to one after encoding")  # no known way to get here
    return payloads, stored


def schema_of(tag: str) -> int:
    """The current schema version of the event type with this tag."""
    return EVENT_TYPES[tag].SCHEMA


def decode(payload: bytes | str, *, tag: str, schema_version: int, seq: int) -> Event:
    """Decode one stored event, upcasting it if it was written by an older schema."""
    cls = EVENT_TYPES.get(tag)
    if cls is None:
        raise UnknownEventError(
            f"event seq {seq} has unknown tag {tag!r}; it was written by a newer or foreign tool — "
            "upgrade ckpt-ledger to read this ledger"
        )
    if schema_version > cls.SCHEMA:
        raise SchemaTooNewError(
            f"event seq {seq} ({tag}) has schema {schema_version}, this ckpt-ledger knows up to "
            f"{cls.SCHEMA}; upgrade ckpt-ledger to read this ledger"
        )
    try:
        if schema_version == cls.SCHEMA:
            event = _decoder.decode(payload)
        else:
            raw = upcast(tag, _dict_decoder.decode(payload), schema_version, cls.SCHEMA)
            raw["tag"] = tag
            event = msgspec.convert(raw, AnyEvent)
    except (msgspec.DecodeError, msgspec.ValidationError, LookupError) as exc:
        raise CorruptLedgerError(f"event seq {seq} ({tag}) cannot be decoded: {exc}") from exc
    if not isinstance(event, cls):
        raise CorruptLedgerError(f"event seq {seq}: stored tag {tag!r} does not match its payload")
    return event


_CURRENT_SCHEMA = {tag: cls.SCHEMA for tag, cls in EVENT_TYPES.items()}


def decode_many(seqs: Sequence[int], tags: Sequence[str], schemas: Sequence[int],
                payloads: Sequence[Any]) -> list[Event]:
    """Decode a run of stored rows, exactly as :func:`decode` per row would.

    Fast path: every row is at its type's current schema, so the run is decoded by one
    ``decode_lines`` call over the newline-joined payloads. The result is used only if
    it maps one to one onto the rows (no payload holds a newline, one event per line,
    each of its row's type); anything else — old schemas, unknown tags, corrupt rows —
    goes row by row through :func:`decode`, which upcasts or raises naming the seq.
    """
    if list(schemas) == list(map(_CURRENT_SCHEMA.get, tags)):
        try:
            text = "\n".join(payloads)
            if text.count("\n") == len(payloads) - 1:
                events = _decoder.decode_lines(text)
                if list(map(type, events)) == list(map(EVENT_TYPES.get, tags)):
                    return events
        except (TypeError, msgspec.DecodeError, msgspec.ValidationError):
            pass  # the row-by-row path below finds the bad row and names it
    return [decode(p, tag=t, schema_version=v, seq=s) for s, t, v, p in zip(seqs, tags, schemas, payloads)]
