# kanfarm worker image; `kanfarm` is the entrypoint (docker run IMAGE worker --gpus 0).
#
# torch comes from the index in TORCH_INDEX_URL, installed before the project so pip never pulls
# a different build through the project's dependency range:
#   CPU  (default, ~200 MB): --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#   CUDA (GPU workers):      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# The CUDA wheels bundle their CUDA runtime; the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KANFARM_CHECKPOINT_DIR=/checkpoints \
    KANFARM_DATA_DIR=/data

# A C/C++ compiler: torch.compile builds the CPU bases loop with it (kanfarm/models/compiled_spline.py;
# without it CPU workers warn once and run eager) and Triton its launchers on CUDA.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY kanfarm ./kanfarm
COPY cli ./cli
COPY workers ./workers
COPY migrations ./migrations
RUN pip install ".[monitor]"

# An unprivileged user; named volumes mounted on these paths inherit their ownership.
RUN useradd --create-home --uid 1000 kanfarm \
    && mkdir -p /checkpoints /data /compile-cache \
    && chown kanfarm:kanfarm /checkpoints /data /compile-cache
USER kanfarm
WORKDIR /home/kanfarm

ENTRYPOINT ["kanfarm"]
CMD ["--help"]
