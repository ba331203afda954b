"""OpenAPI post-processing: every error status an operation can answer is in the schema, with its body.

drf-spectacular documents only the success response of each operation; generated clients treat an
undocumented status as a protocol error. What the API answers, and so what is added here (never
replacing a response a view documented itself):

  400  the request is invalid: every field (body or query parameter) maps to its messages;
       operations that take a body, filters or pagination
  401  no credentials, or a token that is unknown, expired or of an inactive user
  403  authenticated, but not allowed (role, tenant, read-only token, quota, CSRF)
  404  the object in the path does not exist or is not visible to the caller; also a reference in
       the body to an object that does not exist or is not visible
  409  a conflict with the current state: a unique name taken, a protected object, a stale
       generation given in the body or query, a value the stored state refuses (a backend cap
       below the listener's backends)
  412  a stale `If-Match` generation (operations that take If-Match)
  415  a body that is not JSON (operations that take a body)
  429  throttled: wait `Retry-After` seconds

String query parameters and request-body strings also get the pattern that forbids NUL
characters: Django refuses them (PostgreSQL cannot store them), so a schema that allowed them
would promise what the API cannot accept.
"""

from __future__ import annotations

import copy
from typing import Any

NO_NUL_PATTERN = "^[^\\u0000]*$"
IP_ADDRESS = {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}
# Request fields that take an IP address (validated as one; the serializers say only "string").
IP_FIELDS = {
    ("AgentNodeRequest", "address"), ("BackendItemRequest", "address"), ("BackendRequest", "address"),
    ("HostRequest", "management_address"), ("VipRequest", "address"),
}
# What serializers validate but drf-spectacular cannot see (a validate_<field> method).
FIELD_SCHEMA_EXTRAS: dict[tuple[str, str], dict] = {
    ("HostRequest", "roles"): {"uniqueItems": True},
    # a JSON field: a non-empty list of firmware names (duplicates are folded), optional on create
    ("ConversionPolicyRequest", "supported_firmware"): {
        "type": "array", "items": {"type": "string", "enum": ["bios", "uefi"]}, "minItems": 1,
    },
}
# Request fields the serializer marks required although the model gives a default.
OPTIONAL_FIELDS = {("ConversionPolicyRequest", "supported_firmware")}
WRITE_METHODS = {"post", "put", "patch"}

ERROR_SCHEMA = {
    "type": "object",
    "description": "An error: `detail` says what was wrong; `code` is a stable machine-readable name.",
    "properties": {"detail": {"type": "string"}, "code": {"type": "string"}},
    "required": ["detail"],
}
FIELD_ERRORS_SCHEMA = {
    "type": "object",
    "description": (
        "What was wrong, by field: each key is a field or query parameter (or `detail` / "
        "`non_field_errors`) and its value the messages (nested for nested fields)."
    ),
    "additionalProperties": {},
}
CONFLICT_SCHEMA = {
    "type": "object",
    "description": (
        "A conflict with the current state: `detail` and `code` (`protected`, `stale_generation` with "
        "`expected_generation` and `current_generation`), or, by field with its message, a unique "
        "value that is already taken or a value the stored state refuses (a listener port in "
        "use, a backend cap below the listener's backends, more backends than its cap)."
    ),
    "additionalProperties": {},
}

ERROR_RESPONSES: dict[str, dict[str, Any]] = {
    "400": {"description": "Invalid request.", "schema": {"$ref": "#/components/schemas/FieldErrors"}},
    "401": {"description": "Not authenticated.", "schema": {"$ref": "#/components/schemas/Error"}},
    "403": {"description": "Not allowed.", "schema": {"$ref": "#/components/schemas/Error"}},
    "404": {"description": "Not found, or not visible to you.",
            "schema": {"$ref": "#/components/schemas/NotFound"}},
    "409": {"description": "Conflict with the current state.",
            "schema": {"$ref": "#/components/schemas/Conflict"}},
    "412": {"description": "If-Match is stale.", "schema": {"$ref": "#/components/schemas/Conflict"}},
    "415": {"description": "Unsupported media type.", "schema": {"$ref": "#/components/schemas/Error"}},
    "429": {"description": "Too many requests.", "schema": {"$ref": "#/components/schemas/Error"},
            "headers": {"Retry-After": {"description": "Seconds to wait before retrying.",
                                        "schema": {"type": "integer"}}}},
}


