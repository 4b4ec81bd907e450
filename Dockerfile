# The runtime install of `make run` (pip install -e ., no torch, no transformers), on a CPU: it
# serves model versions that `make model` or `python -m export` published into the registry under
# data/ (mounted at /app/data), and builds the default model itself without torch:
#   docker run ... discord-llm python -m export ensure-default --name smollm2-135m-instruct
#   docker build -t discord-llm .
#   docker run --env-file .env -v "$PWD/data:/app/data" --stop-timeout 30 discord-llm
# /model export of an HF folder needs torch and is not available inside this image (export on
# the host).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/app/data \
    DEVICE=cpu

WORKDIR /app
# Editable install: the Alembic migrations are read from /app/migrations, beside the packages.
COPY pyproject.toml README.md LICENSE ./
COPY bot ./bot
COPY export ./export
COPY models ./models
COPY migrations ./migrations
# The postgres and redis extras: the same image runs shards and workers (docs/deployment.md).
RUN pip install -e ".[postgres,redis]" \
    && useradd --create-home --uid 1000 bot \
    && mkdir -p /app/data \
    && chown bot /app/data

USER bot
VOLUME ["/app/data"]
# SIGTERM (docker stop) lets in-flight replies finish for up to SHUTDOWN_GRACE_S seconds.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "bot", "run"]
