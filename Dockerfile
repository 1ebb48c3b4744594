# roombus: a small non-root image; `scripts/image` builds it (README "Deployment").
#
#   docker build --build-arg BASE=python:3.11-slim -t roombus .      anywhere an image registry
#   scripts/image                                                     here: Debian-made bases
#   docker run --network host -v $PWD/config.yaml:/etc/roombus/config.yaml:ro roombus
#
# BASE is any image with python3 (>= 3.11) at /usr/bin or /usr/local/bin: the official python
# slim image, or roombus-base made by scripts/image from Debian packages (debootstrap
# --variant=minbase + python3, no docs, man pages or locales). BUILD_BASE, for the build stages,
# is BASE by default; it needs the venv module too, and binutils' strip (installed from Debian
# where it lacks them): scripts/image passes roombus-build, the same Debian base plus
# python3-venv and binutils. Both have the same interpreter at the same path, so the venv's
# interpreter link holds in the last stage. The venv at /opt/roombus holds only what the runtime
# imports: pip, setuptools and the build tools stay in the build stage.
ARG BASE=python:3.11-slim
ARG BUILD_BASE=${BASE}

FROM ${BUILD_BASE} AS deps
ARG PIP_ARGS=""
WORKDIR /src
RUN python3 -m venv /opt/roombus
# Dependencies first (deploy/constraints.txt: the exact versions of everything `pip install .`
# resolves to): this layer stays cached until the lock changes.
COPY deploy/constraints.txt /src/deploy/constraints.txt
COPY deploy/wheels/ /src/wheels/
RUN /opt/roombus/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_ARGS \
      --find-links /src/wheels -r deploy/constraints.txt

FROM deps AS build
COPY pyproject.toml README.md LICENSE ./
COPY bridge ./bridge
COPY connectors ./connectors
COPY deploy/av-stub/av ./av-stub/av
# --no-deps: every dependency came from the lock; --no-build-isolation: the build backend too, so
# this layer needs no package index. `pip check` fails the build where the lock and
# pyproject.toml disagree. Then the build tools and pip leave: the runtime installs nothing.
RUN /opt/roombus/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps \
      --no-build-isolation . \
 && /opt/roombus/bin/pip check
# What the runtime never loads leaves the venv (README "Deployment" has the sizes):
# - The image carries no media codecs. roombus bridges data only and never subscribes to a
#   track, but aiortc imports PyAV (~105 MB with its FFmpeg libraries, every one of them linked at
#   `import av`) for its codecs: deploy/av-stub/av takes its place, the names aiortc imports,
#   raising av.FFmpegError if ever used (tests/deploy/test_av_stub.py checks the names).
# - cel_expr_python's CEL extensions (ext/: strings, math, encoders, ...; ~37 MB): optional
#   modules a caller passes to cel.NewEnv(extensions=...), which bridge/rules.py does not.
# - The extension modules' symbol tables and debug info (strip --strip-unneeded): not the
#   libraries that auditwheel bundled (*.libs/, stripped already and patched by patchelf).
RUN command -v strip >/dev/null || { apt-get update -q \
      && apt-get install -y -q --no-install-recommends binutils && rm -rf /var/lib/apt/lists/*; } \
 && site=$(/opt/roombus/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
 && /opt/roombus/bin/pip uninstall -q -y av hatchling pathspec pluggy trove-classifiers \
      setuptools pip \
 && cp -a av-stub/av "$site/av" && /opt/roombus/bin/python -m compileall -q "$site/av" \
 && rm -rf "$site/cel_expr_python/ext" /opt/roombus/share \
 && find /opt/roombus -name '*.so' -type f ! -path '*.libs/*' -exec strip --strip-unneeded {} +

FROM ${BASE}
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="roombus" \
      org.opencontainers.image.description="Bridge LiveKit rooms to Kafka and MQTT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/roombus/roombus"
RUN groupadd --system --gid 10001 roombus \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin roombus \
 && mkdir -p /etc/roombus /var/lib/roombus && chown roombus:roombus /var/lib/roombus
COPY --from=build /opt/roombus /opt/roombus
# The default configuration is the annotated example: its servers come from the environment
# (LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET, MQTT_HOST, MQTT_PORT, KAFKA_BOOTSTRAP).
# Mount your own over it (read-only is enough: the bridge never writes its configuration).
COPY config.example.yaml /etc/roombus/config.yaml
ENV PATH=/opt/roombus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ROOMBUS_LOG_FORMAT=json \
    ROOMBUS_HTTP_PORT=8081
USER 10001:10001
EXPOSE 8081
# /ready on the health port: `bridge.http_port` (the example configuration and the chart use
# 8081; set ROOMBUS_HTTP_PORT when yours differs). Probing 127.0.0.1 from inside the container
# works whatever `bridge.http_host` is (127.0.0.1 is its default, 0.0.0.0 includes it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('ROOMBUS_HTTP_PORT', '8081'), timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["roombus"]
CMD ["run", "/etc/roombus/config.yaml"]
