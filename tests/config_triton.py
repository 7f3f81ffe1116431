"""A Triton that is live and ready and reports a build's `preprocess` parameters (the checkpoint and
the request limits, as `make build` writes them into preprocess/config.pbtxt), and serves no
inference: enough for the OpenAI front to start and to read its limits.

    python -m tests.config_triton --grpc-port P [--http-port Q] [...]   # a stand-in tritonserver
"""

from __future__ import annotations

import http.server
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

MIB = 1 << 20
PARAMETERS = {"checkpoint": "/models/tiny", "max_images": "2", "max_image_pixels": "1000000", "max_request_bytes": str(8 * MIB)}


class ConfigTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, parameters: dict[str, str] = PARAMETERS):
        self.parameters = parameters

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=True)

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config={"parameters": {k: {"string_value": v} for k, v in self.parameters.items()}})


def start(parameters: dict[str, str] = PARAMETERS, port: int = 0) -> tuple[grpc.Server, int]:
    """-> (the running gRPC server, its port)."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ConfigTriton(parameters), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v2/health/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def main() -> None:
    """tritonserver's command line (--grpc-port=P --http-port=Q, the rest ignored); SIGTERM stops it.
    STAND_IN_PID, when set, names a file that gets this process's id."""
    flags = dict(arg.lstrip("-").split("=", 1) for arg in sys.argv[1:] if "=" in arg)
    if "STAND_IN_PID" in os.environ:
        with open(os.environ["STAND_IN_PID"], "w") as pid_file:
            pid_file.write(str(os.getpid()))
    grpc_server, _ = start({**PARAMETERS, "checkpoint": "/models/tiny-gpu"}, int(flags["grpc-port"]))
    ready = http.server.ThreadingHTTPServer(("127.0.0.1", int(flags["http-port"])), _Ready)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=ready.shutdown).start())
    ready.serve_forever()
    grpc_server.stop(0)


if __name__ == "__main__":
    main()
