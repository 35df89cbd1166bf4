"""Is a module installed? One rule for the pre-launch checks and the ranks' kernel choice."""

from __future__ import annotations

import importlib.util


def module_importable(name: str) -> bool:
    """``name`` can be imported (looked up, not imported: no torch or extension loads here)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package that fails to import
        return False
    # a bare folder (namespace package) is no module: flash-attn 4 ships flash_attn/cute alone,
    # which makes `flash_attn` findable without flash-attn 2 being installed
    return spec is not None and spec.origin is not None
