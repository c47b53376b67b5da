# The GPU image of the train step: CUDA torch + DeepSpeed. Its argv is the local one,
# `python -m torch.distributed.run [...] -m pipeline train --set ...` (one process per GPU).
#   docker build -f docker/step-cuda.Dockerfile -t registry.example.com/finetune/step-cuda:0.1.0 .
# No CUDA base image: the CUDA torch wheels carry the CUDA runtime, cuDNN and NCCL as nvidia-*
# wheels, and the driver comes from the node (NVIDIA container toolkit). That keeps one Python
# (3.11, the project's) and one base for both step images. Base pinned by version tag (digests
# cannot be resolved on the build machine; pin one when mirroring). No credentials in any layer.
FROM python:3.11.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/huggingface \
    DS_BUILD_OPS=0

WORKDIR /opt/finetune
COPY constraints.txt pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins ./plugins
# The CUDA build of torch==2.13.0 first: constraints.txt's `torch==2.13.0` is then already met
# and everything else installs from the same constraints as local.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
 && pip install -c constraints.txt . \
 && groupadd --gid 10001 finetune \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp finetune

USER 10001:10001
ENTRYPOINT ["finetune"]
CMD ["--help"]
HEALTHCHECK NONE
