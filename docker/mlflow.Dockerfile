# The MLflow tracking server of k8s/mlflow.yaml: the official image plus what it lacks for our
# stores, the PostgreSQL driver (backend store) and boto3 (S3 artifact destination), and for its
# basic-auth app, Flask-WTF (mlflow's `auth` extra; the official image has plain mlflow, and
# `mlflow server --app-name basic-auth` fails to import without it).
#   docker build -f docker/mlflow.Dockerfile -t registry.example.com/finetune/mlflow:3.17.2 .
# Base pinned to the mlflow release of constraints.txt; extra packages from the same file, and
# Flask-WTF, which is not in it (the pipeline never runs the auth app), pinned here.
FROM ghcr.io/mlflow/mlflow:v3.17.2

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY constraints.txt /opt/finetune/constraints.txt
RUN pip install -c /opt/finetune/constraints.txt psycopg2-binary boto3 Flask-WTF==1.3.0 WTForms==3.3.2

# The Deployment runs it as this uid with a read-only root filesystem and /tmp as an emptyDir.
USER 10001:10001
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
HEALTHCHECK NONE
