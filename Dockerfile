# One image for both tiers: `splitvault serve private ...` or `splitvault serve public ...`.
# The deployment folder (TLS keys, models, KEK) is never baked in; compose mounts each tier's part.
# Builds with BuildKit or the legacy builder (no `# syntax=` frontend to fetch).

FROM python:3.11-slim AS build
# CPU-only torch by default. Empty (--build-arg TORCH_INDEX_URL=): the default package index,
# for builders that reach only it and offer a CPU wheel there (a mirror or PIP_FIND_LINKS).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU-only torch first, so that installing the project cannot pull a CUDA build; the check
# fails the build if a CUDA build came from the index anyway.
RUN pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && python -W ignore -c "import sys, torch; sys.exit(torch.version.cuda is not None)"
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
# /state/public and /state/private are the mount points of the tiers' state volumes. Docker gives
# a new, empty named volume the owner and mode of its mount point, so each starts out owned by
# group 10001 with the setgid bit: writable by uid 10001 and by any SPLITVAULT_UID that compose
# adds to group 10001 (group_add), and by no one else.
RUN groupadd --system --gid 10001 splitvault \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin splitvault \
    && install -d -o 10001 -g 10001 -m 2770 /state/public /state/private
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
# The public tier listens on 8443 (HTTPS). The private tier's 50051 stays on the internal network.
EXPOSE 8443
ENTRYPOINT ["splitvault"]
CMD ["--help"]
