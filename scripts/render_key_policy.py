"""Render the KMS key policy of nitro-llm from a template and the enclave image's measurements.

`python scripts/render_key_policy.py MEASUREMENTS.json --account-id ID --user-arn ARN
--parent-role-arn ARN --admin-arn ARN [--layout strict|cross-account] [--out FILE]`

MEASUREMENTS is what `nitro-cli build-enclave` prints (`{"Measurements": {"HashAlgorithm":
"Sha384 { ... }", "PCR0": ..., "PCR1": ..., "PCR2": ..., "PCR8": ...}}`) or a plain
`{"PCR0": "<hex>", ...}` object (what `nitro-local measure --json` prints); "-" reads stdin.
PCR0-2 are required; PCR3, PCR4 and PCR8 are pinned when present and not all zero.

Templates live at the checkout's top level (key_policy.json, key_policy_cross_account.json):
`${NAME}` placeholders are replaced by the values below. A placeholder standing alone in a list
(`["${USER_ARNS}"]`) expands to the whole list. An optional PCR that was not given removes its
condition key; a statement whose condition is left empty is removed (never kept without a
condition). The rendered policy is then evaluated against its own
promises with protocol.key_policy, so an edited template cannot silently weaken them.

Importable from a checkout: `render(...)` and `parse_measurements(...)` are what
emulator/local_policy.py uses for nitro-local. Standard library and protocol/ only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing: the packages live at the repository root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from protocol.key_policy import Decision, PolicyError, evaluate, validate_policy  # noqa: E402

# At the checkout's top level, where DESIGN.md puts them.
LAYOUTS = {
    "strict": _ROOT / "key_policy.json",
    "cross-account": _ROOT / "key_policy_cross_account.json",
    # Protocol v1's own key (the original sample's clients): weaker by construction, see README.
    "compat": _ROOT / "key_policy_compat.json",
}
APP = "nitro-llm"
REQUIRED_PCRS = (0, 1, 2)
OPTIONAL_PCRS = (3, 4, 8)
PCR_HEX_LEN = 96  # SHA-384
MAX_INPUT_BYTES = 1 << 20

_HEX = re.compile(r"^[0-9a-fA-F]*$")
_ACCOUNT_ID = re.compile(r"^\d{12}$")
_IAM_ARN = re.compile(
    r"^arn:aws(?:-[a-z]+)*:iam::(\d{12}):(root|user/[\w+=,.@/-]{1,512}|role/[\w+=,.@/-]{1,512})$"
)
_PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")
_DROP = object()  # an optional placeholder with no value


class RenderError(ValueError):
    """Bad measurements, ARNs, layout or template; the message says which and why."""


# ---- measurements ------------------------------------------------------------------------------


def parse_measurements(obj: Any) -> dict[int, str]:
    """The PCRs to pin, as lowercase hex, from nitro-cli's output or a plain {"PCR0": ...}."""
    if isinstance(obj, Mapping) and "Measurements" in obj:
        if set(obj) != {"Measurements"}:
            raise RenderError("the measurements JSON holds fields other than Measurements")
        obj = obj["Measurements"]
    if not isinstance(obj, Mapping):
        raise RenderError('the measurements must be a JSON object such as {"PCR0": "<hex>", ...}')
    algorithm = obj.get("HashAlgorithm")
    if algorithm is not None and not (
        isinstance(algorithm, str) and algorithm.lower().startswith("sha384")
    ):
        raise RenderError(f"HashAlgorithm {algorithm!r} is not Sha384")
    pcrs: dict[int, str] = {}
    for name, value in obj.items():
        if name == "HashAlgorithm":
            continue
        match = re.fullmatch(r"PCR(\d{1,2})", str(name))
        if match is None or int(match.group(1)) > 31:
            raise RenderError(f"unknown field {name!r} in the measurements (expected PCR0..PCR31)")
        n = int(match.group(1))
        if not isinstance(value, str) or not _HEX.match(value):
            raise RenderError(f"{name} must be a hex string")
        if len(value) != PCR_HEX_LEN:
            raise RenderError(
                f"{name} must be {PCR_HEX_LEN} hex characters (SHA-384), got {len(value)}"
            )
        if n in REQUIRED_PCRS or n in OPTIONAL_PCRS:
            pcrs[n] = value.lower()
    missing = [n for n in REQUIRED_PCRS if n not in pcrs]
    if missing:
        raise RenderError(f"PCR{missing[0]} is missing from the measurements")
    zero = "0" * PCR_HEX_LEN
    if all(pcrs[n] == zero for n in REQUIRED_PCRS):
        raise RenderError(
            "PCR0-2 are all zero: that is what a debug-mode enclave reports, and pinning it would "
            "admit any enclave run in debug mode"
        )
    # An unused PCR reads zero: pinning it adds nothing.
    return {n: value for n, value in pcrs.items() if n in REQUIRED_PCRS or value != zero}


