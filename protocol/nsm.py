"""The Nitro Secure Module's request and response messages, as CBOR bytes and as dataclasses.

The encoding is serde_cbor's, as in AWS's aws-nitro-enclaves-nsm-api crate (docs/wire.md section
10): a unit variant is a text string, any other a one-entry map from its name to its fields.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NoReturn

import cbor2

from protocol.errors import ErrorCode, NitroError
from protocol.strict_cbor import StrictCborError, decode_one

# The NSM's own limits (nsm-api's driver and the kernel's nsm.c).
MAX_USER_DATA = 512
MAX_NONCE = 512
MAX_PUBLIC_KEY = 1024
MAX_REQUEST = 0x1000
MAX_RESPONSE = 0x3000
MAX_U16 = 0xFFFF
DIGESTS = frozenset({"SHA256", "SHA384", "SHA512"})
PCR_SIZES = frozenset({32, 48, 64})
MAX_MODULE_ID_CHARS = 256


class NsmErrorCode(enum.Enum):
    """The NSM's ErrorCode enum; the value is its name on the wire."""

    SUCCESS = "Success"
    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_INDEX = "InvalidIndex"
    INVALID_RESPONSE = "InvalidResponse"
    READ_ONLY_INDEX = "ReadOnlyIndex"
    INVALID_OPERATION = "InvalidOperation"
    BUFFER_TOO_SMALL = "BufferTooSmall"
    INPUT_TOO_LARGE = "InputTooLarge"
    INTERNAL_ERROR = "InternalError"


class NsmError(NitroError):
    """A malformed NSM message, a failed exchange, or an error the NSM answered.

    `nsm_code` is the NSM error code that the message (or the NSM) names, when there is one.
    """

    def __init__(
        self,
        detail: str,
        nsm_code: NsmErrorCode | None = None,
        code: ErrorCode = ErrorCode.PROTOCOL_ERROR,
    ) -> None:
        super().__init__(code, detail)
        self.nsm_code = nsm_code


def _invalid(detail: str, nsm_code: NsmErrorCode = NsmErrorCode.INVALID_ARGUMENT) -> NoReturn:
    raise NsmError(detail, nsm_code)


def _check_optional_bytes(value: Any, name: str, max_size: int) -> None:
    if value is None:
        return
    if type(value) is not bytes:
        _invalid(f"{name} must be bytes or None")
    if len(value) > max_size:
        _invalid(
            f"{name} is {len(value)} bytes, more than {max_size}", NsmErrorCode.INPUT_TOO_LARGE
        )


def _check_bytes(value: Any, name: str, sizes: frozenset[int] | None = None) -> None:
    if type(value) is not bytes:
        _invalid(f"{name} must be bytes")
    if sizes is not None and len(value) not in sizes:
        _invalid(f"{name} must be one of {sorted(sizes)} bytes long")


def _check_u16(value: Any, name: str) -> None:
    # bool is an int subclass; the wire has no such confusion, so neither do we.
    if type(value) is not int or not 0 <= value <= MAX_U16:
        _invalid(f"{name} must be an integer from 0 to {MAX_U16}")


# ---- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttestationRequest:
    """Ask for a signed document carrying these three optional fields."""

    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None

    def __post_init__(self) -> None:
        _check_optional_bytes(self.user_data, "user_data", MAX_USER_DATA)
        _check_optional_bytes(self.nonce, "nonce", MAX_NONCE)
        _check_optional_bytes(self.public_key, "public_key", MAX_PUBLIC_KEY)


@dataclass(frozen=True)
class GetRandomRequest:
    """Ask for bytes from the NSM's hardware random number generator."""


@dataclass(frozen=True)
class DescribeNsmRequest:
    """Ask for the module's version, id, PCR count and locked PCRs."""


@dataclass(frozen=True)
class DescribePcrRequest:
    index: int

    def __post_init__(self) -> None:
        _check_u16(self.index, "index")


@dataclass(frozen=True)
class ExtendPcrRequest:
    index: int
    data: bytes

    def __post_init__(self) -> None:
        _check_u16(self.index, "index")
        _check_bytes(self.data, "data")


@dataclass(frozen=True)
class LockPcrRequest:
    index: int

    def __post_init__(self) -> None:
        _check_u16(self.index, "index")


@dataclass(frozen=True)
class LockPcrsRequest:
    """Lock PCRs 0 to range - 1."""

    range: int

    def __post_init__(self) -> None:
        _check_u16(self.range, "range")


