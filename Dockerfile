# tpa-rag: the web app in a container. CPU by default; build with TORCH_INDEX pointing at a CUDA wheel index
# (docker-compose.yml's `gpu` profile does) for the GPU build of the same pinned torch.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TPA_RAG_HOME=/data \
    GRADIO_ANALYTICS_ENABLED=False

# git: ingesting a git repository lists its tracked files with `git ls-files`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 tpa && mkdir -p /data && chown tpa:tpa /data
WORKDIR /opt/tpa-rag

# torch first, alone, from the chosen index, so that no other package pulls a different build.
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md requirements.lock ./
COPY app ./app
COPY tpa_core ./tpa_core
COPY kernels ./kernels
COPY retrieval ./retrieval
COPY docs ./docs
RUN pip install -c requirements.lock ".[postgres]"

USER tpa
VOLUME ["/data"]
EXPOSE 7860
# Fetch the default model into the data volume (idempotent), index this project's own README, docs and source
# as the demo collection on first start, then serve. Inside a container the app must bind to all interfaces;
# the compose file publishes the port on 127.0.0.1 of the host only, hence --allow-unprotected (publishing it
# wider needs --auth and --api-key instead).
CMD ["sh", "-c", "tpa-rag models fetch && exec tpa-rag serve --host 0.0.0.0 --port 7860 --allow-unprotected --demo README.md docs app tpa_core kernels retrieval"]
