"""Hold HTTP responses to an OpenAPI 3.1 document: the response that the document gives for the
request's path, method and status must exist, its required headers must be sent, and its JSON
body must validate against its schema (JSON Schema 2020-12, `$ref`s resolved within the
document)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT202012

# The document's name for resolving its own `$ref`s.
URI = "urn:apppass:openapi"

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _escape(token: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


@dataclass(frozen=True)
class Checked:
    """A response that passed: where in the document it was checked against."""

    template: str | None
    method: str
    status: int
    pointer: str  # the response object's JSON pointer


def _said(error: ValidationError) -> str:
    """Where a body broke which rule; the message only where it names keys, not values."""
    where = error.json_path
    rule = "/".join(map(str, error.schema_path))
    names_keys = error.validator in ("required", "additionalProperties")
    return f"{where}: breaks {rule}" + (f" ({error.message})" if names_keys else "")


class OpenApi:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.registry = Registry().with_resource(URI, DRAFT202012.create_resource(document))
        self.resolver = self.registry.resolver(URI)

    def template_for(self, path: str) -> str | None:
        """The document's path template a concrete path (no query) matches, if any."""
        segments = path.split("/")
        for template in self.document["paths"]:
            parts = template.split("/")
            if len(parts) == len(segments) and all(
                (p.startswith("{") and s) or p == s for p, s in zip(parts, segments, strict=True)
            ):
                return template
        return None

    def response_pointer(self, method: str, path: str, status: int) -> str:
        """The JSON pointer of the response the document gives; AssertionError if none.
        A path the document does not have must be its NotFound response; a method a path does
        not take its MethodNotAllowed."""
        template = self.template_for(path.split("?", 1)[0])
        if template is None:
            assert status == 404, f"{method} {path}: not in the document, yet answered {status}"
            return "/components/responses/NotFound"
        operations = self.document["paths"][template]
        if method.lower() not in operations:
            assert status == 405, f"{method} {template}: not in the document, answered {status}"
            return "/components/responses/MethodNotAllowed"
        pointer = f"/paths/{_escape(template)}/{method.lower()}/responses/{status}"
        responses = operations[method.lower()]["responses"]
        assert str(status) in responses, f"{method} {template}: status {status} is undocumented"
        return pointer

    def resolve(self, pointer: str) -> tuple[str, dict[str, Any]]:
        """Follow `$ref`s from a pointer: (the pointer of the object itself, the object)."""
        node = self.resolver.lookup(f"{URI}#{pointer}").contents
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            assert ref.startswith("#/"), f"only local references are used: {ref}"
            pointer = ref[1:]
            node = self.resolver.lookup(f"{URI}{ref}").contents
        return pointer, node

    def check(
        self, method: str, path: str, status: int, headers: dict[str, str], body: bytes
    ) -> Checked:
        """Hold one response to the document; AssertionError saying what is wrong, never with
        a value from the body (it may hold a code shown once)."""
        __tracebackhide__ = True  # pytest: do not print this frame's arguments (the body)
        pointer, response = self.resolve(self.response_pointer(method, path, status))
        for name, header in response.get("headers", {}).items():
            _, header = self.resolve(f"{pointer}/headers/{_escape(name)}")
            value = headers.get(name.lower())
            if header.get("required"):
                assert value is not None, f"{method} {path} {status}: no {name} header"
            if value is not None and "schema" in header:
                Draft202012Validator(header["schema"]).validate(value)
        content = response.get("content", {})
        if not content:
            assert body == b"", f"{method} {path} {status}: a body the document does not give"
            return Checked(self.template_for(path), method, status, pointer)
        media = headers.get("content-type", "").split(";")[0].strip()
        assert media in content, f"{method} {path} {status}: Content-Type {media!r} undocumented"
        data = json.loads(body)
        schema = {"$ref": f"{URI}#{pointer}/content/{_escape(media)}/schema"}
        validator = Draft202012Validator(schema, registry=self.registry)
        errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
        assert not errors, f"{method} {path} {status}: " + "; ".join(map(_said, errors))
        return Checked(self.template_for(path), method, status, pointer)

    def references(self) -> list[str]:
        """Every `$ref` in the document (each must resolve)."""
        found: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if isinstance(node.get("$ref"), str):
                    found.append(node["$ref"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(self.document)
        return found

    def operations(self) -> set[tuple[str, str]]:
        """(METHOD, template) of every operation."""
        return {
            (method.upper(), template)
            for template, item in self.document["paths"].items()
            for method in item
            if method in METHODS
        }
