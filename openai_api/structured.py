"""Structured output of a chat completion request -> TensorRT-LLM's guide (guided_decoding_guide_type,
guided_decoding_guide), which the ensemble's llm step enforces (engine/llm/guided.py on the CPU).

OpenAI's `response_format`: json_object -> "json" (any JSON value), json_schema -> "json_schema" (the
schema is enforced whether `strict` is set or not, as vLLM does). vLLM's `structured_outputs`
extension, one key per request: json (a schema), regex, choice (one of the strings, exactly),
grammar (xgrammar's EBNF), json_object.
"""

from __future__ import annotations

import json

from openai_api.errors import bad_request
from openai_api.schema import ChatCompletionRequest

Guide = tuple[str, str | None]  # (guide type, guide text)


def requested_guide(body: ChatCompletionRequest) -> Guide | None:
    """Raises a 400 APIError for a structured-output request that asks for none or several things."""
    formats = [guide for guide in (_response_format(body), _structured_outputs(body)) if guide is not None]
    if len(formats) > 1:
        raise bad_request("send response_format or structured_outputs, not both", "structured_outputs")
    return formats[0] if formats else None


def _response_format(body: ChatCompletionRequest) -> Guide | None:
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return "json", None
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
    return "json_schema", json.dumps(response_format.json_schema.schema_)


def _structured_outputs(body: ChatCompletionRequest) -> Guide | None:
    options = body.structured_outputs
    if options is None:
        return None
    given = {name.rstrip("_") for name, value in options if value not in (None, False)}
    if len(given) != 1:
        kinds = "json, regex, choice, grammar, json_object"
        raise bad_request(f"structured_outputs takes exactly one of {kinds}, got {sorted(given) or 'none'}", "structured_outputs")
    if options.json_ is not None:
        schema = options.json_
        return "json_schema", schema if isinstance(schema, str) else json.dumps(schema)
    if options.regex is not None:
        return "regex", options.regex
    if options.choice is not None:
        return "ebnf_grammar", choice_grammar(options.choice)
    if options.grammar is not None:
        return "ebnf_grammar", options.grammar
    return "json", None


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly the choices (xgrammar's string literals take JSON's escapes)."""
    if not choices or not all(choices):
        raise bad_request("structured_outputs.choice must be a list of non-empty strings", "structured_outputs")
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