Request = (
    AttestationRequest
    | GetRandomRequest
    | DescribeNsmRequest
    | DescribePcrRequest
    | ExtendPcrRequest
    | LockPcrRequest
    | LockPcrsRequest
)


# ---- responses --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttestationResponse:
    document: bytes  # COSE_Sign1; protocol.attestation parses it

    def __post_init__(self) -> None:
        _check_bytes(self.document, "document")


@dataclass(frozen=True)
class GetRandomResponse:
    random: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.random, "random")


@dataclass(frozen=True)
class DescribeNsmResponse:
    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str = "SHA384"

    def __post_init__(self) -> None:
        for name in ("version_major", "version_minor", "version_patch", "max_pcrs"):
            _check_u16(getattr(self, name), name)
        if type(self.module_id) is not str or len(self.module_id) > MAX_MODULE_ID_CHARS:
            _invalid(f"module_id must be text of at most {MAX_MODULE_ID_CHARS} characters")
        if type(self.locked_pcrs) is not tuple:
            _invalid("locked_pcrs must be a tuple")
        for index in self.locked_pcrs:
            _check_u16(index, "a locked PCR index")
        if type(self.digest) is not str or self.digest not in DIGESTS:
            _invalid(f"digest must be one of {sorted(DIGESTS)}")


@dataclass(frozen=True)
class DescribePcrResponse:
    lock: bool
    data: bytes

    def __post_init__(self) -> None:
        if type(self.lock) is not bool:
            _invalid("lock must be a boolean")
        _check_bytes(self.data, "data", PCR_SIZES)


@dataclass(frozen=True)
class ExtendPcrResponse:
    data: bytes  # the PCR's new value

    def __post_init__(self) -> None:
        _check_bytes(self.data, "data", PCR_SIZES)


@dataclass(frozen=True)
class LockPcrResponse:
    pass


@dataclass(frozen=True)
class LockPcrsResponse:
    pass


@dataclass(frozen=True)
class ErrorResponse:
    """The NSM refused the request; the client raises NsmError naming `error`."""

    error: NsmErrorCode

    def __post_init__(self) -> None:
        if not isinstance(self.error, NsmErrorCode):
            _invalid("error must be an NsmErrorCode")


Response = (
    AttestationResponse
    | GetRandomResponse
    | DescribeNsmResponse
    | DescribePcrResponse
    | ExtendPcrResponse
    | LockPcrResponse
    | LockPcrsResponse
    | ErrorResponse
)

# Which response answers which request (an ErrorResponse may answer any).
RESPONSE_FOR: dict[type, type] = {
    AttestationRequest: AttestationResponse,
    GetRandomRequest: GetRandomResponse,
    DescribeNsmRequest: DescribeNsmResponse,
    DescribePcrRequest: DescribePcrResponse,
    ExtendPcrRequest: ExtendPcrResponse,
    LockPcrRequest: LockPcrResponse,
    LockPcrsRequest: LockPcrsResponse,
}

# Variant names on the wire; the fields of map variants are the dataclass fields, in order.
_UNIT_REQUESTS: dict[str, type] = {
    "GetRandom": GetRandomRequest,
    "DescribeNSM": DescribeNsmRequest,
}
_MAP_REQUESTS: dict[str, type] = {
    "Attestation": AttestationRequest,
    "DescribePCR": DescribePcrRequest,
    "ExtendPCR": ExtendPcrRequest,
    "LockPCR": LockPcrRequest,
    "LockPCRs": LockPcrsRequest,
}
_UNIT_RESPONSES: dict[str, type] = {
    "LockPCR": LockPcrResponse,
    "LockPCRs": LockPcrsResponse,
}
_MAP_RESPONSES: dict[str, type] = {
    "Attestation": AttestationResponse,
    "GetRandom": GetRandomResponse,
    "DescribeNSM": DescribeNsmResponse,
    "DescribePCR": DescribePcrResponse,
    "ExtendPCR": ExtendPcrResponse,
}
_REQUEST_NAMES: dict[type, str] = {
    cls: name for table in (_UNIT_REQUESTS, _MAP_REQUESTS) for name, cls in table.items()
}
_RESPONSE_NAMES: dict[type, str] = {
    cls: name for table in (_UNIT_RESPONSES, _MAP_RESPONSES) for name, cls in table.items()
}
# serde's field order for each map variant (the dataclasses declare theirs in the same order).
_FIELDS: dict[type, tuple[str, ...]] = {
    AttestationRequest: ("user_data", "nonce", "public_key"),
    DescribePcrRequest: ("index",),
    ExtendPcrRequest: ("index", "data"),
    LockPcrRequest: ("index",),
    LockPcrsRequest: ("range",),
    AttestationResponse: ("document",),
    GetRandomResponse: ("random",),
    DescribeNsmResponse: (
        "version_major",
        "version_minor",
        "version_patch",
        "module_id",
        "max_pcrs",
        "locked_pcrs",
        "digest",
    ),
    DescribePcrResponse: ("lock", "data"),
    ExtendPcrResponse: ("data",),
}


