"""The server's configuration (the CLI flags of `python -m openai_api`)."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20
API_KEY_ENV = "INTERNVL_API_KEY"  # one key, added to the --api-key ones (as vLLM's VLLM_API_KEY)


@dataclass(frozen=True)
class Settings:
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "internvl"
    host: str = "127.0.0.1"
    port: int = 9000
    served_model_name: str | None = None  # None: the checkpoint directory's name, as Triton reports it
    allow_image_hosts: tuple[str, ...] = ()
    max_image_bytes: int = 20 * MIB
    image_fetch_timeout: float = 10.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: /v1/* is open
    max_request_bytes: int | None = None  # None: from Triton's limits (openai_api/limits.py RequestLimits.body_bytes)
