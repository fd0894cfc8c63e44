"""Loading of the compiled module kclip._C, at first use rather than at import."""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)


def require_compiled() -> bool:
    """True when KCLIP_REQUIRE_COMPILED=1: a missing compiled part must fail instead of falling back."""
    return os.environ.get("KCLIP_REQUIRE_COMPILED", "0") not in ("", "0")


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from kclip import _C
    except ImportError as exc:  # a source tree without a build, or a broken build
        return None, f"kclip._C could not be imported ({exc}); build it with `pip install .`"
    return _C, ""


def compiled_module(purpose: str) -> ModuleType | None:
    """The compiled module, or None (logged) where it is missing; raises under KCLIP_REQUIRE_COMPILED=1.

    Args:
        purpose: what the caller wanted it for, for the message.
    """
    module, why = _load()
    if module is None:
        if require_compiled():
            raise ImportError(f"{purpose} needs the compiled module and KCLIP_REQUIRE_COMPILED=1: {why}")
        log.warning("%s falls back to the pure-PyTorch reference: %s", purpose, why)
    return module


def compiled_status() -> tuple[ModuleType | None, str]:
    """(module or None, reason it is missing), without logging or raising."""
    return _load()
