"""The base of every CR model: frozen, camelCase on the wire, snake_case in Python.

Models are parsed once, at the edge (a handler receiving a CR body); everything past that point
works with these immutable values. Unknown fields are ignored rather than rejected because the API
server's structural schema already prunes them, and an older operator must keep reading objects
written for a newer CRD.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class CRModel(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict as stored in the API server, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
