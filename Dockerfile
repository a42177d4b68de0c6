# Squeeze API and worker image (the API never imports torch, so one image serves both roles).
#   docker build -t squeeze:cpu .                                      # CPU build of torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t squeeze:cu128 .    # CUDA 12.8 build, for GPU workers
# The CUDA wheels carry their own CUDA libraries; the host needs only the NVIDIA driver and Container Toolkit.

FROM python:3.11-slim AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# torch first, from the index of the chosen variant; the project's own pin then finds it installed.
RUN /opt/venv/bin/pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY squeeze ./squeeze
COPY migrations ./migrations
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/python -c "import torch; print('torch', torch.__version__)"

FROM python:3.11-slim
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="squeeze" squeeze.torch-variant="${TORCH_VARIANT}"
RUN useradd --create-home --uid 10001 squeeze
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/migrations /opt/venv/lib/python3.11/site-packages/migrations
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 SQUEEZE_DATA_DIR=/data
RUN mkdir /data && chown squeeze /data
USER squeeze
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["squeeze", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
