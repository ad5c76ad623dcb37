FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
COPY examples ./examples
RUN useradd --system --uid 10001 aioqueue \
    && mkdir -p /var/lib/aioqueue && chown aioqueue /var/lib/aioqueue
# The job store (SQLite) a restart resumes from: keep it on a volume (docker-compose.yml does).
ENV AIOQUEUE_STORE__DIR=/var/lib/aioqueue
USER aioqueue
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["aioqueue", "serve", "examples.tasks:app", "--host", "0.0.0.0"]
