"""A client for the `internvl` ensemble: gRPC bidirectional streaming or HTTP generate / generate_stream.

    client = InternVLClient("127.0.0.1:8001")                      # gRPC
    client = InternVLClient("127.0.0.1:8000", protocol="http")
    for delta in client.stream("Describe the image.", images=[open("a.jpg", "rb").read()]):
        print(delta, end="")

Errors: `SamplingParamError` (a ValueError) for invalid sampling values, checked with the server's own
rules (engine/sampling_params.py) before anything is sent; `ServerUnavailable` (a ConnectionError)
when no server answers at the URL; `ServerError` with the server's one-line message otherwise.
"""

from __future__ import annotations

import base64
import json
import queue
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.protocol import input_array, stop_request, strip_error_prefix
from engine.sampling_params import SamplingParamError, SamplingParams

Turn = tuple[str, str]

__all__ = ["InternVLClient", "NotTriton", "Reply", "Request", "SamplingParamError", "ServerError", "ServerUnavailable", "TokenLogprob"]


class ServerError(RuntimeError):
    """The server answered the request with an error (the message is the server's)."""


class ServerUnavailable(ConnectionError):
    """Nothing that speaks the protocol answers at the URL (no server, wrong port, or it went away)."""

    def __init__(self, url: str, protocol: str, detail: str = ""):
        self.url, self.protocol, self.detail = url, protocol, detail
        super().__init__(f"no server answers at {url}")


class NotTriton(ServerUnavailable):
    """An HTTP server answers at the URL, but not Triton's (the OpenAI server's port, the metrics port)."""

    def __init__(self, url: str, status: int, body: str):
        super().__init__(url, "http", f"HTTP {status}: {body[:200]}")
        self.args = (
            f"{url} is not Triton's HTTP port: it answered HTTP {status} ({body.strip()[:80]}) to Triton's generate "
            "endpoint (Triton's HTTP port is 8000 by default, its gRPC port 8001; the OpenAI server answers /v1 on 9000)",
        )


@dataclass
class Request:
    question: str
    images: Sequence[bytes | str | Path] = ()
    max_tokens: int | None = 256  # None: up to the deployment's context length
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    min_tokens: int | None = None  # stop token ignored until this many (fixed output lengths for benchmarks)
    stop: Sequence[str] = ()
    max_tiles: int | None = None
    history: Sequence[Turn] | None = None
    system_prompt: str | None = None
    guide_type: str | None = None  # structured output: json | json_schema | regex | ebnf_grammar
    guide: str | None = None  # the schema (JSON text) / regex / grammar
    logprobs: bool = False  # each reply token's log probability (Reply.logprobs)
    top_logprobs: int | None = None  # and the most likely tokens at each step (0-20, CPU only)
    extra: dict = field(default_factory=dict)

    def check(self) -> SamplingParams:
        """The sampling values by the server's rules (TensorRT-LLM request semantics); raises
        SamplingParamError with the message the server would give."""
        return SamplingParams.from_request(
            1 if self.max_tokens is None else self.max_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty,
            self.seed, self.min_tokens, guide_type=self.guide_type, guide=self.guide, logprobs=self.logprobs, top_logprobs=self.top_logprobs,
        )  # fmt: skip

    def image_bytes(self) -> list[bytes]:
        return [Path(i).read_bytes() if isinstance(i, (str, Path)) else bytes(i) for i in self.images]

    def fields(self, stream: bool) -> dict[str, tuple[str, object]]:
        """name -> (Triton dtype, value) for every input this request sets."""
        f = {"text_input": ("BYTES", [self.question]), "stream": ("BOOL", [stream])}
        optional = {
            "max_tokens": ("INT32", self.max_tokens),
            "image_bytes": ("BYTES", self.image_bytes() or None),
            "temperature": ("FP32", self.temperature),
            "top_p": ("FP32", self.top_p),
            "top_k": ("INT32", self.top_k),
            "repetition_penalty": ("FP32", self.repetition_penalty),
            "random_seed": ("UINT64", self.seed),
            "min_tokens": ("INT32", self.min_tokens),
            "stop_words": ("BYTES", list(self.stop) or None),
            "max_tiles": ("INT32", self.max_tiles),
            "history": ("BYTES", None if self.history is None else json.dumps([list(t) for t in self.history])),
            "system_prompt": ("BYTES", self.system_prompt),
            "guided_decoding_guide_type": ("BYTES", self.guide_type),
            "guided_decoding_guide": ("BYTES", self.guide),
            "return_log_probs": ("BOOL", self.logprobs or None),
            "top_logprobs": ("INT32", self.top_logprobs),
        }
        for name, (dtype, value) in {**optional, **self.extra}.items():
            if value is not None:
                f[name] = (dtype, value if isinstance(value, list) else [value])
        return f


