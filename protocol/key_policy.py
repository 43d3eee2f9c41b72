"""Key-policy evaluation following AWS's documented semantics (stdlib only).

Used by the KMS emulator to authorize requests and by the chatbot to check that a key policy
admits Decrypt only to the expected enclave image.

Default deny, an explicit Deny wins, an Allow is needed; principals, actions, resources and the
condition operators a KMS key policy for Nitro Enclaves uses (String*, Arn*, Bool, Null, IfExists,
ForAnyValue/ForAllValues). Policies are validated on entry; anything we cannot evaluate is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

ContextValue = str | list[str] | bool

_VERSIONS = ("2012-10-17", "2008-10-17")
_STATEMENT_FIELDS = frozenset(
    {"Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction", "Resource"}
    | {"NotResource", "Condition"}
)
_POLICY_FIELDS = frozenset({"Version", "Id", "Statement"})
_ACCOUNT_ID = re.compile(r"^\d{12}$")
_ACCOUNT_ROOT = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):root$")
_ASSUMED_ROLE = re.compile(r"^arn:(aws[a-z-]*):sts::(\d{12}):assumed-role/([^/]+)/[^/]+$")
_ANY_ARN = re.compile(r"^arn:aws[a-z-]*:[a-z0-9-]+:[a-z0-9-]*:(\d{12})?:.+$")

# Base operators: (how a single request value matches one condition value, negated?).
_STRING_OPERATORS = {
    "StringEquals": ("equals", False),
    "StringNotEquals": ("equals", True),
    "StringEqualsIgnoreCase": ("iequals", False),
    "StringNotEqualsIgnoreCase": ("iequals", True),
    "StringLike": ("like", False),
    "StringNotLike": ("like", True),
    # AWS matches ARNs component by component; with wildcards that is the same as a glob over
    # the whole ARN for every ARN the emulator produces (no ':' inside a component).
    "ArnEquals": ("like", False),
    "ArnNotEquals": ("like", True),
    "ArnLike": ("like", False),
    "ArnNotLike": ("like", True),
    "Bool": ("bool", False),
}


class PolicyError(ValueError):
    """The policy document is malformed or uses something the emulator cannot evaluate."""


@dataclass(frozen=True)
class Decision:
    """The outcome of an evaluation; `reason` names the deciding statement or "implicit deny"."""

    allowed: bool
    reason: str


def evaluate(
    policy: Mapping[str, Any],
    *,
    principal_arn: str,
    action: str,
    context: Mapping[str, ContextValue],
    resource: str = "*",
) -> Decision:
    """Decide whether `principal_arn` may perform `action` on `resource` under `policy`.

    `context` maps condition keys (any case) to the request's values. Raises PolicyError when the
    policy is malformed, so that a broken policy fails closed.
    """
    statements = validate_policy(policy)
    ctx = {key.lower(): value for key, value in context.items()}
    allow: str | None = None
    for index, statement in enumerate(statements):
        if not _statement_applies(statement, principal_arn, action, resource, ctx):
            continue
        name = _statement_name(statement, index)
        if statement["Effect"] == "Deny":
            return Decision(False, f"explicit deny by {name}")
        if allow is None:
            allow = name
    if allow is not None:
        return Decision(True, f"allowed by {allow}")
    return Decision(False, "implicit deny")


def validate_policy(policy: Any) -> list[dict[str, Any]]:
    """Check the shape of a policy document and return its statements as a list."""
    if not isinstance(policy, Mapping):
        raise PolicyError("the policy must be a JSON object")
    unknown = set(policy) - _POLICY_FIELDS
    if unknown:
        raise PolicyError(f"unknown policy field(s): {', '.join(sorted(unknown))}")
    version = policy.get("Version", "2008-10-17")
    if version not in _VERSIONS:
        raise PolicyError(f"unsupported policy Version {version!r}")
    statements = policy.get("Statement")
    if isinstance(statements, Mapping):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise PolicyError("the policy needs a non-empty Statement list")
    for index, statement in enumerate(statements):
        _validate_statement(statement, index)
    return statements


def _validate_statement(statement: Any, index: int) -> None:
    if not isinstance(statement, Mapping):
        raise PolicyError(f"statement #{index} is not an object")
    unknown = set(statement) - _STATEMENT_FIELDS
    if unknown:
        raise PolicyError(f"statement #{index}: unknown field(s) {', '.join(sorted(unknown))}")
    if "Sid" in statement and not isinstance(statement["Sid"], str):
        raise PolicyError(f"statement #{index}: Sid must be a string")
    if statement.get("Effect") not in ("Allow", "Deny"):
        raise PolicyError(f"statement #{index}: Effect must be Allow or Deny")
    for pair in (("Principal", "NotPrincipal"), ("Action", "NotAction")):
        present = [field for field in pair if field in statement]
        if len(present) != 1:
            raise PolicyError(f"statement #{index}: exactly one of {pair[0]}/{pair[1]} is needed")
    resources = [field for field in ("Resource", "NotResource") if field in statement]
    if len(resources) != 1:
        raise PolicyError(f"statement #{index}: exactly one of Resource/NotResource is needed")
    _validate_principal(statement.get("Principal", statement.get("NotPrincipal")), index)
    _string_list(statement.get("Action", statement.get("NotAction")), index, "Action")
    _string_list(statement[resources[0]], index, "Resource")
    condition = statement.get("Condition", {})
    if not isinstance(condition, Mapping):
        raise PolicyError(f"statement #{index}: Condition must be an object")
    for operator, block in condition.items():
        op = _parse_operator(operator, index)
        if not isinstance(block, Mapping) or not block:
            raise PolicyError(f"statement #{index}: {operator} needs an object of keys")
        for key, values in block.items():
            if not isinstance(key, str) or not key:
                raise PolicyError(f"statement #{index}: bad condition key")
            parsed = _condition_values(values, index)
            if op.base in ("Null", "Bool") and any(
                v.lower() not in ("true", "false") for v in parsed
            ):
                # Anything else would silently mean "false"; refuse it instead.
                raise PolicyError(f"statement #{index}: {operator} takes only true or false")


def _validate_principal(principal: Any, index: int) -> None:
    if principal == "*":
        return
    if not isinstance(principal, Mapping) or not principal:
        raise PolicyError(f'statement #{index}: Principal must be "*" or an object')
    for kind, values in principal.items():
        if kind not in ("AWS", "Service", "Federated", "CanonicalUser"):
            raise PolicyError(f"statement #{index}: unknown principal type {kind!r}")
        _string_list(values, index, "Principal")


def _string_list(value: Any, index: int, field: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise PolicyError(f"statement #{index}: {field} must be a string or a list of strings")
    if not all(isinstance(item, str) and item for item in values):
        raise PolicyError(f"statement #{index}: {field} must be a string or a list of strings")
    return values


def _condition_values(value: Any, index: int) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise PolicyError(f"statement #{index}: a condition needs at least one value")
    out = []
    for item in values:
        # JSON booleans and numbers are accepted, as AWS does, and compared as their text.
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
        else:
            raise PolicyError(f"statement #{index}: condition values must be strings")
    return out


@dataclass(frozen=True)
class _Operator:
    base: str  # a key of _STRING_OPERATORS, or "Null"
    match: str
    negated: bool
    if_exists: bool
    qualifier: str | None  # "ForAnyValue", "ForAllValues" or None


def _parse_operator(name: Any, index: int) -> _Operator:
    if not isinstance(name, str):
        raise PolicyError(f"statement #{index}: condition operators are strings")
    qualifier = None
    rest = name
    for prefix in ("ForAnyValue:", "ForAllValues:"):
        if rest.startswith(prefix):
            qualifier, rest = prefix[:-1], rest[len(prefix) :]
    if_exists = rest.endswith("IfExists")
    base = rest[: -len("IfExists")] if if_exists else rest
    if base == "Null":
        if if_exists or qualifier:
            raise PolicyError(f"statement #{index}: {name} is not a valid operator")
        return _Operator("Null", "null", False, False, None)
    if base not in _STRING_OPERATORS:
        raise PolicyError(f"statement #{index}: operator {name!r} is not supported")
    match, negated = _STRING_OPERATORS[base]
    return _Operator(base, match, negated, if_exists, qualifier)


def _statement_name(statement: Mapping[str, Any], index: int) -> str:
    sid = statement.get("Sid")
    return f"statement {sid!r}" if sid else f"statement #{index}"


def _statement_applies(
    statement: Mapping[str, Any],
    principal_arn: str,
    action: str,
    resource: str,
    ctx: Mapping[str, ContextValue],
) -> bool:
    if "Principal" in statement:
        if not _principal_matches(statement["Principal"], principal_arn):
            return False
    elif _principal_matches(statement["NotPrincipal"], principal_arn):
        return False
    if "Action" in statement:
        if not _any_glob(statement["Action"], action, ignore_case=True):
            return False
    elif _any_glob(statement["NotAction"], action, ignore_case=True):
        return False
    if "Resource" in statement:
        if not _any_glob(statement["Resource"], resource, ignore_case=False):
            return False
    elif _any_glob(statement["NotResource"], resource, ignore_case=False):
        return False
    return all(
        _condition_holds(_parse_operator(operator, 0), key, values, ctx)
        for operator, block in statement.get("Condition", {}).items()
        for key, values in block.items()
    )


def _principal_matches(principal: Any, principal_arn: str) -> bool:
    if principal == "*":
        return True
    # Only AWS principals call the emulator; Service/Federated/CanonicalUser never match.
    entries = principal.get("AWS", [])
    entries = [entries] if isinstance(entries, str) else entries
    caller_account = account_of(principal_arn)
    caller_role = role_arn_of(principal_arn)
    for entry in entries:
        if entry == "*":
            return True
        root = _ACCOUNT_ROOT.match(entry)
        account = root.group(1) if root else entry if _ACCOUNT_ID.match(entry) else None
        if account is not None:
            if account == caller_account:
                return True
        elif entry in (principal_arn, caller_role):
            return True
    return False


def account_of(arn: str) -> str | None:
    """The 12-digit account id in an IAM or STS ARN, or None."""
    match = _ANY_ARN.match(arn)
    return match.group(1) if match else None


def role_arn_of(arn: str) -> str:
    """For an assumed-role session ARN, the role's IAM ARN (as aws:PrincipalArn); else `arn`."""
    match = _ASSUMED_ROLE.match(arn)
    if not match:
        return arn
    partition, account, role = match.groups()
    return f"arn:{partition}:iam::{account}:role/{role}"


