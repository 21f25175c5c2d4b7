"""The registry of kernel families: adding a family is one subpackage and one line here."""

from __future__ import annotations

from aotc.families import sdpa_vector
from aotc.families.base import Family

FAMILIES: dict[str, Family] = {family.name: family for family in (sdpa_vector.FAMILY,)}


def get_family(name: str) -> Family:
    return FAMILIES[name]
