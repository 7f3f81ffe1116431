"""Triton adapter: the images of several requests → one ONNX Runtime run → a prompt table per request,
with each tile's token count (InternVL3.5-Flash routes each request's tiles on their own).

Images arrive encoded (image_data, with their content keys and the tile budget), or as a video's
sampled frames (video_data and frame_indices): the vision-feature cache (engine/image_features.py)
serves those it holds, and the others are decoded, tiled and encoded here, so a cached image or
frame costs neither preprocessing nor the encoder. pixel_values (already tiled)
are encoded as they are.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.config import ModelConfig
from engine.image_features import ImageFeatureSource, RequestImages
from engine.video import VideoLimits
from engine.video_frames import video_frames
from engine.vision import OnnxVisionEncoder
from triton_repo import allocator, pb


class TritonPythonModel:
    def initialize(self, args):
        allocator.stub_settings()  # before this stub allocates anything big
        config, params = pb.model_parameters(args)
        self.dtypes = pb.output_dtypes(config)
        model_config = ModelConfig.from_pretrained(params["checkpoint"])
        self.encoder = OnnxVisionEncoder(params["onnx_file"], flash=model_config.flash)
        self.images = ImageFeatureSource.of(self.encoder, model_config, int(params["cache_bytes"]))
        self.hidden_size = int(params["hidden_size"])
        self.video_limits = VideoLimits.from_parameters(params)
        self.families = [  # must outlive their metrics
            pb_utils.MetricFamily(
                name="internvl_vision_cache_hits_total", description="images served from the vision-feature cache", kind=pb_utils.MetricFamily.COUNTER
            ),
            pb_utils.MetricFamily(
                name="internvl_vision_cache_misses_total", description="images decoded, tiled and encoded", kind=pb_utils.MetricFamily.COUNTER
            ),
            pb_utils.MetricFamily(
                name="internvl_vision_encoded_tiles_total", description="tiles run through the vision encoder", kind=pb_utils.MetricFamily.COUNTER
            ),
            pb_utils.MetricFamily(
                name="internvl_vision_cache_bytes", description="bytes of features the vision-feature cache holds", kind=pb_utils.MetricFamily.GAUGE
            ),
            # Triton's nv_inference_compute_infer_duration_us gives every request of a batch the whole
            # batch's time; this is the encoder's own busy time, once per execution
            pb_utils.MetricFamily(
                name="internvl_vision_encode_duration_us",
                description="cumulative wall time of the encoder's executions (decode, tiling, encoding)",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
        ]
        self.hits, self.misses, self.encoded_tiles, self.bytes, self.busy = (family.Metric() for family in self.families)

    def execute(self, requests):
        responses: list = [None] * len(requests)
        tiled, encoded = [], []  # (request index, pixel_values) / (request index, RequestImages)
        for i, request in enumerate(requests):
            try:
                pixels = pb.item(request, "pixel_values")  # [T_i, 3, S, S]
                images = pb.strings(request, "image_data")
                video = pb.strings(request, "video_data")
                if video:  # a video request: its sampled frames are its images
                    images = video_frames(video[0], pb.item(request, "frame_indices").tolist(), self.video_limits)
                if len(pixels):
                    tiled.append((i, pixels))
                elif images:
                    keys = [key.decode() for key in pb.strings(request, "image_keys")]
                    encoded.append((i, RequestImages(images, keys, int(pb.scalar(request, "tile_budget")))))
            except Exception as error:  # noqa: BLE001 — answer this request, batch the others
                responses[i] = pb.error_response(error)
        results, started = {}, time.perf_counter()
        try:
            if tiled:
                results.update(zip((i for i, _ in tiled), self.encoder.encode_requests([p for _, p in tiled])))
                self.encoded_tiles.increment(sum(len(p) for _, p in tiled))
            if encoded:
                cache = self.images.cache
                before = cache.hits, cache.misses, self.images.encoded_tiles
                found = self.images.features([r for _, r in encoded])
                for (i, _), features in zip(encoded, found):
                    results[i] = features if isinstance(features, Exception) else (features.table, features.tile_tokens)
                self.encoded_tiles.increment(self.images.encoded_tiles - before[2])
                self.hits.increment(cache.hits - before[0])
                self.misses.increment(cache.misses - before[1])
                self.bytes.set(cache.bytes)
        except Exception as error:  # noqa: BLE001
            return [r or pb.error_response(error) for r in responses]
        finally:
            self.busy.increment(round((time.perf_counter() - started) * 1e6))
        empty = (np.zeros((0, self.hidden_size), np.float32), np.zeros(0, np.int32))
        d = self.dtypes
        for i in range(len(requests)):
            if responses[i] is not None:
                continue
            result = results.get(i, empty)
            if isinstance(result, Exception):
                responses[i] = pb.error_response(result)
                continue
            table, tile_tokens = result
            responses[i] = pb_utils.InferenceResponse(
                [pb.tensor("prompt_embedding_table", table, d["prompt_embedding_table"]), pb.tensor("tile_tokens", tile_tokens, d["tile_tokens"])]
            )
        return responses
