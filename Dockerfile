# roombus: slim, non-root, with a health check on /ready.
# Build: docker build -t roombus .   Run: docker run -v $PWD/config.yaml:/etc/roombus.yaml roombus
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY connectors ./connectors
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin roombus
COPY --from=build /install /usr/local
USER roombus
ENV PYTHONUNBUFFERED=1 ROOMBUS_LOG_FORMAT=json
# The health check needs `bridge.http_port: 8081` in the configuration (and, for probes from
# outside the container, `bridge.http_host: 0.0.0.0`).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/ready', timeout=2).status == 200 else 1)"
ENTRYPOINT ["roombus"]
CMD ["run", "/etc/roombus.yaml"]
