"""aotc: ahead-of-time kernel compiler for MLX.

Build time: `aotc build manifest.yaml` (see `aotc.cli`). Run time, with no compiler present:

    import aotc
    aotc.load("dist/extra_sdpa.cuda.json")   # or found through AOTC_PATH, wheels, app bundles
    out = aotc.sdpa_vector(q, k, v, scale=scale, mask="causal")
    aotc.patch()                             # mx.fast.scaled_dot_product_attention -> aotc
    aotc.eval(out)                           # mx.eval that polls instead of sleeping
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Run-time names load MLX lazily so that `aotc build` starts fast and never touches a GPU.
_LAZY = {
    "sdpa_vector": "aotc.families.sdpa_vector.api",
    "clear_cache": "aotc.families.sdpa_vector.api",
    "fallback_reason": "aotc.families.sdpa_vector.api",
    "patch": "aotc.families.sdpa_vector.api",
    "unpatch": "aotc.families.sdpa_vector.api",
    "patched": "aotc.families.sdpa_vector.api",
    "eval": "aotc.runtime.evaluate",
    "libraries": "aotc.runtime.libraries",
    "Library": "aotc.runtime.libraries",
}

if TYPE_CHECKING:
    from aotc.families.sdpa_vector.api import (
        clear_cache,
        fallback_reason,
        patch,
        patched,
        sdpa_vector,
        unpatch,
    )
    from aotc.runtime.evaluate import eval
    from aotc.runtime.libraries import Library, libraries


def load(path: Any) -> Any:
    """Load an aotc library (its index, its artifact, or a folder of them) ahead of the others."""
    from aotc.families.sdpa_vector.api import clear_cache
    from aotc.runtime.libraries import load as load_library

    library = load_library(path)
    clear_cache()
    return library


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        # Later lookups find it in the module: `aotc.sdpa_vector` is on a decode step's hot
        # path, and this function with its import_module cost ~5 us a call (H100 host).
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aotc' has no attribute {name!r}")


__all__ = [
    "Library",
    "clear_cache",
    "eval",
    "fallback_reason",
    "libraries",
    "load",
    "patch",
    "patched",
    "sdpa_vector",
    "unpatch",
]
