import json

import pytest

from pipeline import collect, storage
from pipeline.config import load_config
from pipeline.errors import DataError, ModelError
from pipeline.train import resolve_model
from tests.helpers import shipped_rows, write_jsonl


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v1", "v2"]


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


def test_collect_from_s3_prefix_into_an_s3_artifact_root(s3, tmp_path):
    rows = shipped_rows(2, 20)
    for i, chunk in enumerate((rows[:15], rows[15:])):
        storage.write_bytes(f"s3://{s3}/incoming/part-{i}.jsonl",
                            write_jsonl(tmp_path / f"p{i}.jsonl", chunk).read_bytes())
    cfg = load_config(None, [f"collect.sources={json.dumps([f's3://{s3}/incoming/'])}",
                             f"artifact_root=s3://{s3}/artifacts", "run_id=s"])
    result = collect.run(cfg)
    assert result.snapshot_uri.startswith(f"s3://{s3}/artifacts/snapshots/") and result.rows == 40
    assert len(collect.load_snapshot(result.snapshot_uri)) == 40
    assert [s["uri"] for s in storage.read_json(result.manifest_uri)["sources"]] == [
        f"s3://{s3}/incoming/part-0.jsonl", f"s3://{s3}/incoming/part-1.jsonl"]


def test_base_model_from_an_s3_prefix_loads(s3, tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    storage.publish_dir(tiny_model_dir, f"s3://{s3}/models/tiny")
    local = resolve_model(f"s3://{s3}/models/tiny", tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(local, num_labels=2)
    assert model.config.num_hidden_layers == 2
    with pytest.raises(ModelError, match="holds no config.json"):
        resolve_model(str(tmp_path), tmp_path)


def test_s3_missing_bucket_and_prefix_name_the_source(s3):
    with pytest.raises(DataError, match="cannot list s3://no-such-bucket-here/data/: The specified bucket does not exist"):
        _collect("s3://no-such-bucket-here/data/")
    with pytest.raises(DataError, match=f"source s3://{s3}/nothing/ matches no objects"):
        _collect(f"s3://{s3}/nothing/")


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server: /data.jsonl is a file, /missing answers 404, /broken 500."""
    import http.server
    import threading

    write_jsonl(tmp_path / "data.jsonl", shipped_rows(2, 5))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path.startswith("/broken"):
                self.send_error(500, "boom")
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_sources(http_server):
    assert _collect(f"{http_server}/data.jsonl").rows == 10
    with pytest.raises(DataError, match=r"cannot download http://127.0.0.1:\d+/missing.jsonl: HTTP Error 404"):
        _collect(f"{http_server}/missing.jsonl")
    with pytest.raises(DataError, match=r"cannot download http://127.0.0.1:\d+/broken.jsonl: HTTP Error 500"):
        _collect(f"{http_server}/broken.jsonl")


def _collect(source):
    return collect.run(load_config(None, [f"collect.sources={json.dumps([source])}", "run_id=h"]))
