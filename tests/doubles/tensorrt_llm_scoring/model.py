"""Test double of the `tensorrtllm` backend for the GPU llm wrapper's guided decoding and log
probabilities (tests/test_gpu_guided.py): answers with tokens describing the guide tensors it got
[guide type index + 1 (0: none), guide length (-1: none), return_log_probs, output_log_probs asked,
100, 101, ...]; with return_log_probs token i's log probability is -(i + 1) / 8, sent as the C++
backend does (batch_manager/llmRequest.cpp createResult): the whole list so far in every response,
with cum_log_probs its sum."""

import numpy as np
import triton_python_backend_utils as pb_utils

GUIDE_TYPES = (b"json", b"json_schema", b"regex", b"ebnf_grammar")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _get(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _one_string(value):
    assert value.shape == (1, 1), value.shape  # one string: utils.cc reads the raw BYTES buffer
    return bytes(value[0, 0])


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            guide_type, guide, logprobs = (_get(request, n) for n in ("guided_decoding_guide_type", "guided_decoding_guide", "return_log_probs"))
            asked = "output_log_probs" in request.requested_output_names()
            facts = [
                0 if guide_type is None else 1 + GUIDE_TYPES.index(_one_string(guide_type)),
                -1 if guide is None else len(_one_string(guide)),
                int(logprobs is not None and bool(logprobs.reshape(-1)[0])),
                int(asked),
            ]
            length = int(_get(request, "request_output_len").reshape(-1)[0])
            tokens = (facts + list(range(100, 100 + length)))[:length]
            chunks = [[t] for t in tokens] if bool(_get(request, "streaming").reshape(-1)[0]) else [tokens]
            done = 0
            for i, chunk in enumerate(chunks):
                done += len(chunk)
                outputs = [pb_utils.Tensor("output_ids", np.array([[chunk]], np.int32)),
                           pb_utils.Tensor("sequence_length", np.array([[len(chunk)]], np.int32))]
                if facts[2] and asked:
                    so_far = -np.arange(1, done + 1, dtype=np.float32) / 8
                    outputs.append(pb_utils.Tensor("output_log_probs", so_far[None, None]))
                    outputs.append(pb_utils.Tensor("cum_log_probs", np.array([[so_far.sum()]], np.float32)))
                sender.send(pb_utils.InferenceResponse(outputs), flags=FINAL if i == len(chunks) - 1 else 0)
        return None
