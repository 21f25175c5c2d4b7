"""An app package that uses the attention kernels its own wheel ships.

Nothing here names the kernels' files: aotc finds them through the `aotc.libraries` entry point
that the build hook declared in this wheel.
"""

from __future__ import annotations

__version__ = "0.1.0"


def attention(q, k, v, *, mask=None):
    """Decode attention with head dims 192/128 on the prebuilt kernels (MLX's op elsewhere)."""
    import aotc

    return aotc.sdpa_vector(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)


def kernels_found() -> bool:
    """Whether aotc sees this package's kernels (usable or not on this machine)."""
    from aotc.runtime.libraries import libraries

    return any(library.name == "downstream_sdpa" for library in libraries())
