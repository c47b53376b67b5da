"""Scoped triggers: a trigger may pick collect.sources only under the deployment's
collect.allowed_sources and model_name only within its allowed_model_names, refused at the trigger
check before anything is read (issue 23 item 2)."""

import http.server
import json
import re

import pytest
import yaml

from pipeline import collect, dagrun, steps
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.faults import serving


class CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        body = json.dumps({"user": "admin", "password": "hunter2"}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def internal_server():
    CountingHandler.requests = []
    with serving(CountingHandler) as url:
        yield url, CountingHandler.requests


@pytest.fixture
def creds(tmp_path):
    path = tmp_path / "secrets" / "creds.csv"
    path.parent.mkdir()
    path.write_text("user,password\nadmin,hunter2\n")
    return path


def deployment_file(tmp_path, **settings) -> list[str]:
    """The deployment's overrides of a config file with ``settings``, as the DAG's tasks read it."""
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(settings))
    return steps.deployment_overrides({"FINETUNE_CONFIG": str(path)})


def test_the_repro_is_refused_at_the_trigger_check_before_anything_is_read(
    tmp_path, creds, internal_server, monkeypatch, capsys
):
    url, requests = internal_server
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FINETUNE_CONFIG", raising=False)
    argv = ["--source", str(creds), "--source", f"{url}/internal/users.json"]
    argv += ["--set", "collect.text_column=user", "--set", "collect.label_column=password"]
    assert dagrun.main(argv) == 2  # a ConfigError, before Airflow starts
    err = capsys.readouterr().err
    assert f"source {creds} is outside collect.allowed_sources" in err and "hunter2" not in err
    assert "collect: {allowed_sources: [" in err and "--config FILE" in err
    # The DAG's collect task, for a trigger form or REST API run with the same Params.
    params = {"source": [str(creds), f"{url}/internal/users.json"], "overrides": ["collect.text_column=user"]}
    with pytest.raises(ConfigError, match=rf"source {re.escape(str(creds))} is outside collect.allowed_sources"):
        steps.step_overrides("collect", params, {}, "r1")
    params["source"].reverse()  # the URL first: refused by itself
    with pytest.raises(ConfigError, match=rf"source {re.escape(url)}/internal/users.json is outside"):
        steps.step_overrides("collect", params, {}, "r1")
    assert requests == [] and not (tmp_path / "home" / "artifacts").exists()


def test_the_error_says_what_the_deployment_file_sets_and_then_the_source_is_read(
    tmp_path, creds, internal_server, monkeypatch
):
    url, requests = internal_server
    monkeypatch.setenv("FINETUNE_ARTIFACT_ROOT", (tmp_path / "artifacts").as_uri())
    trigger = [f"collect.sources={json.dumps([str(creds), f'{url}/internal/users.json'])}"]
    trigger += ["collect.text_column=user", "collect.label_column=password"]
    settings: dict = {}  # the deployment's file, at first without collect.allowed_sources
    for _ in range(2):  # each refusal names the file's collect.allowed_sources with one prefix more
        try:
            steps.trigger_config(deployment_file(tmp_path, **settings), trigger)
            break
        except ConfigError as exc:
            settings = yaml.safe_load(re.search(r"`(collect: \{allowed_sources: .*\})`", str(exc)).group(1))
    wanted = settings["collect"]["allowed_sources"]
    assert wanted == ["pkg://pipeline/data/", f"{creds.parent}/", f"{url}/internal/"]
    cfg = steps.trigger_config(deployment_file(tmp_path, collect={"allowed_sources": wanted}), trigger)
    result = collect.run(cfg)  # the counter counts: an allowed source is fetched
    assert requests == ["/internal/users.json"] and result.rows == 2


