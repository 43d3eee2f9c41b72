"""The local key policy: the production template (key_policy.json), for nitro-local.

The rendering is scripts/render_key_policy.py's, loaded from this checkout, so that the policy the
local stack enforces is the one a deployment renders, pinned to the PCRs the NSM emulator measures.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

PINNED_PCRS = (0, 1, 2)
_RENDERER = Path(__file__).resolve().parents[1] / "scripts" / "render_key_policy.py"


@cache
def renderer() -> ModuleType:
    """scripts/render_key_policy.py as a module (scripts/ is not an installed package)."""
    if not _RENDERER.is_file():
        raise RuntimeError(f"{_RENDERER} is missing: nitro-local runs from a checkout")
    spec = importlib.util.spec_from_file_location("nitro_render_key_policy", _RENDERER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def render_local_policy(
    pcrs: Mapping[int, bytes],
    *,
    admin_arn: str,
    user_arn: str,
    parent_arn: str,
    layout: str = "strict",
) -> dict[str, Any]:
    """The policy document (a JSON object) of `layout` (strict, or compat for protocol v1's key)
    for a local key, pinned to PCR0-2 of `pcrs`.

    Raises ValueError (the renderer's RenderError) for a missing or malformed PCR or ARN.
    """
    missing = [n for n in PINNED_PCRS if n not in pcrs]
    if missing:
        raise ValueError(f"PCR{missing[0]} is needed to pin the policy")
    for n in PINNED_PCRS:
        if len(pcrs[n]) != 48:
            raise ValueError(f"PCR{n} must be 48 bytes (SHA-384)")
    render = renderer()
    principals = render.Principals(
        account_id=parent_arn.split(":")[4] if parent_arn.count(":") >= 5 else "",
        user_arns=(user_arn,),
        parent_role_arn=parent_arn,
        admin_arns=(admin_arn,),
    )
    return render.render({n: pcrs[n].hex() for n in PINNED_PCRS}, principals, layout=layout)
