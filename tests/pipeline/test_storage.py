import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from pipeline import cli, collect, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, ModelError, TransientError
from pipeline.models import resolve_model
from pipeline.snapshot import load_snapshot
from pipeline.storage import local_publish
from tests.helpers import collect_snapshot, moto_server, shipped_rows, write_jsonl


def test_local_write_is_atomic_and_pkg_uris_resolve(tmp_path):
    target = (tmp_path / "a" / "b.json").as_uri()
    storage.write_json(target, {"x": 1})
    assert storage.read_json(target) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temp files left behind
    assert storage.local_path("pkg://pipeline/configs/zero2.json").is_file()
    with pytest.raises(DataError, match="Python package 'no_such_pkg' is not installed"):
        storage.local_path("pkg://no_such_pkg/x")


def test_publish_dir_replaces_a_directory_whole(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "old.txt").write_text("1")
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "new.txt").write_text("2")
    uri = (tmp_path / "out").as_uri()
    storage.publish_dir(tmp_path / "v1", uri)
    storage.publish_dir(tmp_path / "v2", uri)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert storage.list_tree(uri) == [f"{uri}/new.txt"]
    assert storage.list_tree(tmp_path.as_uri()) == [
        f"{tmp_path.as_uri()}/{n}" for n in ("out/new.txt", "v1/old.txt", "v2/new.txt")
    ]
    # Beside them only hidden versions: the one published and the one it replaced.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["out", "v1", "v2"]
    assert len(list(tmp_path.glob(".out.published.*"))) == 2


def test_s3_round_trip_and_errors(s3, tmp_path):
    uri = f"s3://{s3}/a/b.json"
    assert not storage.exists(uri)
    storage.write_json(uri, {"y": 2})
    assert storage.exists(uri) and storage.read_json(uri) == {"y": 2}
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(DataError, match=f"cannot read s3://{s3}/missing.json"):
        storage.read_bytes(f"s3://{s3}/missing.json")
    with pytest.raises(DataError, match="no objects under this prefix"):
        storage.fetch_dir(f"s3://{s3}/nothing/", tmp_path / "x")


