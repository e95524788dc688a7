# syntax=docker/dockerfile:1
# Two stages (see README, "Container"):
#   build   - NGC PyTorch image (CUDA, PyTorch, TensorRT) + tvsprune[tensorrt,gpu].
#             `docker run --gpus all` runs `tvsprune run CONFIG`: calibrate, prune, export
#             (ONNX, INT8, TensorRT engines built on *this* GPU) and bench.
#   runtime - a slim CUDA runtime image with the TensorRT runtime and one engine, whose
#             entry point runs inference / a latency benchmark on it.
# Engines are specific to the GPU model and the TensorRT version: build them where they run.

ARG PYTORCH_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
ARG RUNTIME_IMAGE=nvcr.io/nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${PYTORCH_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/tvsprune
COPY pyproject.toml README.md ./
COPY tvsprune ./tvsprune
# The container's own torch and TensorRT satisfy the requirements; the extras add
# onnxruntime-gpu and the TensorRT Python package where the image lacks it.
RUN python -m pip install --no-deps -e . \
 && python -m pip install "onnx>=1.16" "onnxruntime-gpu>=1.18" "onnx-graphsurgeon>=0.5" "onnxscript>=0.1" \
        "safetensors>=0.4" "pydantic>=2.5" "torch-pruning>=1.5" "tqdm>=4.66" "rich>=13" "matplotlib>=3.8" \
        "onnxconverter-common>=1.14" \
 && (python -c "import tensorrt" || python -m pip install --extra-index-url https://pypi.nvidia.com ".[tensorrt]") \
 && tvsprune doctor
WORKDIR /workspace
ENTRYPOINT ["tvsprune", "run"]
CMD ["/workspace/config.toml"]

FROM ${RUNTIME_IMAGE} AS runtime
ARG ENGINE=docker/engine.placeholder
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --extra-index-url https://pypi.nvidia.com "tensorrt-cu13>=10" "cuda-python>=12" "numpy>=1.24"
COPY docker/trt_infer.py /opt/trt_infer.py
COPY ${ENGINE} /engine/model.engine
ENTRYPOINT ["python3", "/opt/trt_infer.py", "/engine/model.engine"]
CMD ["--batch", "1,8,32"]
