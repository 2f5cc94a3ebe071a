# The image the pipeline's Prefect workers run: this checkout (with its .git, so every run records
# its commit), installed, as LLM_PIPELINE_DIR. See README "Running on shared infrastructure".
#   CPU workers: docker build -t REGISTRY/llm-pipeline:cpu .
#   GPU workers: docker build -t REGISTRY/llm-pipeline:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# PyTorch's CUDA wheels carry their CUDA libraries: the GPU image needs only the host's NVIDIA driver
# (the NVIDIA container toolkit, or Kubernetes' nvidia.com/gpu). Credentials and addresses
# (AWS_*, MLFLOW_TRACKING_URI, PREFECT_API_URL) come from the environment at run time, never the image.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install --yes --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llm-pipeline
# torch first, from the index of the image's kind; pyproject's torch==2.13.0 then matches 2.13.0+cpu/+cuXXX
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY flows/ flows/
RUN pip install --no-cache-dir -e .
COPY . .
RUN dvc config --local core.analytics false

ENV LLM_PIPELINE_DIR=/opt/llm-pipeline \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1
# a process worker for the pool named at run time (Kubernetes jobs override the command)
ENTRYPOINT ["prefect", "worker", "start", "--pool"]
CMD ["gpu-pool"]