def load_measurements(path: str) -> dict[int, str]:
    """parse_measurements() of a file, or of stdin when `path` is "-"."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise RenderError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise RenderError(f"{path} is larger than {MAX_INPUT_BYTES} bytes")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise RenderError(f"{path} is not JSON") from None
    return parse_measurements(obj)


# ---- principals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principals:
    """Who the policy names; every ARN an IAM ARN (user, role or account root)."""

    account_id: str
    user_arns: tuple[str, ...]
    parent_role_arn: str
    admin_arns: tuple[str, ...]


def _arn_account(arn: str, what: str, kinds: tuple[str, ...]) -> str:
    match = _IAM_ARN.match(arn) if isinstance(arn, str) else None
    if match is None:
        raise RenderError(
            f"{what} {arn!r} is not an IAM ARN (arn:aws:iam::<12 digits>:user/..., role/... "
            "or root)"
        )
    kind = match.group(2).split("/", 1)[0]
    if kind not in kinds:
        raise RenderError(f"{what} {arn!r} must be an IAM {' or '.join(kinds)} ARN")
    return match.group(1)


def check_principals(principals: Principals, layout: str) -> None:
    """Refuse ARNs of the wrong shape or account for `layout`, and overlapping roles."""
    if layout not in LAYOUTS:
        raise RenderError(f"unknown layout {layout!r} ({', '.join(LAYOUTS)})")
    owner = principals.account_id
    if not isinstance(owner, str) or not _ACCOUNT_ID.match(owner):
        raise RenderError(f"--account-id {owner!r} must be 12 digits")
    if not principals.user_arns:
        raise RenderError("at least one --user-arn is needed")
    if not principals.admin_arns:
        raise RenderError("at least one --admin-arn is needed (else nobody can manage the key)")
    for arn in principals.user_arns:
        if _arn_account(arn, "--user-arn", ("user", "role")) != owner:
            raise RenderError(f"--user-arn {arn} is not in account {owner}")
    for arn in principals.admin_arns:
        if _arn_account(arn, "--admin-arn", ("user", "role", "root")) != owner:
            raise RenderError(f"--admin-arn {arn} is not in account {owner}")
    parent_account = _arn_account(principals.parent_role_arn, "--parent-role-arn", ("role",))
    if layout in ("strict", "compat") and parent_account != owner:
        raise RenderError(
            f"--parent-role-arn is in account {parent_account}, not {owner}: use --layout "
            "cross-account for a key kept in another account than the parent's"
        )
    if layout == "cross-account" and parent_account == owner:
        raise RenderError(
            "--layout cross-account keeps the key in the data owner's account: --parent-role-arn "
            f"must be in another account than {owner}"
        )
    roles = [
        ("--user-arn", set(principals.user_arns)),
        ("--admin-arn", set(principals.admin_arns)),
        ("--parent-role-arn", {principals.parent_role_arn}),
    ]
    for i, (name_a, set_a) in enumerate(roles):
        for name_b, set_b in roles[i + 1 :]:
            shared = sorted(set_a & set_b)
            if shared:
                raise RenderError(
                    f"{shared[0]} is both {name_a} and {name_b}: users wrap, the parent unwraps "
                    "only when attested, administrators manage; one principal cannot be two"
                )


# ---- rendering ----------------------------------------------------------------------------------


def _values(principals: Principals, pcrs: Mapping[int, str]) -> dict[str, Any]:
    values: dict[str, Any] = {
        "ACCOUNT_ID": principals.account_id,
        "PARENT_ACCOUNT_ID": principals.parent_role_arn.split(":")[4],
        "PARENT_ROLE_ARN": principals.parent_role_arn,
        "USER_ARNS": list(dict.fromkeys(principals.user_arns)),
        "ADMIN_ARNS": list(dict.fromkeys(principals.admin_arns)),
    }
    for n in REQUIRED_PCRS + OPTIONAL_PCRS:
        values[f"PCR{n}"] = pcrs.get(n, _DROP)
    return values


def _substitute(node: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:
            if whole.group(1) not in values:
                raise RenderError(f"the template uses an unknown placeholder {node}")
            return values[whole.group(1)]

        def text(match: re.Match[str]) -> str:
            value = values.get(match.group(1))
            if not isinstance(value, str):
                raise RenderError(f"placeholder {match.group(0)} cannot be part of a string")
            return value

        return _PLACEHOLDER.sub(text, node)
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            value = _substitute(item, values)
            if value is _DROP:
                continue
            out.extend(value if isinstance(value, list) and isinstance(item, str) else [value])
        return out
    if isinstance(node, dict):
        result = {}
        for key, item in node.items():
            value = _substitute(item, values)
            if value is _DROP:
                if key == "Condition":
                    return _DROP  # a statement never survives without its condition
                continue
            result[key] = value
        # An object emptied by optional values (a condition block, a Condition) goes too.
        return _DROP if node and not result else result
    return node


def render_template(template: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Substitute `values` into `template` (see the module docstring for the rules)."""
    if not isinstance(template.get("Statement"), list):
        raise RenderError("the template needs a Statement list")
    rendered = {key: _substitute(value, values) for key, value in template.items()}
    leftover = _PLACEHOLDER.search(json.dumps(rendered))
    if leftover:
        raise RenderError(f"placeholder {leftover.group(0)} was left unrendered")
    return rendered