def test_a_symlink_out_of_an_allowed_directory_and_dotdot_are_refused(tmp_path, creds):
    allowed = tmp_path / "data"
    allowed.mkdir()
    (allowed / "intents.csv").write_text("text,label\nhi,greet\n")
    (tmp_path / "database").mkdir()
    (tmp_path / "database" / "x.csv").write_text("text,label\nhi,greet\n")
    deployment = deployment_file(tmp_path, collect={"allowed_sources": [str(allowed)]})

    def check(*sources: str) -> None:
        steps.trigger_config(deployment, [f"collect.sources={json.dumps(list(sources))}"])

    check(
        str(allowed / "intents.csv"), str(allowed), f"{allowed}/*.csv", f"{(allowed / 'intents.csv').as_uri()}#rows=1"
    )
    for escape in (
        f"{allowed}/../secrets/creds.csv",
        f"file://{allowed}/../secrets/creds.csv",
        f"{allowed}/*/../../secrets/creds.csv",
        str(tmp_path / "database" / "x.csv"),  # /data never allows /database
    ):
        with pytest.raises(ConfigError, match="outside collect.allowed_sources"):
            check(escape)
    with pytest.raises(ConfigError, match="outside collect.allowed_sources"):  # the default: the shipped data
        steps.trigger_config([], ['collect.sources=["pkg://pipeline/data/../configs/zero2.json"]'])
    (allowed / "link.csv").symlink_to(creds)
    for source in (str(allowed / "link.csv"), f"{allowed}/*.csv", str(allowed)):  # the file, a glob, the directory
        with pytest.raises(ConfigError, match=rf"source {re.escape(source)} is outside collect.allowed_sources"):
            check(source)


def test_remote_prefixes_are_compared_by_bucket_key_and_normalized_url(tmp_path):
    deployment = deployment_file(
        tmp_path, collect={"allowed_sources": ["s3://corpus/intents", "HTTPS://Data.Example.com:443/public/"]}
    )

    def allowed(source: str) -> bool:
        try:
            steps.trigger_config(deployment, [f"collect.sources={json.dumps([source])}"])
        except ConfigError:
            return False
        return True

    assert allowed("s3://corpus/intents/2024/") and allowed("https://data.example.com/public/a.jsonl#weight=2")
    assert allowed("https://DATA.example.com:443/public/a.jsonl")
    assert not allowed("s3://corpus/intents")  # lists intents-old/ too
    assert not allowed("s3://corpus/intents-old/x") and not allowed("s3://other/intents/x")
    assert not allowed("http://data.example.com/public/a.jsonl")  # another scheme
    assert not allowed("https://data.example.com:8443/public/a.jsonl")  # another port
    assert not allowed("https://data.example.com/public/../admin/a.jsonl")
    assert not allowed("https://data.example.com/public/%2e%2e/admin/a.jsonl")
    assert not allowed("https://data.example.com/publicity/a.jsonl")


def test_model_name_within_allowed_model_names_or_the_configs_own():
    with pytest.raises(ConfigError, match="model_name 'payroll' matches no pattern of allowed_model_names"):
        steps.step_overrides("collect", {"model_name": "payroll"}, {}, "r1")
    # The task family's default name, and the default one sent as it is, pass.
    cfg = steps.trigger_config([], ["task=causal-lm", "model_name=support-chat"])
    assert cfg.model_name == "support-chat"
    steps.trigger_config([], ["model_name=support-intents"])
    with pytest.raises(ConfigError, match="allowed_model_names"):
        steps.trigger_config([], ["model_name=support-chat"])  # not this config's own name
    deployment = ['allowed_model_names=["team-a-*"]']
    assert steps.trigger_config(deployment, ["model_name=team-a-intents"]).model_name == "team-a-intents"
    with pytest.raises(ConfigError, match=r"allowed_model_names \['team-a-\*'\]"):
        steps.trigger_config(deployment, ["model_name=team-b-intents"])


@pytest.mark.parametrize(
    "override",
    [
        'collect.allowed_sources=["/"]',
        'collect.allowed_hosts=["169.254.169.254"]',
        'allowed_model_names=["*"]',
    ],
)
def test_a_trigger_cannot_widen_the_scope_even_where_trigger_keys_allow_collect_star(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' may not be set by a trigger"):
        steps.trigger_config(['trigger_keys=["collect.*", "*"]'], [override])


def test_the_deployments_own_sources_are_not_limited(tmp_path, creds):
    cfg = steps.trigger_config(deployment_file(tmp_path, collect={"sources": [str(creds)]}), [])
    assert cfg.collect.sources == [str(creds)] and cfg.collect.allowed_sources == ["pkg://pipeline/data/"]
    assert steps.step_overrides("collect", {}, {}, "r1", deployment=[f"collect.sources={json.dumps([str(creds)])}"])


def test_an_allowed_sources_entry_the_check_cannot_compare_is_refused():
    for prefix, why in (("data/", "relative path"), ("s3://", "names no bucket"), ("ftp://h/x", "unsupported")):
        with pytest.raises(ConfigError, match=rf"collect.allowed_sources: '{re.escape(prefix)}'.*{why}"):
            load_config(None, [f"collect.allowed_sources={json.dumps([prefix])}"])
