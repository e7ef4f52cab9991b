# Two images from one file:
#   --target server   onnxruntime + gRPC, no TensorFlow (the image that runs in production)
#   --target trainer  TensorFlow + tf2onnx, writes the model into a volume and exits
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
 && (getent passwd app >/dev/null || useradd --create-home --uid 10001 --user-group app)
WORKDIR /src
# Extra pip arguments for offline builds (the smoke test passes --no-index --find-links).
ARG PIP_ARGS=""
COPY pyproject.toml README.md ./
# Offline builds only: wheels in .wheels/ (absent normally; the glob then copies just README.md).
COPY README.md .wheel[s] /tmp/wheels/
COPY protos protos
COPY trainer trainer
COPY server server
COPY client client

FROM base AS server
# "server" or "gpu" (onnxruntime-gpu; run with --provider cuda on an NVIDIA host)
ARG SERVER_EXTRA=server
RUN pip install ${PIP_ARGS} ".[${SERVER_EXTRA}]" && rm -rf /src /tmp/wheels
WORKDIR /home/app
USER app
# Settings come from DIGITS_* variables (compose and Kubernetes override them) or flags.
ENV DIGITS_MODEL=/models/model.onnx DIGITS_HOST=0.0.0.0 DIGITS_METRICS_HOST=0.0.0.0 \
    DIGITS_HTTP_PORT=8080
EXPOSE 50051 8080 8002
# Reads the server's DIGITS_* settings: GET /v2/health/ready, a few hundredths of a CPU-second.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 CMD ["digit-probe"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["digit-server"]

FROM base AS trainer
RUN pip install ${PIP_ARGS} ".[train]" && rm -rf /src /tmp/wheels \
 && mkdir -p /models && chown app:app /models
WORKDIR /home/app
USER app
ENTRYPOINT ["digit-train"]
CMD ["--output", "/models/model.onnx", "--if-missing"]
