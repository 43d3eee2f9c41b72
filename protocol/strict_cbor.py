"""Strict CBOR decoding for bytes from an untrusted peer (NSM messages, attestation documents).

Exactly one definite-length item filling the input, no tags, no duplicate keys, bounded depth.
"""

from __future__ import annotations

import collections.abc
import io
from collections.abc import Iterator
from typing import Any, NoReturn

import cbor2

MAX_DEPTH = 8


class StrictCborError(ValueError):
    """The bytes are not one strict CBOR item; the message says how, never what they held."""


def _refuse_tag(*_args: Any) -> NoReturn:
    raise ValueError("CBOR tags are not allowed here")


class _NoSemanticTags(collections.abc.Mapping):
    """Maps every tag to a refusal, so that cbor2 turns no tag (bignum, date...) into a value."""

    def __getitem__(self, tag: int) -> Any:
        return _refuse_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def decode_one(data: bytes) -> Any:
    """The one item `data` holds, or StrictCborError."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(
            stream,
            tag_hook=_refuse_tag,
            semantic_decoders=_NoSemanticTags(),
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        ).decode()
    # cbor2 reports malformed input with many exception types (CBORDecodeError, ValueError,
    # TypeError for unhashable keys, OverflowError, RecursionError...); all mean "malformed".
    except Exception as exc:
        raise StrictCborError("not valid CBOR") from exc
    if stream.tell() != len(data):
        raise StrictCborError("trailing bytes")
    return value