def load_template(layout: str, template_path: Path | None = None) -> dict[str, Any]:
    path = Path(template_path) if template_path is not None else LAYOUTS.get(layout)
    if path is None:
        raise RenderError(f"unknown layout {layout!r} (strict or cross-account)")
    try:
        template = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise RenderError(f"cannot read the template {path}: {exc.strerror}") from None
    except ValueError:
        raise RenderError(f"the template {path} is not JSON") from None
    if not isinstance(template, dict):
        raise RenderError(f"the template {path} must hold a JSON object")
    return template


def render(
    pcrs: Mapping[int, str],
    principals: Principals,
    *,
    layout: str = "strict",
    template: Mapping[str, Any] | None = None,
    purpose: str = "data",
) -> dict[str, Any]:
    """The key policy for `principals`, pinned to `pcrs` (from parse_measurements), checked.

    `purpose="model"` renders a model owner's key (sealed weights, scripts/seal_model.py): the
    users are the model's owners, who wrap data keys only with the context purpose "model".
    """
    if purpose not in PURPOSES:
        raise RenderError(f"unknown purpose {purpose!r} ({', '.join(PURPOSES)})")
    if purpose == "model" and layout == "compat":
        raise RenderError("a model key has no protocol v1 layout: use strict or cross-account")
    check_principals(principals, layout)
    pcrs = parse_measurements({f"PCR{n}": value for n, value in pcrs.items()})
    if template is None:
        template = load_template(layout)
    policy = render_template(template, _values(principals, pcrs))
    try:
        validate_policy(policy)
    except PolicyError as exc:
        raise RenderError(f"the rendered policy is not valid: {exc}") from None
    PROMISES.get(layout, check_promises)(policy, pcrs, principals)
    if purpose == "model":
        # Narrowed after the layout's promises held: it only takes grants away.
        policy = _for_model_key(policy)
        check_model_promises(policy, principals)
    return policy


PURPOSES = ("data", "model")
MODEL_CONTEXT_KEY = "kms:EncryptionContext:purpose"


def _for_model_key(policy: dict[str, Any]) -> dict[str, Any]:
    """Narrow every GenerateDataKey grant to the context purpose "model" (sealed weights)."""
    narrowed = 0
    for statement in policy.get("Statement", []):
        actions = statement.get("Action")
        actions = [actions] if isinstance(actions, str) else actions or []
        if statement.get("Effect") == "Allow" and "kms:GenerateDataKey" in actions:
            equals = statement.setdefault("Condition", {}).setdefault("StringEquals", {})
            equals[MODEL_CONTEXT_KEY] = "model"
            narrowed += 1
    if not narrowed:
        raise RenderError("the template grants no kms:GenerateDataKey to narrow to a model key")
    policy["Id"] = f"{policy.get('Id', APP)}-model"
    return policy


def check_model_promises(policy: Mapping[str, Any], principals: Principals) -> None:
    """A model key wraps data keys only for sealed models: never without purpose "model"."""
    model = {"kms:EncryptionContext:app": APP, "kms:EncryptionContext:purpose": "model"}
    check = _Checklist()
    for owner in principals.user_arns:
        check.expect(_allowed(policy, owner, "kms:GenerateDataKey", model), "a model owner seals")
        for other in ({"kms:EncryptionContext:app": APP}, {**model, MODEL_CONTEXT_KEY: "data"}):
            check.expect(
                not _allowed(policy, owner, "kms:GenerateDataKey", other),
                "a data key without purpose model",
            )
    check.close("model key policy")


