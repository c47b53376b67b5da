# Airflow scheduler/worker/API image: the official base, the providers, the DAGs and the
# `pipeline` package (the DAG imports its step table and config; steps run in their own images).
#   docker build -f docker/airflow.Dockerfile -t registry.example.com/finetune/airflow:0.1.0 .
# Base pinned by version tag (digests cannot be resolved on the build machine; pin one when
# mirroring). Installs from the same constraints.txt as local; no credentials in any layer.
FROM apache/airflow:3.3.2-python3.11

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 FINETUNE_LAUNCHER=kubernetes

COPY --chown=airflow:0 constraints.txt pyproject.toml README.md /opt/finetune/
COPY --chown=airflow:0 pipeline /opt/finetune/pipeline
COPY --chown=airflow:0 plugins /opt/finetune/plugins
# CPU torch first (the package depends on it; the scheduler never trains), then the package and
# the providers pinned by constraints.txt, which matches this image's Airflow 3.3.2.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c /opt/finetune/constraints.txt /opt/finetune \
      apache-airflow-providers-cncf-kubernetes apache-airflow-providers-standard

COPY --chown=airflow:0 dags /opt/airflow/dags
# The official image's non-root user (uid 50000).
USER 50000
# Kubernetes probes (the chart's) check health; a Docker HEALTHCHECK is ignored there.
HEALTHCHECK NONE
