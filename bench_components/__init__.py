"""Component benchmarks, side by side in one run: preprocessing, vision encoder, LLM decode, Triton TTFT.

    python -m bench_components [--out DIR] [--quick] [--only pre,vision,llm,triton] [--reference-python PATH]

Writes DIR/components.json (default artifacts/bench) and prints a table: every measured number with
its target and whether it is met. All timings exclude warm-up runs and report the median (and min)
over repetitions; timed runs of the things compared are interleaved so that a noisy VM slows both
alike. Artifacts (1B-shaped vision ONNX, its optimized / int8 variants, the tiny Triton repository)
are cached in DIR and rebuilt only when their checkpoint changes.

Sections:
  pre     engine.preprocess vs the model cards' load_image in its real stack (torch 2.14.1 + torchvision
          0.29.1, its own interpreter: --reference-python PATH or OUT/seed-venv), at every core count
  vision  InternViT-300M (internvl3_5-1b preset): ONNX Runtime configs vs PyTorch eager, fp32
  llm     Qwen3-0.6B shape decode at batch 1 vs transformers generate vs the memory-bandwidth floor,
          plus aggregate decode throughput at 4 and 8 concurrent sequences
  triton  time to first token through tritonserver (gRPC streaming) vs in-process Pipeline.stream
"""
