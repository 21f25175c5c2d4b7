"""`aotc.eval`: `mx.eval` that polls for the GPU's completion instead of sleeping on it.

On MLX's CUDA backend `mx.eval` sleeps on a blocking-sync CUDA event, and the sleeping thread
wakes 25-48 us after the GPU is done (H100 and H200 hosts, bench/NOTES.md round 10): more than
a batch-1 decode attention kernel takes. `aotc.eval` schedules the same evaluation, then polls
its events (about a microsecond from completion to return) for up to `spin` seconds, and waits
as `mx.eval` does past that. The price is a CPU core kept busy while it polls, so the default
budget covers a decode step's kernels, not a long computation.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("aotc")

DEFAULT_SPIN_S = 2e-3


def _native_eval() -> Any:
    """The extension's `eval_polling`, or None where the extension lacks it."""
    from aotc.runtime.cuda import CudaUnavailable, extension

    try:
        return getattr(extension(), "eval_polling", None)
    except CudaUnavailable as exc:
        log.debug("aotc.eval polls nothing: %s", exc)
        return None


_eval_polling = _native_eval()


def eval(*args: Any, spin: float = DEFAULT_SPIN_S) -> bool:  # shadows the builtin, as mx.eval does
    """Evaluate arrays or trees of arrays (lists, tuples, dicts; other leaves are ignored) as
    `mx.eval` does, polling for completion for up to `spin` seconds (`math.inf`: until done).

    Returns True when the evaluation completed while polling, False when it was left to
    `mx.eval`'s wait (past `spin`, or without aotc's extension).
    """
    if not spin >= 0:  # NaN too
        raise ValueError(
            f"[aotc.eval] spin must be a number of seconds >= 0 or math.inf, not {spin!r}"
        )
    if _eval_polling is None:
        import mlx.core as mx

        mx.eval(*args)
        return False
    return _eval_polling(args, spin)