@lru_cache(maxsize=1024)
def _glob_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern]
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _glob(pattern: str, value: str, *, ignore_case: bool) -> bool:
    return _glob_regex(pattern, ignore_case).fullmatch(value) is not None


def _any_glob(patterns: str | list[str], value: str, *, ignore_case: bool) -> bool:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    return any(_glob(pattern, value, ignore_case=ignore_case) for pattern in patterns)


def _request_values(value: ContextValue) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value]


def _single_matches(match: str, value: str, wanted: str) -> bool:
    if match == "equals":
        return value == wanted
    if match == "iequals":
        return value.casefold() == wanted.casefold()
    if match == "like":
        return _glob(wanted, value, ignore_case=False)
    # Bool: "true"/"false" in any case on both sides.
    return value.lower() == wanted.lower()


def _condition_holds(
    op: _Operator, key: str, condition_values: Any, ctx: Mapping[str, ContextValue]
) -> bool:
    wanted = _condition_values(condition_values, 0)
    raw = ctx.get(key.lower())
    present = raw is not None and _request_values(raw) != []
    if op.base == "Null":
        # "true" means the key must be absent, "false" that it must be present; values OR'ed.
        return any((value.lower() == "true") != present for value in wanted)
    if not present:
        if op.if_exists:
            return True
        if op.qualifier == "ForAllValues":
            return True
        if op.qualifier == "ForAnyValue":
            return False
        return op.negated
    values = _request_values(raw)

    def matches(value: str) -> bool:
        hit = any(_single_matches(op.match, value, item) for item in wanted)
        return not hit if op.negated else hit

    if op.qualifier == "ForAllValues":
        return all(matches(value) for value in values)
    if op.qualifier == "ForAnyValue":
        return any(matches(value) for value in values)
    # A single-valued operator on a multivalued key: positive operators need one match,
    # negated ones need that no value matches.
    return all(matches(value) for value in values) if op.negated else any(map(matches, values))
