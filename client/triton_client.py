"""A client for the `internvl` ensemble: gRPC bidirectional streaming or HTTP generate / generate_stream.

    client = InternVLClient("127.0.0.1:8001")                      # gRPC
    client = InternVLClient("127.0.0.1:8000", protocol="http")
    for delta in client.stream("Describe the image.", images=[open("a.jpg", "rb").read()]):
        print(delta, end="")
"""

from __future__ import annotations

import base64
import json
import queue
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Turn = tuple[str, str]


class ServerError(RuntimeError):
    """The server answered the request with an error (the message is the server's)."""


@dataclass
class Request:
    question: str
    images: Sequence[bytes | str | Path] = ()
    max_tokens: int = 256
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
    extra: dict = field(default_factory=dict)

    def image_bytes(self) -> list[bytes]:
        return [Path(i).read_bytes() if isinstance(i, (str, Path)) else bytes(i) for i in self.images]

    def fields(self, stream: bool) -> dict[str, tuple[str, object]]:
        """name -> (Triton dtype, value) for every input this request sets."""
        f = {"text_input": ("BYTES", [self.question]), "max_tokens": ("INT32", [self.max_tokens]), "stream": ("BOOL", [stream])}
        optional = {
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
        }
        for name, (dtype, value) in {**optional, **self.extra}.items():
            if value is not None:
                f[name] = (dtype, value if isinstance(value, list) else [value])
        return f


class InternVLClient:
    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", model: str = "internvl", timeout: float = 600):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout = url, protocol, model, timeout

    def stream(self, question: str, images: Sequence = (), keep_empty: bool = False, **kwargs) -> Iterator[str]:
        """Text deltas as the server produces them (one response per generated token; keep_empty also
        yields the responses whose token completed no character yet)."""
        request = Request(question, images, **kwargs)
        deltas = self._grpc(request, True) if self.protocol == "grpc" else self._http_stream(request)
        yield from (d for d in deltas if d or keep_empty)

    def chat(self, question: str, images: Sequence = (), stream: bool = False, **kwargs) -> str:
        """The whole reply; stream=False asks the server for a single response."""
        request = Request(question, images, **kwargs)
        if stream:
            return "".join(self.stream(question, images, **kwargs))
        if self.protocol == "grpc":
            return "".join(self._grpc(request, False))
        return self._http_generate(request)

    # gRPC: bidirectional stream; a decoupled model cannot answer a plain unary infer.
    def _grpc(self, request: Request, stream: bool) -> Iterator[str]:
        import tritonclient.grpc as grpcclient

        inputs = []
        for name, (dtype, value) in request.fields(stream).items():
            array = np.array([value], dtype=object if dtype == "BYTES" else _NUMPY[dtype])
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        try:
            client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=self.timeout)
            client.async_stream_infer(self.model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
            while True:
                result, error = responses.get(timeout=self.timeout)
                if error is not None:
                    raise ServerError(_message(error))
                text = result.as_numpy("text_output")
                if text is not None:
                    yield b"".join(text.reshape(-1)).decode("utf-8")
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return
        finally:
            client.stop_stream(cancel_requests=True)
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
        import urllib.error
        import urllib.request

        url = f"http://{self.url}/v2/models/{self.model}/{endpoint}"
        http_request = urllib.request.Request(url, self._http_body(request, stream), {"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(http_request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ServerError(_message(e.read().decode("utf-8", "replace"))) from None

    def _http_generate(self, request: Request) -> str:
        with self._http_post("generate", request, False) as response:
            return json.loads(response.read())["text_output"]

    def _http_stream(self, request: Request) -> Iterator[str]:
        with self._http_post("generate_stream", request, True) as response:
            for line in response:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise ServerError(_message(event["error"]))
                if "text_output" in event:
                    yield event["text_output"]


_NUMPY = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}


def _message(error) -> str:
    """One clear line from a Triton error (gRPC exception, HTTP JSON body, or SSE error string)."""
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    try:
        text = json.loads(text).get("error", text)
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(text.split())
