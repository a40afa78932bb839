"""The base of every spec model: camelCase on the wire, unknown fields rejected, docs on every field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in YAML / the Kubernetes API (camelCase, defaults included)."""
        return self.model_dump(mode="json", by_alias=True)
