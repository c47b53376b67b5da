# The GPU image of the train step: CUDA torch + DeepSpeed. Its argv is the local one,
# `python -m torch.distributed.run [...] -m pipeline train --set ...` (one process per GPU).
#   docker build -f docker/step-cuda.Dockerfile -t registry.example.com/finetune/step-cuda:0.1.0 .
# (`make images` builds it with the others.) No CUDA base image: the CUDA torch wheels carry the
# CUDA runtime, cuDNN and NCCL as nvidia-* wheels, and the driver comes from the node (NVIDIA
# container toolkit). That keeps one Python (3.11, the project's) and one base for both step
# images. Base pinned by version tag (digests cannot be resolved on the build machine; pin one when
# mirroring). No credentials in any layer.

# DeepSpeed with CPU Adam compiled into the package: ZeRO-Offload (train.offload_optimizer) steps
# the optimizer on the CPU with it, and the image below has no compiler to build it when a pod
# starts (pipeline/train/ops.py). DeepSpeed 0.19 builds CPU Adam as a CPU op, with g++ alone, for
# its CUDA accelerator too; DS_ACCELERATOR=cuda records that accelerator in the package, which
# loads a prebuilt op only on the accelerator it was built for. --no-binary: built from the
# sdist, never a prebuilt wheel without the op. CPU Adam is compiled for the build machine's CPU
# (-march=native): build on a machine no newer than the GPU nodes' CPUs (docs/deploy.md).
FROM python:3.11.11-slim-bookworm AS deepspeed-ops
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY constraints.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
 && pip install -c constraints.txt ninja packaging py-cpuinfo psutil numpy setuptools wheel \
 && DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 \
    pip wheel --no-build-isolation --no-deps --no-binary deepspeed -c constraints.txt -w /wheels deepspeed \
 && python -c "import glob, zipfile; wheel = zipfile.ZipFile(glob.glob('/wheels/deepspeed-*.whl')[0]); \
names = wheel.namelist(); info = wheel.read('deepspeed/git_version_info_installed.py').decode(); \
assert any(n.startswith('deepspeed/ops/adam/cpu_adam_op') for n in names), 'no cpu_adam op in the wheel'; \
assert \"accelerator_name='cuda'\" in info, info"

FROM python:3.11.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/huggingface DS_ACCELERATOR=cuda

WORKDIR /opt/finetune
COPY constraints.txt pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins ./plugins
COPY --from=deepspeed-ops /wheels /wheels
# The CUDA build of torch==2.13.0 first: constraints.txt's `torch==2.13.0` is then already met
# and everything else installs from the same constraints as local, DeepSpeed as built above.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
 && pip install -c constraints.txt /wheels/deepspeed-*.whl . \
 && rm -rf /wheels \
 && groupadd --gid 10001 finetune \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp finetune

# Pods run with a read-only root filesystem: /tmp is an emptyDir, HF_HOME the model cache.
USER 10001:10001
ENTRYPOINT ["finetune"]
CMD ["--help"]
HEALTHCHECK NONE
