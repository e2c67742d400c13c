# lmp on a CUDA-capable base; the default torch wheel from PyPI brings its CUDA runtime.
FROM python:3.11-slim
# git and git-lfs for lmp export --git (milestone branches to push to the Hub)
RUN apt-get update && apt-get install -y --no-install-recommends git git-lfs && rm -rf /var/lib/apt/lists/*
WORKDIR /lmp
COPY pyproject.toml README.md ./
COPY lm_pretrain ./lm_pretrain
COPY recipes ./recipes
COPY scripts ./scripts
RUN pip install --no-cache-dir .
ENV LMP_CACHE=/cache WANDB_MODE=offline
VOLUME ["/cache", "/lmp/runs"]
ENTRYPOINT ["lmp"]
CMD ["train", "recipes/demo.yaml"]
