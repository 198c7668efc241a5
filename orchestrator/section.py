"""Config sections read strictly: every default lives in the YAML (conf/), none in code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Section(dict):
    """A config section (``train``, ``judge``) whose missing keys fail naming their dotted path.

    A caller that passes an incomplete section gets ``KeyError: 'train.batch_size missing'``
    instead of a default silently differing from the YAML's.
    """

    def __init__(self, name: str, values: Mapping[str, Any]):
        super().__init__(values)
        self.name = name

    def __missing__(self, key: str) -> Any:
        raise KeyError(f"{self.name}.{key} missing")

    def sub(self, key: str) -> Section:
        return Section(f"{self.name}.{key}", self[key])
