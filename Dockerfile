# syntax=docker/dockerfile:1
# One image for both tiers: `splitvault serve private ...` or `splitvault serve public ...`.
# The deployment folder (TLS keys, models, KEK) is never baked in; compose mounts each tier's part.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU-only torch first, so that installing the project cannot pull a CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY splitvault ./splitvault
COPY public_api ./public_api
COPY private_core ./private_core
COPY shared ./shared
COPY protos ./protos
RUN pip install --no-cache-dir . \
    && python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
RUN groupadd --system --gid 10001 splitvault \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin splitvault
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
# The public tier listens on 8443 (HTTPS). The private tier's 50051 stays on the internal network.
EXPOSE 8443
ENTRYPOINT ["splitvault"]
CMD ["--help"]
