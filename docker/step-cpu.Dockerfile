# The CPU image every step runs in: `finetune <step> --set ...` is its argv.
#   docker build -f docker/step-cpu.Dockerfile -t registry.example.com/finetune-step-cpu:0.1.0 .
FROM python:3.11.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/hf DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false

WORKDIR /opt/finetune
COPY constraints.txt pyproject.toml README.md ./
COPY pipeline ./pipeline
# torch first from the CPU wheel index, so the constraint is met by the CPU build, never CUDA.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c constraints.txt .

RUN useradd --uid 10001 --create-home finetune
USER 10001
ENTRYPOINT ["finetune"]
