"""Guides for the guided-decoding tests (in-process, Triton, OpenAI) and the independent check of a
reply against its guide: jsonschema on the parsed JSON, or the regex over the whole reply."""

from __future__ import annotations

import json
import re

import jsonschema

# every value bounded (lengths, counts, ranges): a grammar cannot make an unsure model end an unbounded
# string or number, and a random-weight model is as unsure as models get
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
INVOICE = {  # nested objects, an array of objects, numbers and booleans
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
        "paid": {"type": "boolean"},
        "customer": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}}, "required": ["city", "zip"], "additionalProperties": False},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {"type": "object", "properties": {"sku": {"enum": ["a1", "b2", "c3"]}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}, "price": {"type": "number", "minimum": 0, "maximum": 999}}, "required": ["sku", "qty", "price"], "additionalProperties": False},
        },
    },
    "required": ["id", "paid", "customer", "items"],
    "additionalProperties": False,
}
TAGS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}
DATE_TIME = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d) [0-2]\d:[0-5]\d"
GUIDES = [("json_schema", json.dumps(PERSON)), ("json_schema", json.dumps(INVOICE)), ("json_schema", json.dumps(TAGS)), ("regex", DATE_TIME)]


def satisfies(guide_type: str, guide: str, text: str) -> bool:
    """The independent check: jsonschema on the parsed reply, or the regex over all of it."""
    if guide_type == "regex":
        return re.fullmatch(guide, text) is not None
    try:
        jsonschema.validate(json.loads(text), json.loads(guide))
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True
