# The CPU image every non-GPU step runs in: its argv is `finetune <step> --set ...`.
#   docker build -f docker/step-cpu.Dockerfile -t registry.example.com/finetune/step-cpu:0.1.0 .
# Base pinned by version tag (digests cannot be resolved on the build machine; pin one when
# mirroring). Installs from the same constraints.txt as `make install`; holds no credentials.

# DeepSpeed with its CPU ops compiled into the package (shared-memory collectives, CPU Adam), so a
# pod neither needs a compiler nor builds an op while it starts (pipeline/train/ops.py). --no-binary:
# built from the sdist, never a prebuilt wheel without the ops; the check fails the build otherwise.
FROM python:3.11.11-slim-bookworm AS deepspeed-ops
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY constraints.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c constraints.txt ninja packaging py-cpuinfo psutil numpy setuptools wheel \
 && DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 \
    pip wheel --no-build-isolation --no-deps --no-binary deepspeed -c constraints.txt -w /wheels deepspeed \
 && python -c "import glob, zipfile; names = zipfile.ZipFile(glob.glob('/wheels/deepspeed-*.whl')[0]).namelist(); \
assert any(n.startswith('deepspeed/ops/adam/cpu_adam_op') for n in names), 'no cpu_adam op in the wheel'"

FROM python:3.11.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/huggingface DS_ACCELERATOR=cpu

WORKDIR /opt/finetune
COPY constraints.txt pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins ./plugins
COPY --from=deepspeed-ops /wheels /wheels
# torch first from the CPU wheel index, so the constraint is met by the CPU build, never CUDA;
# then DeepSpeed as built above (the same pinned version), then the rest.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c constraints.txt /wheels/deepspeed-*.whl . \
 && rm -rf /wheels \
 && groupadd --gid 10001 finetune \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp finetune

# Pods run with a read-only root filesystem: /tmp and the HF cache are emptyDir mounts.
USER 10001:10001
ENTRYPOINT ["finetune"]
CMD ["--help"]
HEALTHCHECK NONE
