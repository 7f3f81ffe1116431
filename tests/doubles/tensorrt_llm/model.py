"""Test double of the `tensorrtllm` backend (it needs a GPU) for the GPU llm wrapper's tests: a
decoupled python model with the generated tensorrt_llm config's inputs that answers with tokens
describing what it received, in TensorRT-LLM's output layout (output_ids [1, beams, N],
sequence_length [1, beams]; one response per token when streaming, else one response):
[table rows, image slots marked in prompt_table_extra_ids, distinct extra ids, input length,
 exclude_input_in_output, the first image slot's extra id & 0x7FFFFFFF (0 without one), 100, 101, ...]
cut to request_output_len. Long streams are paced and
honour cancellation, as the real backend does."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

PACED_FROM = 100  # longer streams send a token every 10 ms and end early when cancelled


def _get(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            ids = _get(request, "input_ids")
            table = _get(request, "prompt_embedding_table")  # [1, rows, H]
            extra = _get(request, "prompt_table_extra_ids")
            extra = np.zeros((1, 0), np.uint64) if extra is None else extra
            facts = [
                0 if table is None else table.shape[1],
                int((extra[0] > 0).sum()),
                len(np.unique(extra[0][extra[0] > 0])),
                ids.shape[1],
                int(_get(request, "exclude_input_in_output").reshape(-1)[0]),
                int(extra[0][extra[0] > 0][0] & np.uint64(0x7FFFFFFF)) if (extra[0] > 0).any() else 0,
            ]
            length = int(_get(request, "request_output_len").reshape(-1)[0])
            tokens = (facts + list(range(100, 100 + length)))[:length]
            streaming = bool(_get(request, "streaming").reshape(-1)[0])
            chunks = [[t] for t in tokens] if streaming else [tokens]
            for i, chunk in enumerate(chunks):
                if sender.is_cancelled():  # the wrapper's BLS cancel (a stop request)
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    break
                if len(chunks) > PACED_FROM:
                    time.sleep(0.01)
                response = pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("output_ids", np.array([[chunk + [-1]]], np.int32)),  # padded, as beams are
                        pb_utils.Tensor("sequence_length", np.array([[len(chunk)]], np.int32)),
                    ]
                )
                last = i == len(chunks) - 1
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
        return None
