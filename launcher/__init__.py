"""Process supervisors: start tritonserver on a generated model repository (CPU wheel or the GPU
container, one mpirun rank per TensorRT-LLM rank), the OpenAI-compatible server beside it, and stop
them all. What `make serve` runs; nothing here is loaded inside tritonserver (that is triton_repo/)."""
