"""llama.cpp's decode at batch 1 through llama-cpp-python's low-level C API (llama_cpp.llama_cpp), so that
both sides of bench_components/peers.py do the same work per token: one forward pass of one token
(`llama_decode` of a one-token batch) and a greedy argmax over its logits.

Timing: wall time (perf_counter) around each step — llama_decode plus reading the logits and the argmax —
summed over the decode steps only. The prompt's llama_decode (prefill, which also gives the first new
token) is timed apart and excluded, as the engine's prefill step is on our side. llama.cpp's own
counter (llama_perf_context: t_eval_ms over n_eval single-token evals, which excludes the argmax) is
recorded next to it as a cross-check.

Context parameters are llama.cpp's defaults (llama_context_default_params: flash attention "auto", f16
K/V cache) except the thread counts and the context size.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def _api():
    import llama_cpp  # noqa: F401 (the package installs its log callback)
    from llama_cpp import _logger
    from llama_cpp import llama_cpp as C

    _logger.set_verbose(False)  # errors only
    return C


def system_info() -> dict:
    C = _api()
    from importlib.metadata import version

    return {"llama_cpp_python": version("llama-cpp-python"), "system_info": C.llama_print_system_info().decode(errors="replace").strip()}


class LlamaDecoder:
    """One GGUF loaded once, one context; run() restarts from an empty KV cache each time."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        C = self._C = _api()
        C.llama_backend_init()
        model_params = C.llama_model_default_params()
        self.model = C.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = False
        self.ctx = C.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model))
        self.n_ctx = n_ctx
        self.params = {
            "n_ctx": n_ctx,
            "n_threads": threads,
            "n_threads_batch": threads,
            "flash_attn_type": int(params.flash_attn_type),  # -1 auto, 0 off, 1 on
            "type_k": int(params.type_k),  # ggml_type: 1 = f16
            "type_v": int(params.type_v),
        }

    def _decode(self, tokens: list[int]) -> int:
        C = self._C
        array = (C.llama_token * len(tokens))(*tokens)
        rc = C.llama_decode(self.ctx, C.llama_batch_get_one(array, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        """Greedy: prefill `prompt` (its logits give the first new token), then new_tokens - 1 decode steps."""
        C = self._C
        if len(prompt) + new_tokens > self.n_ctx:
            raise ValueError(f"prompt {len(prompt)} + {new_tokens} new tokens > n_ctx {self.n_ctx}")
        C.llama_memory_clear(C.llama_get_memory(self.ctx), True)
        C.llama_perf_context_reset(self.ctx)
        start = time.perf_counter()
        token = self._decode(list(prompt))
        prefill_s = time.perf_counter() - start
        tokens, steps = [token], []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            token = self._decode([token])
            steps.append(time.perf_counter() - start)
            tokens.append(token)
        perf = C.llama_perf_context(self.ctx)
        return {
            "prefill_s": prefill_s,
            "step_s": steps,
            "tokens": tokens,
            "perf_eval_ms": perf.t_eval_ms,
            "perf_n_eval": perf.n_eval,
            "perf_prompt_ms": perf.t_p_eval_ms,
        }

    def close(self) -> None:
        C = self._C
        if self.ctx:
            C.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            C.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

