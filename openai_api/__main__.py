"""python -m openai_api: the OpenAI-compatible server in front of a running Triton."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from openai_api.server import serve
from openai_api.settings import API_KEY_ENV, Settings

DEFAULTS = Settings()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openai_api",
        description="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health) for the Triton internvl ensemble.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--triton-url", default=DEFAULTS.triton_url, help="Triton's gRPC address (host:port)")
    p.add_argument("--triton-model", default=DEFAULTS.triton_model, help="the ensemble model to call")
    p.add_argument("--host", default=DEFAULTS.host, help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULTS.port, help="port to listen on")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients must send; None: the checkpoint directory's name as Triton's preprocess model reports it, else 'internvl'",
    )
    p.add_argument(
        "--allow-image-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host whose http(s) image URLs are fetched (repeatable); none: remote image URLs are refused",
    )
    p.add_argument("--max-image-bytes", type=int, default=DEFAULTS.max_image_bytes, help="size limit of a fetched image, bytes")
    p.add_argument("--image-fetch-timeout", type=float, default=DEFAULTS.image_fetch_timeout, help="time limit of an image fetch, seconds")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULTS.max_request_bytes,
        help="largest request body, bytes, refused (413) while it is read; None: from the build's limits in Triton's "
        "preprocess config, ceil(max_request_bytes × 4/3) + 1 MiB (its images or video as base64, plus the messages' text), "
        "and until Triton answers a request with a body gets 503",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"a key clients must send as 'Authorization: Bearer KEY' on /v1/* (repeatable; {API_KEY_ENV} adds one); "
        "none: /v1/* is open to anyone who reaches the port",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    return p


def settings_of(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    return Settings(
        triton_url=args.triton_url,
        triton_model=args.triton_model,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        allow_image_hosts=tuple(args.allow_image_host),
        max_image_bytes=args.max_image_bytes,
        image_fetch_timeout=args.image_fetch_timeout,
        max_request_bytes=args.max_request_bytes,
        api_keys=(*args.api_key, *filter(None, [environ.get(API_KEY_ENV)])),
    )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        serve(settings_of(args, os.environ), log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass


if __name__ == "__main__":
    main()
