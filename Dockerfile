# lmp on a CUDA-capable base; the default torch wheel from PyPI brings its CUDA runtime.
FROM python:3.11-slim
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
