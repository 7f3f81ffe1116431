"""Triton adapter: pixel_values of several requests → one ONNX Runtime run → prompt tables per request."""

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.vision import OnnxVisionEncoder
from triton_repo import pb


class TritonPythonModel:
    def initialize(self, args):
        config, params = pb.model_parameters(args)
        self.dtypes = pb.output_dtypes(config)
        self.encoder = OnnxVisionEncoder(params["onnx_file"])
        self.tokens_per_tile = int(params["tokens_per_tile"])
        self.hidden_size = int(params["hidden_size"])

    def execute(self, requests):
        pixels, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                pixels.append((i, pb.item(request, "pixel_values")))  # [T_i, 3, S, S]
            except Exception as error:  # noqa: BLE001 — answer this request, batch the others
                responses[i] = pb.error_response(error)
        tiles = [p for _, p in pixels if len(p)]
        try:
            table = self.encoder.encode(tiles[0] if len(tiles) == 1 else np.concatenate(tiles)) if tiles else None  # [ΣT·Q, H]
        except Exception as error:  # noqa: BLE001
            return [r or pb.error_response(error) for r in responses]
        d, row = self.dtypes, 0
        for i, p in pixels:
            rows = len(p) * self.tokens_per_tile
            part = table[row : row + rows] if rows else np.zeros((0, self.hidden_size), np.float32)
            row += rows
            responses[i] = pb_utils.InferenceResponse([pb.tensor("prompt_embedding_table", part, d["prompt_embedding_table"])])
        return responses
