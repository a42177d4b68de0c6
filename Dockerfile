# Squeeze API and worker image. CPU by default; build the CUDA variant with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t squeeze:cuda .
# (the API never imports torch, so one image serves both roles).
FROM python:3.11-slim AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN /opt/venv/bin/pip install --extra-index-url "$TORCH_INDEX" "torch==2.13.0" \
 && /opt/venv/bin/pip install .

FROM python:3.11-slim
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
