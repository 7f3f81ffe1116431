"""The request body of POST /v1/chat/completions (OpenAI's chat API, the fields this server reads).

Unknown fields are ignored, as OpenAI clients send extras; wrong JSON types fail FastAPI's
validation (422). Value ranges are checked later (400) by the rules Triton applies.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: Literal["low", "high", "auto"] | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Lenient):
    url: str


class VideoPart(_Lenient):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatTemplateKwargs(_Lenient):
    enable_thinking: bool | None = None


class JSONSchemaFormat(_Lenient):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # `schema` would shadow pydantic's own attribute
    strict: bool | None = None  # the schema is always enforced, strict or not (as vLLM does)


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Lenient):
    """vLLM's extension (vllm/sampling_params.py StructuredOutputsParams): one of these per request."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # xgrammar's EBNF, root rule `root`
    json_object: bool | None = None


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    min_tokens: int | None = None  # vLLM's extension: the stop token and stop strings wait this many tokens
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
