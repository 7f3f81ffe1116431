"""Triton adapter: pixel_values of several requests → one ONNX Runtime run → prompt tables per request,
with each tile's token count (InternVL3.5-Flash routes each request's tiles on their own)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.config import ModelConfig
from engine.vision import OnnxVisionEncoder
from triton_repo import allocator, pb


class TritonPythonModel:
    def initialize(self, args):
        allocator.stub_settings()  # before this stub allocates anything big
        config, params = pb.model_parameters(args)
        self.dtypes = pb.output_dtypes(config)
        flash = ModelConfig.from_pretrained(params["checkpoint"]).flash
        self.encoder = OnnxVisionEncoder(params["onnx_file"], flash=flash, max_tiles_per_run=int(params["max_tiles_per_run"]))
        self.hidden_size = int(params["hidden_size"])

    def execute(self, requests):
        pixels, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                pixels.append((i, pb.item(request, "pixel_values")))  # [T_i, 3, S, S]
            except Exception as error:  # noqa: BLE001 — answer this request, batch the others
                responses[i] = pb.error_response(error)
        with_tiles = [(i, p) for i, p in pixels if len(p)]
        try:
            encoded = self.encoder.encode_requests([p for _, p in with_tiles]) if with_tiles else []
        except Exception as error:  # noqa: BLE001
            return [r or pb.error_response(error) for r in responses]
        results = dict(zip((i for i, _ in with_tiles), encoded))
        empty = (np.zeros((0, self.hidden_size), np.float32), np.zeros(0, np.int32))
        d = self.dtypes
        for i, _ in pixels:
            table, tile_tokens = results.get(i, empty)
            responses[i] = pb_utils.InferenceResponse(
                [pb.tensor("prompt_embedding_table", table, d["prompt_embedding_table"]), pb.tensor("tile_tokens", tile_tokens, d["tile_tokens"])]
            )
        return responses