class InternVLClient:
    """check_sampling=False sends sampling values unchecked (to test the server's own validation)."""

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        protocol: str = "grpc",
        model: str = "internvl",
        timeout: float = 600,
        check_sampling: bool = True,
    ):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout = _host_port(url, protocol), protocol, model, timeout
        self.check_sampling = check_sampling

    def stream(self, question: str, images: Sequence = (), keep_empty: bool = False, **kwargs) -> Iterator[str]:
        """Text deltas as the server produces them (one response per generated token; keep_empty also
        yields the responses whose token completed no character yet). Invalid sampling values raise
        SamplingParamError here, before the first delta is asked for and before anything is sent."""
        return self._deltas(self._request(question, images, kwargs), keep_empty)

    def chat(self, question: str, images: Sequence = (), stream: bool = False, **kwargs) -> str:
        """The whole reply; stream=False asks the server for a single response."""
        return self.generate(question, images, stream, **kwargs).text

    def generate(self, question: str, images: Sequence = (), stream: bool = False, **kwargs) -> Reply:
        """The whole reply with its reasoning / content split, token counts and finish reason."""
        request = self._request(question, images, kwargs)
        reply = Reply()
        for response in self._responses(request, stream):
            reply.add(response)
        return reply

    def _deltas(self, request: Request, keep_empty: bool) -> Iterator[str]:
        responses = self._responses(request, True)
        try:
            for response in responses:
                delta = response.get("text_output", "")
                if delta or keep_empty:
                    yield delta
        finally:
            responses.close()  # closing the stream early cancels the request

    def _responses(self, request: Request, stream: bool) -> Iterator[dict]:
        if self.protocol == "grpc":
            return self._grpc(request, stream)
        return self._http_stream(request) if stream else iter([self._http_generate(request)])

    def _request(self, question: str, images: Sequence, kwargs: dict) -> Request:
        request = Request(question, images, **kwargs)
        if self.check_sampling:
            request.check()
        return request

    def _error(self, error) -> Exception:
        """A tritonclient error as ServerUnavailable (transport) or ServerError (the server's answer)."""
        if str(getattr(error, "status", lambda: None)()) == "StatusCode.UNAVAILABLE":
            return ServerUnavailable(self.url, self.protocol, _message(error))
        return ServerError(_message(error))

    # gRPC: bidirectional stream; a decoupled model cannot answer a plain unary infer.
    def _grpc(self, request: Request, stream: bool) -> Iterator[str]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, (dtype, value) in request.fields(stream).items():
            array = input_array(dtype, value)
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        request_id, finished = uuid.uuid4().hex, False
        try:
            client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=self.timeout)
            try:
                client.async_stream_infer(self.model, inputs, request_id=request_id, enable_empty_final_response=True)
            except InferenceServerException as e:
                # The stream already failed (e.g. nothing listens at the URL); its callback has the cause.
                try:
                    _, error = responses.get(timeout=10)
                except queue.Empty:
                    error = e
                raise self._error(error) from None
            while True:
                result, error = responses.get(timeout=self.timeout)
                if error is not None:
                    finished = True
                    raise self._error(error)
                response = result.get_response()
                if response.outputs:
                    yield {o.name: _value(o.name, result.as_numpy(o.name)[0]) for o in response.outputs}
                if response.parameters["triton_final_response"].bool_param:
                    finished = True
                    return
        finally:
            if not finished:  # closed early: the engine slot is freed by a stop request (llm model.py)
                _send_stop(client, request_id, grpcclient, responses)
            # Cancelling a finished ensemble stream leaves ~100 KiB in tritonserver 2.51 (docs/API.md
            # "Load and soak"): close it gracefully, cancel only what is still running.
            client.stop_stream(cancel_requests=not finished)
            client.close()

    # HTTP: the generate extension (JSON in; one JSON response or server-sent events out).
    def _http_body(self, request: Request, stream: bool) -> bytes:
        body = {}
        for name, (_, value) in request.fields(stream).items():
            if name == "image_bytes":
                value = [base64.b64encode(v).decode("ascii") for v in value]
            body[name] = value if len(value) > 1 or name in ("image_bytes", "stop_words") else value[0]
        return json.dumps(body).encode()

    def _http_post(self, endpoint: str, request: Request, stream: bool):
        import http.client
        import urllib.error
        import urllib.request

        url = f"http://{self.url}/v2/models/{self.model}/{endpoint}"
        http_request = urllib.request.Request(url, self._http_body(request, stream), {"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(http_request, timeout=self.timeout)
        except urllib.error.HTTPError as e:  # the server's answer: JSON, or one server-sent event
            body = e.read().decode("utf-8", "replace")
            if e.code == 405 or not _is_triton_error(body):  # 405: tritonserver's metrics port (it has the error shape)
                raise NotTriton(self.url, e.code, body) from None
            raise ServerError(_message(body)) from None
        except urllib.error.URLError as e:  # nothing listens there (refused, unknown host, ...)
            raise ServerUnavailable(self.url, self.protocol, str(e.reason)) from None
        except (http.client.HTTPException, ConnectionError) as e:  # something that does not speak HTTP
            raise ServerUnavailable(self.url, self.protocol, f"{type(e).__name__}: {e}") from None

    def _http_generate(self, request: Request) -> dict:
        with self._http_post("generate", request, False) as response:
            return json.loads(response.read())

    def _http_stream(self, request: Request) -> Iterator[dict]:
        with self._http_post("generate_stream", request, True) as response:
            for line in response:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise ServerError(_message(event["error"]))
                yield event


def _host_port(url: str, protocol: str) -> str:
    """host:port; an HTTP URL may carry its http:// scheme (gRPC takes none)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if protocol == "http" and scheme == "http":
        return rest.rstrip("/")
    if protocol == "http":
        raise ValueError(f"--url {url}: Triton's HTTP endpoint is plain http:// (or host:port)")
    raise ValueError(f"--url {url}: gRPC takes host:port without a scheme (for HTTP, add --http)")


def _is_triton_error(body: str) -> bool:
    """Triton answers errors as {"error": "..."} (generate_stream: one `data: {"error": ...}` event)."""
    text = body.strip().removeprefix("data:").strip()
    try:
        return isinstance(json.loads(text).get("error"), str)
    except (ValueError, AttributeError):
        return False


def _send_stop(client, request_id: str, grpcclient, responses: queue.Queue, timeout: float = 2.0) -> None:
    """Sends the stop request on the stream and waits (up to timeout) for its empty final response."""
    model, inputs, request_id = stop_request(request_id)
    tensors = []
    for name, dtype, value in inputs:
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    try:
        client.async_stream_infer(model, tensors, request_id=request_id, enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            result, error = responses.get(timeout=left)
            if error is not None or (not result.get_response().outputs and result.get_response().parameters["triton_final_response"].bool_param):
                return
    except Exception:  # noqa: BLE001 — the stream is gone (so is the server or the request), or no answer in time
        pass


# outputs with one value per token (gRPC: arrays; HTTP generate: JSON lists, flattened)
PER_TOKEN = ("output_log_probs", "output_tokens", "cum_log_probs", "top_log_probs", "top_tokens")


def _value(name: str, array: np.ndarray):
    """One output of one response (without the batch dim): text (its elements joined), a number, or
    for PER_TOKEN outputs the flat list of values."""
    if name in PER_TOKEN:
        return [v.decode("utf-8") if isinstance(v, bytes) else v.item() for v in array.reshape(-1)]
    if array.dtype == object:
        return b"".join(array.reshape(-1)).decode("utf-8")
    return array.reshape(-1)[0].item()


@dataclass(frozen=True)
class TokenLogprob:
    """A reply token's text (decoded alone), its log probability, and the most likely tokens at its step."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Reply:
    """A whole reply, accumulated from the ensemble's responses (outputs as docs/API.md lists them)."""

    text: str = ""
    reasoning: str = ""
    content: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with logprobs=True: one per generated token
    cum_logprob: float | None = None

    def add(self, response: dict) -> None:
        self.text += response.get("text_output", "")
        self.reasoning += response.get("reasoning_output", "")
        self.content += response.get("content_output", "")
        self.prompt_tokens = response.get("prompt_tokens", self.prompt_tokens)
        self.completion_tokens = response.get("completion_tokens", self.completion_tokens)
        self.finish_reason = response.get("finish_reason") or self.finish_reason
        self.logprobs += token_logprobs(response)
        self.cum_logprob = next(iter(_listed(response.get("cum_log_probs"))), self.cum_logprob)


def token_logprobs(response: dict) -> list[TokenLogprob]:
    """The per-token log probabilities of one response (empty when it carries none)."""
    tokens, logprobs = _listed(response.get("output_tokens")), _listed(response.get("output_log_probs"))
    top_tokens, top_logprobs = _listed(response.get("top_tokens")), _listed(response.get("top_log_probs"))
    k = len(top_tokens) // len(tokens) if tokens else 0
    tops = [tuple(zip(top_tokens[i * k : (i + 1) * k], top_logprobs[i * k : (i + 1) * k])) for i in range(len(tokens))]
    return [TokenLogprob(token, logprob, top) for token, logprob, top in zip(tokens, logprobs, tops)]


def _listed(value) -> list:
    """HTTP generate gives a one-value output as the value itself."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _message(error) -> str:
    """One clear line from a Triton error: a gRPC exception, an HTTP JSON body `{"error": ...}`, or a
    server-sent event `data: {"error": ...}` (generate_stream's error body). Drops Triton's
    "in ensemble 'internvl', " prefix: the client asked the ensemble."""
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    text = text.strip()
    if text.startswith("data:"):  # SSE framing
        text = text[len("data:") :].strip()
    try:
        text = json.loads(text).get("error", text)
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(strip_error_prefix(str(text)).split())
