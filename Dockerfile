# o2o-jax image: CPU by default; CUDA JAX with --build-arg JAX_CUDA=1.
#   docker build -t o2o-jax .
#   docker build --build-arg JAX_CUDA=1 -t o2o-jax:cuda .
# Mirrors the tested set-up: pip install -r requirements.txt on Python 3.11.
FROM python:3.11-slim

ARG JAX_CUDA=0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MINARI_DATASETS_PATH=/data/minari \
    WANDB_MODE=offline

WORKDIR /o2o-jax
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && if [ "$JAX_CUDA" = "1" ]; then pip install --no-cache-dir "jax[cuda12]==0.10.2"; fi
COPY . .

# Datasets and runs live on mounted volumes: -v $PWD/minari:/data/minari -v $PWD/runs:/o2o-jax/runs
VOLUME ["/data/minari", "/o2o-jax/runs"]
CMD ["python", "-m", "pytest", "tests", "-q"]
