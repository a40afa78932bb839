"""Structural OpenAPI v3 schemas (as Kubernetes CRDs need them) from the pydantic spec models.

pydantic's JSON schema is the starting point (it knows every constraint); this module turns it into
what the API server accepts:

- ``$ref``/``$defs`` are inlined (CRD schemas cannot reference), titles dropped;
- ``Optional[X]`` (``anyOf: [X, null]``) becomes plain ``X``: an absent field is pydantic's ``None``, and
  the API server prunes explicit nulls of non-nullable fields before defaulting, so ``revision: null``
  in a manifest means the same as leaving it out;
- JSON Schema 2020 numeric ``exclusiveMinimum: 0`` becomes OpenAPI's ``minimum: 0, exclusiveMinimum: true``;
- ``additionalProperties: false`` is dropped (unknown fields are rejected by the API server's strict
  field validation, which kubectl uses by default, and otherwise pruned);
- free-form maps (``dict[str, Any]``) get ``x-kubernetes-preserve-unknown-fields``;
- defaults come from the models themselves (including ``default_factory`` ones, which pydantic's schema
  omits), dumped in wire form without ``None`` values.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter

Schema = dict[str, Any]

_DROP = {"title", "additionalProperties", "$defs", "default"}


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def _models_by_name(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from ``model``, by class name (the key pydantic uses in ``$defs``)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(ann: Any) -> None:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if ann.__name__ in found:
                return
            found[ann.__name__] = ann
            # a model whose fields name a class defined after it keeps those annotations unresolved until
            # it is rebuilt (pydantic does so at its first validation): without this, the defaults of such
            # fields would be in the CRD or not depending on whether a run had been parsed before
            ann.model_rebuild()
            for field in ann.model_fields.values():
                visit(field.annotation)
        for arg in typing.get_args(ann):
            visit(arg)

    visit(model)
    return found


class _Converter:
    def __init__(self, root: type[BaseModel], *, with_defaults: bool):
        self.defs = root.model_json_schema(by_alias=True, mode="validation").get("$defs", {})
        self.root_schema = root.model_json_schema(by_alias=True, mode="validation")
        self.models = _models_by_name(root)
        self.with_defaults = with_defaults

    def convert(self, node: Schema, model: type[BaseModel] | None = None) -> Schema:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            inlined = self.convert(self.defs[name], self.models.get(name))
            if "description" in node:
                inlined["description"] = node["description"]
            return inlined
        for key in ("anyOf", "oneOf"):
            if key in node:
                options = [o for o in node[key] if o.get("type") != "null"]
                if len(options) != 1:
                    raise ValueError(f"cannot express {key} of {options} as a structural schema")
                merged = {**{k: v for k, v in node.items() if k != key}, **options[0]}
                if "$ref" in options[0]:
                    merged = {**self.convert(options[0]), **{k: v for k, v in node.items() if k in ("description",)}}
                    return merged
                return self.convert(merged)
        out: Schema = {}
        for key, value in node.items():
            if key in _DROP:
                continue
            if key == "const":
                out["enum"] = [value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                out[key] = True
            elif key == "properties":
                out["properties"] = {name: self.convert(sub) for name, sub in value.items()}
            elif key == "items":
                out["items"] = self.convert(value)
            else:
                out[key] = value
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = self.convert(extra)
        elif extra is True and "properties" not in node:
            out["x-kubernetes-preserve-unknown-fields"] = True
        if "enum" in out and "type" not in out:
            out["type"] = "string"
        if model is not None and self.with_defaults:
            self._defaults(out, model)
        return out

    def _defaults(self, out: Schema, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            alias = field.alias or name
            if field.is_required() or alias not in out.get("properties", {}):
                continue
            value = field.get_default(call_default_factory=True)
            if value is None:
                continue
            adapter: TypeAdapter[Any] = TypeAdapter(field.annotation)  # type: ignore[arg-type]
            wire = adapter.dump_python(value, mode="json", by_alias=True)
            out["properties"][alias]["default"] = _strip_none(wire)

    def root(self, model: type[BaseModel]) -> Schema:
        return self.convert(self.root_schema, model)


def structural_schema(model: type[BaseModel], *, with_defaults: bool = True) -> Schema:
    """The OpenAPI v3 structural schema of ``model`` (its fields by wire name)."""
    return _Converter(model, with_defaults=with_defaults).root(model)
