"""client/triton_metrics.py on Triton's own /metrics text (as 2.51 writes it: its counters carry no
_total suffix, our python models' do), and what the whole-request benchmark makes of two readings."""

from __future__ import annotations

from bench_components.peers_requests import where_time_went
from client import triton_metrics

BEFORE = """# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="vision_encoder",version="1"} 1000000
nv_inference_compute_infer_duration_us{model="preprocess",version="1"} 50000
nv_inference_compute_infer_duration_us{model="llm",version="1"} 900
# HELP internvl_llm_steps_total engine steps by the number of sequences they ran together
# TYPE internvl_llm_steps_total counter
internvl_llm_steps_total{batch_size="1"} 10
internvl_llm_steps_total{batch_size="2"} 0
# HELP internvl_llm_step_duration_us cumulative wall time of engine steps
# TYPE internvl_llm_step_duration_us counter
internvl_llm_step_duration_us{phase="prefill"} 300000
internvl_llm_step_duration_us{phase="decode"} 800000
# HELP internvl_vision_encode_duration_us cumulative wall time of the encoder's executions
# TYPE internvl_vision_encode_duration_us counter
internvl_vision_encode_duration_us 600000
# HELP internvl_vision_encoded_tiles_total tiles run through the vision encoder
# TYPE internvl_vision_encoded_tiles_total counter
internvl_vision_encoded_tiles_total 3
# HELP internvl_llm_requests_in_flight requests holding an engine slot
# TYPE internvl_llm_requests_in_flight gauge
internvl_llm_requests_in_flight 1
"""


def _later(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    return text


AFTER = _later(
    BEFORE,
    {
        'model="vision_encoder",version="1"} 1000000': 'model="vision_encoder",version="1"} 9000000',  # batches: per request
        "internvl_vision_encode_duration_us 600000": "internvl_vision_encode_duration_us 4100000",
        'model="preprocess",version="1"} 50000': 'model="preprocess",version="1"} 80000',
        'batch_size="1"} 10': 'batch_size="1"} 25',
        'batch_size="2"} 0': 'batch_size="2"} 40',
        'phase="prefill"} 300000': 'phase="prefill"} 2300000',
        'phase="decode"} 800000': 'phase="decode"} 6050000',
        "tiles_total 3": "tiles_total 10",
    },
)


def test_counters_are_found_by_their_name_with_or_without_total():
    readings = triton_metrics.parse(BEFORE)
    assert triton_metrics.total(readings, "nv_inference_compute_infer_duration_us", model="vision_encoder") == 1e6
    assert triton_metrics.total(readings, "nv_inference_compute_infer_duration_us") == 1e6 + 50000 + 900
    assert triton_metrics.total(readings, "internvl_llm_steps_total") == triton_metrics.total(readings, "internvl_llm_steps") == 10
    assert triton_metrics.by_label(readings, "internvl_llm_step_duration_us", "phase") == {"prefill": 3e5, "decode": 8e5}
    assert triton_metrics.total(readings, "internvl_llm_requests_in_flight") == 1
    assert triton_metrics.total(readings, "no_such_metric") == 0


def test_a_run_is_what_it_added_to_each_counter():
    added = triton_metrics.added(triton_metrics.parse(BEFORE), triton_metrics.parse(AFTER))
    assert triton_metrics.by_label(added, "internvl_llm_steps_total", "batch_size") == {"1": 15, "2": 40}
    assert where_time_went(added, 12.345) == {
        "window_s": 12.35,
        "preprocess_s": 0.03,
        "vision_encoder_s": 3.5,
        "vision_tiles": 7,
        "llm_prefill_s": 2.0,
        "llm_decode_s": 5.25,
        "llm_steps_by_batch_size": {1: 15, 2: 40},
    }