def _codes_for(path: str, method: str, operation: dict) -> list[str]:
    parameters = operation.get("parameters", [])
    has_query = any(p.get("in") == "query" for p in parameters)
    has_body = "requestBody" in operation
    codes = ["401", "403", "429"]
    if has_body or has_query or method in WRITE_METHODS or method == "delete":
        codes.append("400")
    if "{" in path or has_body:
        codes.append("404")
    if method in WRITE_METHODS or method == "delete":
        codes.append("409")
    if any(p.get("in") == "header" and p.get("name", "").lower() == "if-match" for p in parameters):
        codes.append("412")
    if has_body:
        codes.append("415")
    return codes


def _forbid_nul(schema: dict) -> None:
    """Add the no-NUL pattern to free-text strings of a (request) schema, recursively."""
    if not isinstance(schema, dict):
        return
    if (schema.get("type") == "string" and "format" not in schema and "enum" not in schema
            and "pattern" not in schema):
        schema["pattern"] = NO_NUL_PATTERN
    for key in ("properties",):
        for child in schema.get(key, {}).values():
            _forbid_nul(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _forbid_nul(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for child in schema.get(key, []):
            _forbid_nul(child)


IF_MATCH_PATTERN = '^(W/)?"?[0-9]{1,18}"?$'  # what parse_preconditions accepts
# Fields fixed at creation: an update that changes them is refused, so update bodies omit them.
# (A VIP's tenant stays: a full update must name it, and naming another is a 400 like any bad value.)
FIXED_AT_CREATION = {"/api/vips/{id}/": ("VipRequest", ("address",))}


def _update_bodies_without_fixed_fields(result: dict, schemas: dict) -> None:
    for path, (component, fields) in FIXED_AT_CREATION.items():
        item = result.get("paths", {}).get(path, {})
        for method, prefix in (("put", ""), ("patch", "Patched")):
            source = schemas.get(prefix + component)
            operation = item.get(method)
            if source is None or operation is None or "requestBody" not in operation:
                continue
            name = prefix + component.removesuffix("Request") + "UpdateRequest"
            derived = copy.deepcopy(source)
            for field in fields:
                derived.get("properties", {}).pop(field, None)
                if field in derived.get("required", []):
                    derived["required"].remove(field)
            derived["description"] = f"{', '.join(fields)} cannot change after creation."
            schemas[name] = derived
            for media in operation["requestBody"].get("content", {}).values():
                media["schema"] = {"$ref": f"#/components/schemas/{name}"}


def add_error_responses(result: dict, generator, request, public) -> dict:
    """drf-spectacular POSTPROCESSING_HOOKS entry."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    _update_bodies_without_fixed_fields(result, schemas)
    schemas.setdefault("Error", ERROR_SCHEMA)
    schemas.setdefault("NotFound", FIELD_ERRORS_SCHEMA | {
        "description": "`detail` for the object in the path, or the body field whose reference is unknown.",
    })
    schemas.setdefault("FieldErrors", FIELD_ERRORS_SCHEMA)
    schemas.setdefault("Conflict", CONFLICT_SCHEMA)
    for name, component in schemas.items():
        if name.endswith("Request"):
            for prop, field in component.get("properties", {}).items():
                if (name, prop) in OPTIONAL_FIELDS and prop in component.get("required", []):
                    component["required"].remove(prop)
                extra = FIELD_SCHEMA_EXTRAS.get((name.removeprefix("Patched"), prop))
                if extra:
                    field.update(extra)
                if (name.removeprefix("Patched"), prop) in IP_FIELDS:
                    keep = {k: field[k] for k in ("nullable", "description", "writeOnly") if k in field}
                    component["properties"][prop] = {**IP_ADDRESS, **keep}
            _forbid_nul(component)
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "header" and parameter.get("name", "").lower() == "if-match":
                    parameter["schema"] = {"type": "string", "pattern": IF_MATCH_PATTERN}
                if parameter.get("in") == "query":  # (RejectNulInQueryMiddleware refuses NUL)
                    _forbid_nul(parameter.get("schema", {}))
                takes_ip = parameter.get("name") in ("address", "management_address")
                # (a P2V machine's address may be a host name)
                if parameter.get("in") == "query" and takes_ip and not path.startswith("/api/p2v/"):
                    parameter["schema"] = dict(IP_ADDRESS)
            responses = operation["responses"]
            for code in _codes_for(path, method, operation):
                if code in responses:
                    continue
                spec = ERROR_RESPONSES[code]
                response = {"description": spec["description"],
                            "content": {"application/json": {"schema": copy.deepcopy(spec["schema"])}}}
                if "headers" in spec:
                    response["headers"] = copy.deepcopy(spec["headers"])
                responses[code] = response
    return result
