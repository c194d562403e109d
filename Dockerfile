# deadletter: the same program `make run` starts (python -m server), packaged for production.
# Configure it with DATABASE_URL and DEADLETTER_ENCRYPTION_KEYS at run time; no secret is baked in.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY generated ./generated
RUN python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin deadletter
COPY --from=build /venv /venv
COPY migrations /app/migrations
# Writable by the service user only for the embedded mode, which a container should not use.
RUN mkdir -p /app/data && chown deadletter /app/data
WORKDIR /app
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DEADLETTER_MIGRATIONS_DIR=/app/migrations \
    DEADLETTER_DATA_DIR=/app/data \
    DEADLETTER_LISTEN=0.0.0.0:50051
USER deadletter
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=6s --start-period=20s --retries=3 CMD ["python", "-m", "server", "healthcheck"]
CMD ["python", "-m", "server"]
