# The image k8s/ names: this project on Ray's GPU image at the pinned Ray version.
# Build: docker build -t ghcr.io/moe-inference-server/moe-inference-server:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users moe_core ./moe_core
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users merge_jobs ./merge_jobs
COPY --chown=ray:users benchmarks ./benchmarks
COPY --chown=ray:users config ./config
RUN pip install --no-cache-dir ".[s3]" \
    && python -c "import deployments.app, merge_jobs, moe_core"
ENV HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
