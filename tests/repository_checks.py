"""Checks on a generated model repository, shared by the CPU and GPU repository tests."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2


def parse_configs(repository: Path, models) -> dict[str, model_config_pb2.ModelConfig]:
    """Every config.pbtxt as Triton's ModelConfig protobuf (fails on anything protobuf text format rejects)."""
    return {m: text_format.Parse((repository / m / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()) for m in models}


def full_dims(config: model_config_pb2.ModelConfig, tensor) -> list[int]:
    """The shape a request's tensor has: [batch] + dims for batching models."""
    return ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)


def dims_compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def assert_ensemble_wired(configs: dict[str, model_config_pb2.ModelConfig], ensemble_name: str = "internvl") -> None:
    """Every ensemble tensor has a producer (an ensemble input or an earlier step's output) and a
    consumer (a later step or an ensemble output), with the same dtype and a compatible shape;
    every required input of every step is fed; step tensor names exist in the step's config."""
    ensemble = configs[ensemble_name]
    available = {t.name: (t.data_type, full_dims(ensemble, t)) for t in ensemble.input}
    consumed = set()
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs = {t.name: t for t in model.input}
        for key, value in step.input_map.items():
            assert key in inputs, f"{step.model_name} has no input {key}"
            assert value in available, f"{step.model_name}.{key} reads {value}, which nothing produced"
            dtype, dims = available[value]
            assert dtype == inputs[key].data_type, (step.model_name, key, dtype, inputs[key].data_type)
            assert dims_compatible(dims, full_dims(model, inputs[key])), (step.model_name, key, dims, full_dims(model, inputs[key]))
            consumed.add(value)
        required = {t.name for t in model.input if not t.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        outputs = {t.name: t for t in model.output}
        for key, value in step.output_map.items():
            assert key in outputs, f"{step.model_name} has no output {key}"
            available[value] = (outputs[key].data_type, full_dims(model, outputs[key]))
    for output in ensemble.output:
        assert output.name in available, f"ensemble output {output.name} has no producer"
        assert available[output.name][0] == output.data_type
        consumed.add(output.name)
    produced = {v for step in ensemble.ensemble_scheduling.step for v in step.output_map.values()}
    assert produced <= consumed, f"produced but never consumed: {produced - consumed}"


def metric_value(server, name: str) -> float:
    """The sum of a Prometheus metric's samples (every label set) on a running TritonServer."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
