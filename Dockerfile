# syntax=docker/dockerfile:1.7
# The model server for one GPU box: CUDA base, Python 3.11, pinned deps, weights baked in.
#
#   docker build -t model-serving .                        (the defaults below)
#   docker build --build-arg GENERATE_MODEL= -t predict-only .   (an empty model is skipped)
#   docker build --build-arg GENERATE_MODEL_REVISION=<commit> -t model-serving:<commit> .
#
# Layers are ordered by how often they change: system -> Python deps (pyproject) -> weights
# (build args) -> our code. Editing service/ rebuilds only the last, small layer.

# torch==2.13.0 from PyPI is built against CUDA 13.0 and brings its own CUDA libraries as
# wheels (cuda-toolkit 13.0, cuDNN 9), so the base needs the matching CUDA major.minor and
# the NVIDIA container env, not a second copy of the libraries: `-base` (~250 MB) rather
# than `-runtime` (~2.5 GB more). Needs an NVIDIA driver >= 580 on the host.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${CUDA_IMAGE}

# Python 3.11 (what CI tests) from uv's standalone builds, independent of the Ubuntu release;
# the pinned uv above fixes which 3.11 patch release "3.11" means. The virtualenv lives
# outside the app user's home.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/opt/hf
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv

# Dependencies only, from pyproject.toml: this layer (~5 GB, mostly torch + CUDA wheels) is
# rebuilt only when the dependency list changes. The cache mount keeps wheels across builds.
WORKDIR /srv
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install -r pyproject.toml

# uid and gid 10001: what Kubernetes' runAsUser / runAsGroup name (deploy/kubernetes).
RUN groupadd --gid 10001 app && useradd --create-home --uid 10001 --gid app app \
    && mkdir -p "$HF_HOME" && chown app:app "$HF_HOME"

# The models, downloaded now so the container starts offline. The build args are also the
# run-time settings, so the image always serves exactly what it baked. Pin the revisions to
# commit hashes for reproducible builds (bake_weights prints the commit each one resolved to).
ARG PREDICT_MODEL=distilbert/distilbert-base-uncased-finetuned-sst-2-english
ARG PREDICT_MODEL_REVISION=main
ARG GENERATE_MODEL=Qwen/Qwen2.5-0.5B-Instruct
ARG GENERATE_MODEL_REVISION=main
ENV PREDICT_MODEL=${PREDICT_MODEL} \
    PREDICT_MODEL_REVISION=${PREDICT_MODEL_REVISION} \
    GENERATE_MODEL=${GENERATE_MODEL} \
    GENERATE_MODEL_REVISION=${GENERATE_MODEL_REVISION}
# What the image serves, readable without running it (`docker inspect`, registries): the
# revisions as asked for, so pin them to commits to have commits here. The commits they
# resolved to are in the manifest baked beside the weights, $HF_HOME/baked-models.json.
LABEL org.opencontainers.image.title="model-serving" \
      org.opencontainers.image.description="FastAPI model server with dynamic and continuous batching" \
      model-serving.predict.model="${PREDICT_MODEL}" \
      model-serving.predict.revision="${PREDICT_MODEL_REVISION}" \
      model-serving.generate.model="${GENERATE_MODEL}" \
      model-serving.generate.revision="${GENERATE_MODEL_REVISION}"
COPY scripts/bake_weights.py /srv/scripts/bake_weights.py
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001
# A token for gated models comes in as a build secret, never as a layer:
#   docker build --secret id=hf_token,env=HF_TOKEN .
RUN --mount=type=secret,id=hf_token,uid=10001,required=false \
    HF_TOKEN_PATH=/run/secrets/hf_token python /srv/scripts/bake_weights.py

# Our code last. It runs from /srv (uvicorn puts its working directory on sys.path), so
# there is nothing to build or install here.
COPY service/ /srv/service/
COPY batching/ /srv/batching/

# X-Forwarded-For is trusted only from the proxy named by FORWARDED_ALLOW_IPS: compose sets
# NGINX's fixed address, Kubernetes the ingress (README "Security"). By default nobody's.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    QUANTIZATION=nf4 \
    DEVICE=cuda \
    HOST=0.0.0.0 \
    PORT=8000 \
    FORWARDED_ALLOW_IPS=127.0.0.1
EXPOSE 8000

# Ready = models loaded and warmed up; the first start includes loading weights onto the GPU.
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]

# One uvicorn worker (more would each load their own models and KV cache), with a graceful
# drain on SIGTERM: /ready turns 503, running requests and streams finish for up to
# DRAIN_TIMEOUT_S (compose gives it stop_grace_period), then the process exits 0.
CMD ["python", "-m", "service"]