# ---- CBOR -------------------------------------------------------------------------------------


def _loads(data: Any, what: str, max_size: int) -> Any:
    """Decode exactly one definite-length, tag-free CBOR item filling `data`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        _invalid(f"the {what} must be bytes")
    data = bytes(data)
    if not data:
        _invalid(f"the {what} is empty")
    if len(data) > max_size:
        _invalid(
            f"the {what} is {len(data)} bytes, more than {max_size}", NsmErrorCode.INPUT_TOO_LARGE
        )
    try:
        return decode_one(data)
    except StrictCborError as exc:
        raise NsmError(
            f"the {what} is not strict CBOR ({exc})", NsmErrorCode.INVALID_ARGUMENT
        ) from exc


def _dumps(value: Any, what: str, max_size: int) -> bytes:
    data = cbor2.dumps(value)
    if len(data) > max_size:
        _invalid(
            f"the {what} is {len(data)} bytes, more than {max_size}", NsmErrorCode.INPUT_TOO_LARGE
        )
    return data


def _encode(message: Any, what: str, names: dict[type, str], max_size: int) -> bytes:
    name = names.get(type(message))
    if name is None:
        _invalid(f"{type(message).__name__} is not an NSM {what}")
    fields = _FIELDS.get(type(message))
    if fields is None:
        return _dumps(name, what, max_size)
    body = {}
    for field_name in fields:
        value = getattr(message, field_name)
        body[field_name] = list(value) if isinstance(value, tuple) else value
    return _dumps({name: body}, what, max_size)


def _decode(value: Any, what: str, units: dict[str, type], maps: dict[str, type]) -> Any:
    if type(value) is str:
        cls = units.get(value)
        if cls is None:
            _invalid(f"unknown {what} variant")
        return cls()
    if type(value) is not dict or len(value) != 1:
        _invalid(f"a {what} must be a text string or a map of one entry")
    ((name, body),) = value.items()
    cls = maps.get(name) if type(name) is str else None
    if cls is None:
        _invalid(f"unknown {what} variant")
    expected = _FIELDS[cls]
    if type(body) is not dict or set(body) != set(expected):
        _invalid(f"{name} must be a map of exactly {', '.join(expected)}")
    kwargs = dict(body)
    if "locked_pcrs" in kwargs:
        if type(kwargs["locked_pcrs"]) is not list:
            _invalid("locked_pcrs must be an array")
        kwargs["locked_pcrs"] = tuple(kwargs["locked_pcrs"])
    # The dataclasses check each field's type and size.
    return cls(**kwargs)


def encode_request(request: Request) -> bytes:
    """The CBOR bytes of a request, as /dev/nsm (and the emulator) takes them."""
    return _encode(request, "request", _REQUEST_NAMES, MAX_REQUEST)


def decode_request(data: bytes) -> Request:
    """Parse a request strictly (exact fields, types and sizes); anything else is NsmError."""
    return _decode(_loads(data, "request", MAX_REQUEST), "request", _UNIT_REQUESTS, _MAP_REQUESTS)


def encode_response(response: Response) -> bytes:
    """The CBOR bytes of a response; an ErrorResponse is `{"Error": "<code>"}`."""
    if isinstance(response, ErrorResponse):
        return _dumps({"Error": response.error.value}, "response", MAX_RESPONSE)
    return _encode(response, "response", _RESPONSE_NAMES, MAX_RESPONSE)


def decode_response(data: bytes) -> Response:
    """Parse a response strictly; `{"Error": code}` becomes ErrorResponse, not an exception."""
    value = _loads(data, "response", MAX_RESPONSE)
    if type(value) is dict and len(value) == 1 and "Error" in value:
        try:
            return ErrorResponse(NsmErrorCode(value["Error"]))
        except (ValueError, TypeError) as exc:
            raise NsmError("unknown NSM error code", NsmErrorCode.INVALID_RESPONSE) from exc
    return _decode(value, "response", _UNIT_RESPONSES, _MAP_RESPONSES)
