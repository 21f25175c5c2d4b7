"""The registry of build targets: adding a target is one module and one line here."""

from __future__ import annotations

from aotc.targets import cuda, metal
from aotc.targets.base import Target

TARGETS: dict[str, Target] = {target.name: target for target in (metal.TARGET, cuda.TARGET)}


def get_target(name: str) -> Target:
    return TARGETS[name]
