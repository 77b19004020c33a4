# syntax=docker/dockerfile:1
# octaskly in a container: the same reproducible zipapp `make release` builds for this
# machine (python -m scripts.release --targets local), run as the non-root user octaskly.
#
#   docker build -t octaskly:0.2.0 .
#   docker compose up -d            # dispatcher + workers, see docker-compose.yml
ARG PYTHON_VERSION=3.11

# -- builder: the release script builds dist/octaskly.pyz for this image's platform --------
FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN pip install --no-cache-dir "shiv==1.0.8" "packaging>=24"
COPY pyproject.toml README.md ./
COPY octaskly ./octaskly
COPY scripts ./scripts
RUN python -m scripts.release --targets local --no-measure --jobs 1 \
        --dist /src/dist --cache /tmp/release-cache \
    && /src/dist/octaskly.pyz --version

# -- runtime --------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim
# SHIV_ROOT: the zipapp's extracted site-packages, unpacked at build time into a root-owned
# directory (the runtime user has no writable home and needs none).
ENV SHIV_ROOT=/opt/octaskly/shiv \
    PYTHONUNBUFFERED=1 \
    RUST_LOG=info
RUN groupadd --system --gid 10001 octaskly \
    && useradd --system --uid 10001 --gid octaskly --home-dir /data \
        --no-create-home --shell /usr/sbin/nologin octaskly \
    && install -d -o octaskly -g octaskly -m 0700 /data
COPY --from=builder --chmod=0755 /src/dist/octaskly.pyz /opt/octaskly/bin/octaskly.pyz
RUN /opt/octaskly/bin/octaskly.pyz --version \
    && chmod -R go-w /opt/octaskly
# the user octaskly (numeric, so that Kubernetes runAsNonRoot can check it)
USER 10001:10001
WORKDIR /data
VOLUME /data
# 5555: workers and standby (TCP, and QUIC over UDP); 3000: REST API, web UI, /metrics
EXPOSE 5555/tcp 5555/udp 3000/tcp
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/health', timeout=4)"]
ENTRYPOINT ["/opt/octaskly/bin/octaskly.pyz"]
CMD ["--help"]
