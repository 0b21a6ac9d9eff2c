"""A request body (decompressed) → its JSON document and the write key it carries, before any event in it
is looked at.

The HTTP API reads a body whose write key is in the body (Segment's alternative to Basic auth) in two
steps: `decode_body(body, exact=False)` finds the key, the caller authenticates it, and only then are the
events converted and validated (`segment.parse_decoded`). A body sent with a wrong key so costs the
collector a gunzip and one orjson decode (C speed, a few milliseconds for the largest body the limit
allows), never the validation of up to 2,500 events.

An unpaired surrogate escape (`"\\ud83d"`, half of an emoji: what Python's json.dumps and JavaScript's
JSON.stringify write for a string cut in the middle of one) is valid JSON but not a character; orjson
refuses the whole body for it. Such a body is decoded again by the standard library and each unpaired
surrogate, in values and keys, becomes U+FFFD, as Segment's own API stores it: one broken character does
not cost a batch. That decode is many times slower than orjson, and so is the exact re-decode of a body with
an integer too long for 64 bits: neither is done for a body read only for its key (`exact=False`). There
every surrogate escape is blanked to U+FFFD in the bytes (same length, so orjson's error positions still
hold) and long integers are left rounded; `DecodedBody.exact` says so, and `parse_decoded` decodes such a
body again, exactly, once its key is known to be good.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import orjson

from cdp_collector.domain.errors import Code, RequestRejected, json_type
from cdp_collector.domain.limits import DEFAULT_LIMITS, Limits, check_request_bytes

# An integer literal of 19+ digits may not fit 64 bits, and orjson hands those over as (rounded) floats.
# Spotting one: map digits to "0" and the bytes that can precede a JSON value to ":", drop whitespace and
# minus signs, then look for ":" + 19 zeros. A C-speed pass over the body; a regex took ten times longer.
_DIGITS_AFTER_SEPARATORS = bytes.maketrans(b"0123456789:,[", b"0000000000:::")
_DROPPED = b" \t\r\n-"
_LONG_INTEGER = b":" + b"0" * 19
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass(frozen=True, slots=True)
class DecodedBody:
    """A request body's JSON object. `exact` is False when it was read for its write key only: unpaired
    surrogates blanked or integers beyond 64 bits rounded (decode `body` again before using the events)."""

    body: bytes
    document: dict
    write_key: str | None
    exact: bool = True


def decode_body(body: bytes, limits: Limits = DEFAULT_LIMITS, *, exact: bool = True) -> DecodedBody:
    """The JSON object in `body` and the write key it carries (`writeKey`/`write_key`, None when absent or
    not a string). Raises RequestRejected: request_too_large, invalid_json, nesting_too_deep, and
    invalid_type when the body is not a JSON object. See the module docstring for `exact`."""
    problem = check_request_bytes(len(body), limits)
    if problem is not None:
        raise RequestRejected.of(problem)
    document, is_exact = _decode(body, exact)
    if type(document) is not dict:
        raise RequestRejected(
            Code.INVALID_TYPE,
            "",
            f"the request body must be a JSON object ({{...}}); got {json_type(document)}",
        )
    write_key = document.get("writeKey", document.get("write_key"))
    return DecodedBody(body, document, write_key if type(write_key) is str else None, is_exact)


def _decode(body: bytes, exact: bool) -> tuple[object, bool]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not exc.msg.endswith("surrogate in string"):  # an escape; raw bytes not UTF-8 say so instead
            raise _refused(exc) from None
        if exact:
            return _decode_with_unpaired_surrogates(body), True
        try:
            return orjson.loads(_SURROGATE_ESCAPE.sub(rb"\\ufffd", body)), False
        except orjson.JSONDecodeError as again:
            raise _refused(again) from None
    if _LONG_INTEGER in body.translate(_DIGITS_AFTER_SEPARATORS, _DROPPED):
        if not exact:
            return document, False
        # Rare: decode again with the standard library, which keeps big integers exact, so they are
        # refused by name instead of silently rounded. orjson has vouched for the syntax already.
        try:
            document = json.loads(body)
        except RecursionError:
            pass  # deep enough that the nesting limit refuses it anyway
    return document, True


def _refused(exc: orjson.JSONDecodeError) -> RequestRejected:
    if "depth" in exc.msg:
        return RequestRejected(
            Code.NESTING_TOO_DEEP,
            "",
            f"the request body nests objects and arrays too deep (stopped at position {exc.pos}): flatten the data",
        )
    return RequestRejected(
        Code.INVALID_JSON,
        "",
        f"the request body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} (position {exc.pos})",
    )


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("a number is infinity when parsed as double")
    return value


def _decode_with_unpaired_surrogates(body: bytes) -> object:
    """The document of a body orjson refused for an unpaired surrogate, each one replaced by U+FFFD.
    The standard library decodes it as orjson would otherwise (no NaN, no infinity), keeping the
    surrogates; the standard library pairs the halves that belong together first, so only lone ones go."""
    try:
        document = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise RequestRejected(
            Code.NESTING_TOO_DEEP, "", "the request body nests objects and arrays too deep: flatten the data"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError, a refused constant or number, bytes not UTF-8
        raise RequestRejected(Code.INVALID_JSON, "", f"the request body is not valid JSON: {exc}") from None
    return _replace_surrogates(document)


def _replace_surrogates(document: object) -> object:
    """`document` with every surrogate in its strings and keys replaced, in place; iterative, so a deep
    document costs a longer list, not Python recursion."""

    def clean(text: str) -> str:
        return text if text.isascii() else _SURROGATE.sub("\ufffd", text)

    if type(document) is str:
        return clean(document)
    pending = [document] if type(document) in (dict, list) else []
    while pending:
        container = pending.pop()
        if type(container) is dict:
            if not all(key.isascii() for key in container):
                items = list(container.items())
                container.clear()
                container.update((clean(key), value) for key, value in items)
            slots = container.items()
        else:
            slots = enumerate(container)
        for slot, value in list(slots):
            if type(value) is str:
                container[slot] = clean(value)
            elif type(value) in (dict, list):
                pending.append(value)
    return document