def test_put_file_publishes_whole_files_locally_and_to_s3(s3, tmp_path):
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    target = tmp_path / "out" / "data.bin"
    storage.put_file(tmp_path / "big.bin", target.as_uri())
    storage.put_file(tmp_path / "big.bin", target.as_uri())  # replacing is fine too
    assert target.read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]  # no temp copy left beside it
    storage.put_file(tmp_path / "big.bin", f"s3://{s3}/x/data.bin")
    assert storage.read_bytes(f"s3://{s3}/x/data.bin") == (tmp_path / "big.bin").read_bytes()
    info = storage.object_info(f"s3://{s3}/x/data.bin")
    assert info["size"] == 3 << 20 and info["etag"] and info["last_modified"].startswith("20")
    assert storage.object_info(f"s3://{s3}/x/") is None and storage.object_info(f"s3://{s3}/x/nope") is None
    storage.download(f"s3://{s3}/x/data.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()


def test_collect_from_s3_prefix_into_an_s3_artifact_root(s3, tmp_path):
    rows = shipped_rows(2, 20)
    for i, chunk in enumerate((rows[:15], rows[15:])):
        storage.write_bytes(
            f"s3://{s3}/incoming/part-{i}.jsonl", write_jsonl(tmp_path / f"p{i}.jsonl", chunk).read_bytes()
        )
    cfg = load_config(
        None,
        [f"collect.sources={json.dumps([f's3://{s3}/incoming/'])}", f"artifact_root=s3://{s3}/artifacts", "run_id=s"],
    )
    result = collect.run(cfg)
    assert result.snapshot_uri.startswith(f"s3://{s3}/artifacts/snapshots/") and result.rows == 40
    assert len(load_snapshot(result.snapshot_uri)) == 40
    sources = storage.read_json(result.manifest_uri)["sources"]
    assert [s["uri"] for s in sources] == [f"s3://{s3}/incoming/part-0.jsonl", f"s3://{s3}/incoming/part-1.jsonl"]
    for i, entry in enumerate(sources):
        raw = (tmp_path / f"p{i}.jsonl").read_bytes()
        assert (entry["bytes"], entry["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
        assert entry["rows"] == [15, 25][i]
        assert entry["etag"] == hashlib.md5(raw).hexdigest()  # a single-part upload's ETag is its MD5
        assert entry["last_modified"].startswith("20")
    # The finetune DAG re-collects a snapshot an asset event announced: same bytes, same URI.
    again = collect.run(
        load_config(
            None,
            [f"collect.sources={json.dumps([result.snapshot_uri])}", f"artifact_root=s3://{s3}/artifacts", "run_id=s2"],
        )
    )
    assert (again.sha256, again.snapshot_uri) == (result.sha256, result.snapshot_uri)
    keys = storage.list_objects(f"s3://{s3}/artifacts/snapshots/")
    assert keys == [result.snapshot_uri, result.manifest_uri]


def test_base_model_from_an_s3_prefix_loads(s3, tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    storage.publish_dir(tiny_model_dir, f"s3://{s3}/models/tiny")
    local = resolve_model(f"s3://{s3}/models/tiny", tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(local, num_labels=2)
    assert model.config.num_hidden_layers == 2
    with pytest.raises(ModelError, match="holds no config.json"):
        resolve_model(str(tmp_path), tmp_path)
    # A tokenizer alone (validate) does not download the weights.
    light = Path(resolve_model(f"s3://{s3}/models/tiny", tmp_path / "light", weights=False))
    assert (light / "tokenizer.json").is_file() and (light / "config.json").is_file()
    assert not list(light.glob("*.safetensors")) and list(Path(local).glob("*.safetensors"))


@pytest.mark.parametrize("name", ["../../escape.txt", "{outside}"])  # up and out; a '/' that makes it absolute
def test_fetch_dir_refuses_a_key_that_leads_outside_its_directory(s3, tmp_path, name):
    import boto3

    outside = tmp_path / "escape.txt"
    key = f"model/{name.format(outside=outside)}"
    client = boto3.client("s3")
    client.put_object(Bucket=s3, Key="model/config.json", Body=b"{}")
    client.put_object(Bucket=s3, Key=key, Body=b"escaped")
    # S3, and Moto with it, keeps a key as written: the '..' and the '//' are part of the name.
    listed = client.list_objects_v2(Bucket=s3, Prefix="model/")["Contents"]
    assert [o["Key"] for o in listed] == [key, "model/config.json"]
    dest = tmp_path / "scratch" / "model"  # '../../escape.txt' from here is tmp_path/escape.txt
    with pytest.raises(DataError) as refused:
        storage.fetch_dir(f"s3://{s3}/model", dest)
    assert f"the key '{key}' under the prefix s3://{s3}/model/ names a path outside" in str(refused.value)
    assert not outside.exists() and not dest.exists()  # checked before anything was downloaded
    # A manifest is a name someone else chose too.
    storage.write_json(
        f"s3://{s3}/model/{storage.PUBLISHED_MANIFEST}", {"files": [{"path": key.removeprefix("model/"), "size": 7}]}
    )
    with pytest.raises(DataError, match="names a path outside"):
        storage.fetch_dir(f"s3://{s3}/model", dest, published=True)
    assert not outside.exists() and not dest.exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_s3_publish_dir_writes_a_manifest_and_fetches_back_what_it_lists(s3, tmp_path):
    (tmp_path / "v1" / "sub").mkdir(parents=True)
    (tmp_path / "v1" / "config.json").write_bytes(b"{}")
    (tmp_path / "v1" / "sub" / "weights.bin").write_bytes(os.urandom(1000))
    uri = f"s3://{s3}/runs/r/train/model"
    assert storage.publish_dir(tmp_path / "v1", uri) == uri
    assert storage.read_json(f"{uri}/{storage.PUBLISHED_MANIFEST}") == {
        "files": [
            {"path": relative, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for relative, data in _tree(tmp_path / "v1").items()
        ]
    }
    assert _tree(storage.fetch_dir(uri, tmp_path / "back", published=True)) == _tree(tmp_path / "v1")
    # Read as a plain prefix (a base model), the manifest is bookkeeping, not a file of the model.
    assert _tree(storage.fetch_dir(uri, tmp_path / "plain")) == _tree(tmp_path / "v1")


def test_a_prefix_without_a_manifest_is_not_a_published_directory(s3, tmp_path):
    # What a reader finds while a publish is under way, after one was cut short, or where a person
    # uploaded a model by hand: files, no manifest.
    storage.write_bytes(f"s3://{s3}/half/config.json", b"{}")
    with pytest.raises(
        DataError,
        match=rf"^s3://{s3}/half/: not a \(completely\) published directory: it has "
        rf"no _MANIFEST.json",
    ):
        storage.fetch_dir(f"s3://{s3}/half", tmp_path / "x", published=True)
    with pytest.raises(DataError, match="not a \\(completely\\) published directory"):
        resolve_model(f"s3://{s3}/half", tmp_path, what="evaluate.model_uri", published=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "model").exists()
    # As a base model, a person's upload without a manifest still loads.
    assert _tree(Path(resolve_model(f"s3://{s3}/half", tmp_path))) == {"config.json": b"{}"}


def test_s3_republish_with_fewer_files_fetches_only_the_new_set(s3, tmp_path):
    uri = f"s3://{s3}/runs/r/train/model"
    for version, files in (
        (
            "v1",
            {"config.json": b"{1}", "model-00001-of-00002.safetensors": b"a", "model-00002-of-00002.safetensors": b"b"},
        ),
        ("v2", {"config.json": b"{22}", "model.safetensors": b"ab"}),
    ):
        (tmp_path / version).mkdir()
        for name, data in files.items():
            (tmp_path / version / name).write_bytes(data)
        storage.publish_dir(tmp_path / version, uri)
    assert _tree(storage.fetch_dir(uri, tmp_path / "back", published=True)) == _tree(tmp_path / "v2")
    assert storage.list_objects(uri + "/") == [
        f"{uri}/{name}" for name in (storage.PUBLISHED_MANIFEST, "config.json", "model.safetensors")
    ]  # v1's shards are gone
    # A file under the prefix that no manifest lists (a stray upload, a cut-short publish's) is not fetched.
    storage.write_bytes(f"{uri}/model-00001-of-00002.safetensors", b"stale")
    assert _tree(storage.fetch_dir(uri, tmp_path / "again", published=True)) == _tree(tmp_path / "v2")
    # A listed file that changed after its manifest was written: the directory is not what it lists.
    storage.write_bytes(f"{uri}/config.json", b"{333}")
    with pytest.raises(DataError, match=f"{uri}: config.json has 5 bytes, its manifest says 4"):
        storage.fetch_dir(uri, tmp_path / "changed", published=True)


def test_s3_missing_bucket_key_and_prefix_name_the_source(s3):
    assert "cannot list s3://no-such-bucket-here/data/: The specified bucket does not exist" in _fails(
        "s3://no-such-bucket-here/data/"
    )
    assert f"source s3://{s3}/nothing/ matches no objects" in _fails(f"s3://{s3}/nothing/")
    storage.write_bytes(f"s3://{s3}/data/a.jsonl", b'{"text": "a", "label": "b"}\n')
    assert f"source s3://{s3}/data/b.jsonl matches no objects (no such key" in _fails(f"s3://{s3}/data/b.jsonl")


@pytest.fixture(scope="module")
def iam_s3_server():
    """A Moto server of its own that enforces IAM: INITIAL_NO_AUTH_ACTION_COUNT lets the first
    three calls through unsigned (creating an admin), after which every call is checked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with moto_server({**env, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, probe_path="/moto-api/") as endpoint:
        yield endpoint


def _keys_of(iam, user: str, policy: dict) -> dict:
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def test_s3_access_denied_names_the_object(iam_s3_server, monkeypatch):
    import boto3

    region = {"endpoint_url": iam_s3_server, "region_name": "us-east-1"}
    unsigned = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}  # the 3 free calls
    admin = _keys_of(
        boto3.client("iam", **region, **unsigned),
        "admin",
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]},
    )
    as_admin = boto3.client("s3", **region, **admin)
    as_admin.create_bucket(Bucket="locked")
    as_admin.put_object(Bucket="locked", Key="d/a.jsonl", Body=b'{"text": "a", "label": "b"}\n')
    reader = _keys_of(
        boto3.client("iam", **region, **admin),
        "lister",
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}]},
    )  # may list, may not read
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # as in a fresh step process: no cached keys
    monkeypatch.setenv("AWS_ENDPOINT_URL", iam_s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", reader["aws_secret_access_key"])
    assert "cannot read s3://locked/d/a.jsonl: access denied" in _fails("s3://locked/d/a.jsonl")
    # Listing works with these keys (the error names the object it found), reading does not.
    assert "cannot read s3://locked/d/a.jsonl: access denied" in _fails("s3://locked/d/")


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server: /data.jsonl is a file, /missing answers 404, /broken 500, and
    /flaky/data.jsonl answers 503 twice before serving the file."""
    import http.server
    import threading

    write_jsonl(tmp_path / "data.jsonl", shipped_rows(2, 5))
    flaky_requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path.startswith("/broken"):
                self.send_error(500, "boom")
            elif self.path.startswith("/flaky/"):
                flaky_requests.append(self.path)
                if len(flaky_requests) <= 2:
                    self.send_error(503, "busy")
                else:
                    self.path = self.path[len("/flaky") :]
                    super().do_GET()
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_sources(http_server, tmp_path):
    result = collect_snapshot([f"{http_server}/data.jsonl"], "run_id=h")
    assert result.rows == 10
    [entry] = storage.read_json(result.manifest_uri)["sources"]
    raw = (tmp_path / "data.jsonl").read_bytes()
    assert (entry["bytes"], entry["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert entry["last_modified"].startswith("20")  # from the Last-Modified header
    assert f"cannot download {http_server}/missing.jsonl: HTTP Error 404" in _fails(f"{http_server}/missing.jsonl")
    broken = _fails(f"{http_server}/broken.jsonl", exit_code=75)  # a failing server may recover: retried
    assert f"cannot download {http_server}/broken.jsonl: HTTP Error 500" in broken and "(after 3 retries)" in broken


def test_http_transient_errors_are_retried(http_server):
    result = collect_snapshot([f"{http_server}/flaky/data.jsonl"], "run_id=h")  # 503, 503, then the file
    assert result.rows == 10


@pytest.fixture
def redirector():
    """A second loopback HTTP server: /<name>?to=URL answers 302 to URL; /loop.jsonl redirects to
    itself for ever. Yields its URL and the paths it was asked for."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlsplit

    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            target = "/loop.jsonl" if self.path == "/loop.jsonl" else parse_qs(urlsplit(self.path).query)["to"][0]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def _via(redirector_url: str, target: str) -> str:
    from urllib.parse import quote

    return f"{redirector_url}/data.jsonl?to={quote(target, safe='')}"


def test_http_redirect_to_another_loopback_port_needs_allowed_hosts(http_server, redirector, tmp_path):
    source, target = _via(redirector[0], f"{http_server}/data.jsonl"), f"{http_server}/data.jsonl"
    here, there = redirector[0].removeprefix("http://"), http_server.removeprefix("http://")
    assert (
        f"cannot download {source}: refused the redirect from {source} to {target}: 127.0.0.1 resolves to "
        f"127.0.0.1, a loopback address; add '{there}' to collect.allowed_hosts"
    ) in _fails(source)
    # A list names every host a download may reach, the source's too.
    assert (
        f"refused the redirect from {source} to {target}: {there} is not in collect.allowed_hosts ['{here}']"
    ) in _fails(source, f"collect.allowed_hosts={json.dumps([here])}")
    assert f"source {source}: {here} is not in collect.allowed_hosts ['{there}']" in _fails(
        source, f"collect.allowed_hosts={json.dumps([there])}"
    )
    # Listed as host:port each, or as the host alone (any port), the redirect is followed. The
    # manifest keeps the URL the config names (collecting it again works) and where the bytes came from.
    for allowed in ([here, there], ["127.0.0.1"]):
        result = collect_snapshot([source], "run_id=h", f"collect.allowed_hosts={json.dumps(allowed)}")
        [entry] = storage.read_json(result.manifest_uri)["sources"]
        assert (result.rows, entry["uri"], entry["final_uri"]) == (10, source, target)
        assert entry["sha256"] == hashlib.sha256((tmp_path / "data.jsonl").read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="collect.allowed_hosts: 'http://127.0.0.1' is not a host or host:port"):
        load_config(None, ['collect.allowed_hosts=["http://127.0.0.1"]'])


def test_http_redirect_to_the_metadata_address_is_refused_before_connecting(redirector):
    import sys
    import time

    target = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    source = _via(redirector[0], target)
    connects, recording = [], [True]
    # An audit hook sees every socket.connect of this process: proof that none went to the target.
    sys.addaudithook(lambda event, args: connects.append(args[1]) if event == "socket.connect" and recording else None)
    started = time.monotonic()
    try:
        error = _fails(source)
    finally:
        recording.clear()  # hooks cannot be removed; this one stops recording
    assert time.monotonic() - started < 5  # no 30 s connect timeout to a black-holed address either
    assert (
        f"cannot download {source}: refused the redirect from {source} to {target}: 169.254.169.254 resolves "
        "to 169.254.169.254, a link-local address; add '169.254.169.254:80' to collect.allowed_hosts"
    ) in error
    assert redirector[1] == [source.removeprefix(redirector[0])]
    assert ("127.0.0.1", int(redirector[0].rpartition(":")[2])) in connects
    assert not [address for address in connects if address[0] == "169.254.169.254"]


def _record_connects(refuse: str | None = None):
    """The addresses every socket.connect of this process goes to, until the function returned
    with them is called. A connect to ``refuse`` fails at once, as to a host that is down, and
    never leaves the machine."""
    import sys

    connects, recording = [], [True]

    def hook(event, args):
        if event == "socket.connect" and recording:
            connects.append(args[1])
            if refuse and args[1][0] == refuse:
                raise ConnectionRefusedError(f"test: no connection to {refuse}")

    sys.addaudithook(hook)  # hooks cannot be removed; this one stops when recording is cleared
    return connects, recording.clear


def test_http_redirect_to_a_rebinding_name_connects_where_it_checked(http_server, redirector, monkeypatch):
    import socket

    # The resolver (not the component under test) answers a public address for the name the
    # first time, when the guard checks it, and loopback afterwards, when a second look-up connects.
    public, port = "93.184.216.34", int(http_server.rpartition(":")[2])
    real, answers = socket.getaddrinfo, [public]

    def rebinding(host, *args, **kwargs):
        if host != "data.rebind.test":
            return real(host, *args, **kwargs)
        address = answers.pop() if answers else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(storage.http, "RETRIES", 0)  # one try is enough to see where it goes
    source = _via(redirector[0], f"http://data.rebind.test:{port}/data.jsonl")
    connects, stop = _record_connects(refuse=public)
    try:
        error = _fails(source, exit_code=75)  # the checked address is down: no fallback to loopback
    finally:
        stop()
    assert f"cannot download {source} (redirected to http://data.rebind.test:{port}/data.jsonl)" in error
    assert (public, port) in connects and ("127.0.0.1", port) not in connects


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::7f00:1", "64:ff9b:1::7f00:1", "2002:7f00:1::1", "::ffff:7f00:1", "::127.0.0.1"],
    ids=["nat64", "nat64-local", "6to4", "mapped", "compatible"],
)
def test_http_redirect_to_ipv6_that_embeds_loopback_is_refused_before_connecting(redirector, address):
    import ipaddress

    port = int(redirector[0].rpartition(":")[2])  # the redirector itself, reached another way
    target = f"http://[{address}]:{port}/data.jsonl"
    source = _via(redirector[0], target)
    connects, stop = _record_connects()
    try:
        error = _fails(source)
    finally:
        stop()
    written = ipaddress.ip_address(address)
    assert (
        f"cannot download {source}: refused the redirect from {source} to {target}: {address} resolves to "
        f"{written}, which reaches 127.0.0.1, a loopback address; add '[{address}]:{port}' to collect.allowed_hosts"
    ) in error
    assert [where[:2] for where in connects] == [("127.0.0.1", port)] and len(redirector[1]) == 1


def test_http_redirects_keep_the_scheme_and_stop_after_five(redirector):
    source = _via(redirector[0], "https://127.0.0.1:9/data.jsonl")
    assert (
        f"refused the redirect from {source} to https://127.0.0.1:9/data.jsonl: it changes the scheme from "
        "http to https, which no setting allows"
    ) in _fails(source, 'collect.allowed_hosts=["127.0.0.1"]')
    # Back to the source's own host and port needs no list; a loop ends after five hops.
    loop = f"{redirector[0]}/loop.jsonl"
    assert f"cannot download {loop}: more than 5 redirects (the last to {loop})" in _fails(loop)
    assert redirector[1][1:] == ["/loop.jsonl"] * 6


def _fails(source: str, *sets: str, exit_code: int = 2) -> str:
    """`finetune collect` on ``source`` (and ``--set`` each of ``sets``) must exit ``exit_code``,
    publish no snapshot and say why in error.json."""
    cfg = load_config(None, ["run_id=bad"])
    snapshots = storage.local_path(cfg.artifact_root) / "snapshots"
    before = sorted(snapshots.rglob("*"))
    argv = ["collect", "--set", f"collect.sources={json.dumps([source])}", "--set", "run_id=bad"]
    assert cli.main([*argv, *(a for s in sets for a in ("--set", s))]) == exit_code
    assert sorted(snapshots.rglob("*")) == before
    return storage.read_json(cfg.step_uri("collect") + "/error.json")["error"]


def _publish_numbered(src: Path, uri: str, number: int, files: int) -> None:
    src = src / str(number)  # new files: rewriting old ones is what costs on ext4 (auto_da_alloc)
    src.mkdir()
    for i in range(files):
        (src / f"{i:02d}.txt").write_text(f"{number}:{i}")
    storage.publish_dir(src, uri)


def test_local_republish_under_concurrent_readers_is_never_missing_or_torn(tmp_path):
    """A reader takes the directory from fetch_dir (as one read) and reads all its files while
    the main thread republishes 400 times: it must find every file, all of one publish."""
    import threading

    files, uri, src = 12, (tmp_path / "out").as_uri(), tmp_path / "src"
    src.mkdir()
    _publish_numbered(src, uri, 0, files)
    stop, seen = threading.Event(), {"reads": 0, "missing": 0, "torn": 0}

    def reader() -> None:
        while not stop.is_set():
            try:
                root = storage.fetch_dir(uri, tmp_path / "unused", published=True)
            except DataError:  # the directory itself was gone for a moment
                seen["missing"] += files
                continue
            numbers = set()
            for i in range(files):
                try:
                    numbers.add((root / f"{i:02d}.txt").read_text().partition(":")[0])
                except FileNotFoundError:
                    seen["missing"] += 1
            seen["reads"] += 1
            seen["torn"] += len(numbers) > 1
            time.sleep(0.001)  # let the publisher have the GIL: a reader a few hundred times a second

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for number in range(1, 401):
            _publish_numbered(src, uri, number, files)
    finally:
        stop.set()
        thread.join()
    assert seen["reads"] >= 50, seen  # the reader really ran beside the publishes
    assert (seen["missing"], seen["torn"]) == (0, 0), seen
    final = storage.fetch_dir(uri, tmp_path / "unused")
    assert sorted(p.read_text() for p in final.iterdir()) == sorted(f"400:{i}" for i in range(files))


def test_local_publish_migrates_a_plain_directory_prunes_old_versions_and_deletes_whole(tmp_path):
    out, uri, src = tmp_path / "out", (tmp_path / "out").as_uri(), tmp_path / "src"
    out.mkdir()
    (out / "legacy.txt").write_text("before symlinks")  # what a publish wrote before this layout
    src.mkdir()
    _publish_numbered(src, uri, 1, 2)
    assert out.is_symlink() and sorted(p.name for p in out.iterdir()) == ["00.txt", "01.txt"]
    versions = sorted(tmp_path.glob(".out.published.*"))
    assert [sorted(p.name for p in v.iterdir()) for v in versions] == [["legacy.txt"], ["00.txt", "01.txt"]]
    pinned = storage.local_path(uri)
    assert pinned == versions[1] and storage.fetch_dir(uri, tmp_path / "unused") == pinned
    for number in (2, 3):
        _publish_numbered(src, uri, number, 2)
    assert len(list(tmp_path.glob(".out.published.*"))) == 4  # all replaced within KEEP_REPLACED_S
    assert (pinned / "00.txt").read_text() == "1:0"  # a reader holding an old version still has it
    past = time.time() - local_publish.KEEP_REPLACED_S - 1
    for version in tmp_path.glob(".out.published.*"):
        os.utime(version, (past, past))  # replaced long ago, every one
    _publish_numbered(src, uri, 4, 2)
    kept = sorted(tmp_path.glob(".out.published.*"))
    assert [(v / "00.txt").read_text() for v in kept] == ["3:0", "4:0"]  # the one just replaced stays
    storage.delete(uri)
    assert not out.exists() and not out.is_symlink() and not list(tmp_path.glob(".out.*"))


def test_s3_fetch_refuses_a_published_file_changed_in_the_bucket_naming_it(s3, tmp_path):
    import boto3

    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "config.json").write_bytes(b"{}")
    (tmp_path / "v1" / "model.safetensors").write_bytes(b"weights-1")
    uri = f"s3://{s3}/runs/r/train/model"
    storage.publish_dir(tmp_path / "v1", uri)
    # Same size, other bytes: only the sha256 tells.
    boto3.client("s3").put_object(Bucket=s3, Key="runs/r/train/model/model.safetensors", Body=b"weights-X")
    with pytest.raises(DataError, match=rf"^{uri}: model.safetensors has sha256 [0-9a-f]{{64}}, its manifest says"):
        storage.fetch_dir(uri, tmp_path / "back", published=True)
    with pytest.raises(DataError, match="model.safetensors has sha256"):
        resolve_model(uri, tmp_path / "scratch", what="evaluate.model_uri", published=True)
    assert _tree(storage.fetch_dir(uri, tmp_path / "plain")) != _tree(tmp_path / "v1")  # unchecked as a base model


def test_s3_a_file_that_no_longer_matches_because_of_a_republish_is_retried(s3, tmp_path):
    """The manifest a fetch read was replaced before the mismatch was found: a republish ran
    meanwhile, which a retry gets past (TransientError), unlike a file changed by hand."""
    uri = f"s3://{s3}/model"
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "config.json").write_text(version)
    storage.publish_dir(tmp_path / "v1", uri)
    etag_v1, listed_v1 = storage._published_files(uri + "/")
    storage.publish_dir(tmp_path / "v2", uri)
    storage.download(f"{uri}/config.json", tmp_path / "fetched.json")  # v2's bytes, checked against v1's manifest
    with pytest.raises(TransientError, match=rf"^{uri}: config.json has sha256 .*republished while it was fetched"):
        storage._check_published(uri, "config.json", tmp_path / "fetched.json", listed_v1["config.json"], etag_v1)
    etag_v2, listed_v2 = storage._published_files(uri + "/")
    storage._check_published(uri, "config.json", tmp_path / "fetched.json", listed_v2["config.json"], etag_v2)
