"""The KMS emulator's key-policy evaluator: re-exported from protocol.key_policy.

The evaluator lives in protocol/ so that the chatbot can check a key policy with the very code
the emulator enforces it with.
"""

from protocol.key_policy import (
    ContextValue,
    Decision,
    PolicyError,
    account_of,
    evaluate,
    role_arn_of,
    validate_policy,
)

__all__ = [
    "ContextValue",
    "Decision",
    "PolicyError",
    "account_of",
    "evaluate",
    "role_arn_of",
    "validate_policy",
]