# ---- the policy's promises ----------------------------------------------------------------------


def _decide(
    policy: Mapping[str, Any], who: str, action: str, extra: Mapping[str, Any] | None = None
) -> Decision:
    # The request context KMS builds: who calls, from which account, and what the call carries.
    account = who.split(":")[4]
    context = {"aws:PrincipalArn": who, "aws:PrincipalAccount": account}
    context["kms:CallerAccount"] = account
    context.update(extra or {})
    return evaluate(policy, principal_arn=who, action=action, context=context)


def _allowed(
    policy: Mapping[str, Any], who: str, action: str, extra: Mapping[str, Any] | None = None
) -> bool:
    return _decide(policy, who, action, extra).allowed


def _explicitly_denied(
    policy: Mapping[str, Any], who: str, action: str, extra: Mapping[str, Any] | None = None
) -> bool:
    return _decide(policy, who, action, extra).reason.startswith("explicit deny")


class _Checklist:
    """What a rendered policy failed to keep; `close` raises them all as one RenderError."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def close(self, which: str) -> None:
        if self.failures:
            raise RenderError(
                f"the rendered {which} breaks its promises (is the template edited?): "
                + "; ".join(self.failures)
            )


def _attested(pcrs: Mapping[int, str]) -> dict[str, str]:
    """The request context of a Decrypt carrying an attestation document with `pcrs`."""
    return {f"kms:RecipientAttestation:PCR{n}": value for n, value in pcrs.items()}


def _only_the_enclave_decrypts(
    check: _Checklist, policy: Mapping[str, Any], pcrs: Mapping[int, str], parent: str
) -> None:
    """The parent decrypts with these PCRs, not with another value of any, not in debug mode."""
    attested = _attested(pcrs)
    check.expect(_allowed(policy, parent, "kms:Decrypt", attested), "the attested parent decrypts")
    for n in pcrs:
        other = {**attested, f"kms:RecipientAttestation:PCR{n}": "f" * PCR_HEX_LEN}
        check.expect(not _allowed(policy, parent, "kms:Decrypt", other), f"another PCR{n}")
    debug = {**attested, **{f"kms:RecipientAttestation:PCR{n}": "0" * 96 for n in range(3)}}
    check.expect(_explicitly_denied(policy, parent, "kms:Decrypt", debug), "a debug-mode enclave")


def check_promises(
    policy: Mapping[str, Any], pcrs: Mapping[int, str], principals: Principals
) -> None:
    """Evaluate `policy` as KMS would and refuse it unless it keeps what the README promises."""
    attested = _attested(pcrs)
    attested["kms:RecipientAttestation:ImageSha384"] = pcrs[0]
    app = {"kms:EncryptionContext:app": APP}
    check = _Checklist()
    expect = check.expect
    parent = principals.parent_role_arn
    _only_the_enclave_decrypts(check, policy, pcrs, parent)
    # Refused by an explicit deny, which no grant and no other statement can override.
    anyone = (
        parent,
        *principals.admin_arns,
        *principals.user_arns,
        "arn:aws:iam::000000000000:root",
    )
    for who in anyone:
        for action in ("kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:CreateGrant"):
            expect(_explicitly_denied(policy, who, action, app), f"{who} {action} unattested")
    for n in pcrs:  # strict: refused by an explicit deny, not just by no allow
        other = {**attested, f"kms:RecipientAttestation:PCR{n}": "f" * PCR_HEX_LEN}
        expect(_explicitly_denied(policy, parent, "kms:Decrypt", other), f"another PCR{n} denied")
    for action in ("kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:CreateGrant", "kms:PutKeyPolicy"):
        expect(not _allowed(policy, parent, action, attested), f"the parent's {action}")
    for user in principals.user_arns:
        expect(_allowed(policy, user, "kms:GenerateDataKey", app), "a user wraps data keys")
        expect(not _allowed(policy, user, "kms:GenerateDataKey"), "a user without the app")
        for action in ("kms:Decrypt", "kms:CreateGrant", "kms:PutKeyPolicy"):
            expect(not _allowed(policy, user, action, {**attested, **app}), f"a user's {action}")
    for admin in principals.admin_arns:
        expect(_allowed(policy, admin, "kms:PutKeyPolicy"), "an administrator manages the key")
        for action in ("kms:Decrypt", "kms:GenerateDataKey", "kms:CreateGrant", "kms:Encrypt"):
            expect(not _allowed(policy, admin, action, {**attested, **app}), f"admin's {action}")
    for account in {principals.account_id, principals.parent_role_arn.split(":")[4]}:
        for who in (f"arn:aws:iam::{account}:root", f"arn:aws:iam::{account}:role/other"):
            if who in principals.admin_arns:
                continue
            for action in ("kms:Decrypt", "kms:PutKeyPolicy", "kms:CreateGrant"):
                expect(not _allowed(policy, who, action, {**attested, **app}), f"{who} {action}")
    check.close("policy")


def check_compat_promises(
    policy: Mapping[str, Any], pcrs: Mapping[int, str], principals: Principals
) -> None:
    """The compat (protocol v1) key's promises: only the attested enclave decrypts among
    non-users; users encrypt questions and decrypt answers; nobody re-encrypts or grants."""
    attested = _attested(pcrs)
    check = _Checklist()
    expect = check.expect
    parent = principals.parent_role_arn
    _only_the_enclave_decrypts(check, policy, pcrs, parent)
    expect(_explicitly_denied(policy, parent, "kms:Decrypt"), "the parent's unattested Decrypt")
    expect(_allowed(policy, parent, "kms:Encrypt"), "the parent encrypts answers")
    everyone = (parent, *principals.admin_arns, *principals.user_arns)
    for who in everyone:
        for action in ("kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:CreateGrant"):
            expect(_explicitly_denied(policy, who, action, attested), f"{who} {action}")
    for action in ("kms:PutKeyPolicy", "kms:GenerateDataKey"):
        expect(not _allowed(policy, parent, action, attested), f"the parent's {action}")
    for user in principals.user_arns:
        for action in ("kms:Encrypt", "kms:Decrypt"):
            expect(_allowed(policy, user, action), f"a v1 user's {action}")
        for action in ("kms:PutKeyPolicy", "kms:GenerateDataKey"):
            expect(not _allowed(policy, user, action), f"a user's {action}")
    for admin in principals.admin_arns:
        expect(_allowed(policy, admin, "kms:PutKeyPolicy"), "an administrator manages the key")
        for action in ("kms:Decrypt", "kms:Encrypt"):
            expect(not _allowed(policy, admin, action, attested), f"admin's {action}")
    account = principals.account_id
    for who in (f"arn:aws:iam::{account}:root", f"arn:aws:iam::{account}:role/other"):
        if who in principals.admin_arns:
            continue
        for action in ("kms:Decrypt", "kms:Encrypt", "kms:PutKeyPolicy"):
            expect(not _allowed(policy, who, action, attested), f"{who} {action}")
    check.close("compat policy")


# What each layout's rendered policy must keep; a layout not named keeps the strict promises.
PROMISES = {"compat": check_compat_promises}


# ---- the command line ---------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="render_key_policy.py",
        description="Render the nitro-llm KMS key policy, pinned to an enclave image's PCRs.",
    )
    parser.add_argument(
        "measurements", help='nitro-cli build-enclave output or {"PCR0": ...} JSON; - for stdin'
    )
    parser.add_argument("--account-id", required=True, help="the account that owns the key")
    parser.add_argument(
        "--user-arn", action="append", required=True, help="a user (repeatable): wraps data keys"
    )
    parser.add_argument(
        "--parent-role-arn", required=True, help="the parent instance's IAM role: attested Decrypt"
    )
    parser.add_argument(
        "--admin-arn", action="append", required=True, help="an administrator (repeatable)"
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="strict")
    parser.add_argument("--template", type=Path, help="another template file")
    parser.add_argument(
        "--purpose",
        choices=PURPOSES,
        default="data",
        help="model: the model owner's key for sealed weights (--user-arn names the owner)",
    )
    parser.add_argument("--out", type=Path, help="where to write the policy (default: stdout)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)  # argparse exits 2 on a usage error
    principals = Principals(
        account_id=args.account_id,
        user_arns=tuple(args.user_arn),
        parent_role_arn=args.parent_role_arn,
        admin_arns=tuple(args.admin_arn),
    )
    try:
        check_principals(principals, args.layout)
        pcrs = load_measurements(args.measurements)
        template = load_template(args.layout, args.template)
        policy = render(
            pcrs, principals, layout=args.layout, template=template, purpose=args.purpose
        )
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(policy, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    pinned = ", ".join(f"PCR{n}" for n in sorted(pcrs))
    print(f"wrote {args.out} ({args.layout} layout, pinned to {pinned})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
