import json
import os
import re
import shutil
from pathlib import Path

import pytest

from pipeline import register, storage, tracking
from pipeline.config import load_config
from pipeline.errors import DataError, ModelError
from pipeline.tracking import client
from tests.helpers import aliases, promotion_audit


def _inputs(
    tmp_path, classifier_dir, name, promote, accuracy, metrics=None, champion="", champion_accuracy=None, settings=()
):
    uris = {step: (tmp_path / f"{name}-{step}.json").as_uri() for step in ("collect", "train", "evaluate")}
    storage.write_json(uris["collect"], {"sha256": "ab" * 32, "rows": 100, "rows_train": 80, "rows_eval": 20})
    storage.write_json(
        uris["train"],
        {
            "model_uri": str(classifier_dir),
            "mlflow_run_id": "",
            "snapshot_uri": "file:///data/snap.parquet",
            "config_sha256": "cd" * 32,
        },
    )
    storage.write_json(
        uris["evaluate"],
        {
            "metrics": metrics or {"accuracy": accuracy, "macro_f1": accuracy},
            "gate_metric": "accuracy",
            "promote": promote,
            "reason": f"test {name}",
            "champion_version": champion,
            "champion_metrics": {} if champion_accuracy is None else {"accuracy": champion_accuracy},
            "greater_is_better": True,
        },
    )
    steps = [f"register.{step}_result_uri={uri}" for step, uri in uris.items()]
    return load_config(None, [f"run_id={name}", *settings, *steps])


def test_register_versions_aliases_and_promotion(tmp_path, classifier_dir, capsys):
    # v1 once scored 1.0, on the easier split it was evaluated on then.
    first = register.run(_inputs(tmp_path, classifier_dir, "r1", True, 1.0))
    assert first.version == "1" and first.aliases == ["challenger", "champion"]
    second = register.run(_inputs(tmp_path, classifier_dir, "r2", False, 0.7))
    assert second.aliases == ["challenger"] and not second.promoted
    assert (
        "To promote it anyway, trigger the promote DAG with version=2, force=true and a reason"
        in capsys.readouterr().err
    )
    assert aliases(client()) == {"champion": "1", "challenger": "2"}
    # v3 beat v1 head-to-head on today's data (0.9 against 0.85): evaluate's verdict stands, not
    # a second one from v1's 1.0 on another split.
    third = register.run(_inputs(tmp_path, classifier_dir, "r3", True, 0.9, champion="1", champion_accuracy=0.85))
    assert aliases(client()) == {"champion": "3", "challenger": "3", "previous_champion": "1"}
    assert first.outside_moves == second.outside_moves == third.outside_moves == []
    # Someone points previous_champion elsewhere in MLflow's UI: the next register reports it.
    client().set_registered_model_alias("support-intents", "previous_champion", "2")
    # Evaluated against v1, but v3 is champion by now: register must not guess, v4 stays challenger.
    fourth = register.run(_inputs(tmp_path, classifier_dir, "r4", True, 0.95, champion="1", champion_accuracy=0.8))
    assert not fourth.promoted and aliases(client()) == {"champion": "3", "challenger": "4", "previous_champion": "2"}
    [moved] = fourth.outside_moves
    assert moved.startswith("previous_champion is version 2, but the pipeline's audit leaves it version 1 (promoted")
    assert f"register: WARNING support-intents: {moved}" in capsys.readouterr().err
    (refusal,) = [r for r in promotion_audit(client()) if r.data.tags["promotion.version"] == "4"]
    assert refusal.data.tags["promotion.outcome"] == "refused"
    assert (
        "champion is version 3 now, not version 1 that evaluate compared version 4 against"
        in (refusal.data.tags["promotion.why"])
    )
    assert client().get_model_version("support-intents", "4").tags[register.PROMOTION_DONE] == "refused"
    # What each moved, in order: one alias event each (tests/dags/test_events.py sends them).
    moved = [[(m.alias, m.previous_version, m.version) for m in r.alias_moves] for r in (first, second, third, fourth)]
    assert moved == [
        [("challenger", "", "1"), ("champion", "", "1")],
        [("challenger", "1", "2")],
        [("challenger", "2", "3"), ("previous_champion", "", "1"), ("champion", "1", "3")],
        [("challenger", "3", "4")],
    ]
    (promotion,) = [r for r in promotion_audit(client()) if r.data.tags["promotion.version"] == "3"]
    assert {m.audit_run_id for m in third.alias_moves[1:]} == {promotion.info.run_id}
    assert third.alias_moves[2].metrics["accuracy"] == 0.9 and third.alias_moves[1].metrics["accuracy"] == 1.0
    assert third.gate["passed"] and not third.gate["forced"] and third.gate["metric"] == "accuracy"
    version = client().get_model_version("support-intents", third.version)
    assert version.tags["finetune.run_id"] == "r3" and version.tags["metric.accuracy"] == "0.900000"
    gate = json.loads(version.tags["finetune.gate"])
    assert gate["promote"] is True and gate["champion_version"] == "1" and gate["snapshot_sha256"] == "ab" * 32
    assert gate["metrics"]["accuracy"] == 0.9 and gate["champion_metrics"] == {"accuracy": 0.85}
    assert gate["greater_is_better"] is True and gate["promotion_margin"] == 0.0
    run = client().get_run(third.mlflow_run_id)
    assert run.data.tags["finetune.run_id"] == "r3"
    # Embedded default: artifacts stay beside the SQLite file under FINETUNE_HOME, not in ./mlruns.
    location = client().get_experiment_by_name("support-intents").artifact_location
    assert location == (Path(os.environ["FINETUNE_HOME"]) / "mlartifacts").as_uri()


def test_champion_loads_and_predicts_through_pyfunc(tmp_path, classifier_dir):
    import mlflow

    register.run(_inputs(tmp_path, classifier_dir, "p1", True, 0.8))
    with tracking.module_api():
        model = mlflow.pyfunc.load_model("models:/support-intents@champion")
        local = mlflow.artifacts.download_artifacts("models:/support-intents@champion", dst_path=str(tmp_path / "m"))
    predictions = model.predict(register.INPUT_EXAMPLE)
    assert len(predictions) == len(register.INPUT_EXAMPLE)
    assert set(predictions["label"]) <= {"order_status", "password_reset", "refund_request"}
    assert model.metadata.signature is not None
    requirements = (tmp_path / "m" / "requirements.txt").read_text() if local else ""
    assert "transformers==" in requirements and "torch==" in requirements and "torchvision" not in requirements


def test_missing_gate_metric_registers_nothing(tmp_path, classifier_dir):
    register.run(_inputs(tmp_path, classifier_dir, "ok", True, 0.8))
    before = aliases(client())
    with pytest.raises(DataError, match="gate metric 'accuracy' missing from the evaluation metrics"):
        register.run(_inputs(tmp_path, classifier_dir, "bad", True, 0.9, metrics={"macro_f1": 0.9}))
    assert aliases(client()) == before
    assert len(client().search_model_versions("name='support-intents'")) == 1


def test_lineage_model_card_and_idempotent_rerun(tmp_path, classifier_dir, monkeypatch):
    import mlflow

    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "finetune")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-11-29T00:00:00+00:00")
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", "2")
    cfg = _inputs(tmp_path, classifier_dir, "lin", True, 0.8)
    first = register.run(cfg)
    version = client().get_model_version("support-intents", first.version)
    tags = version.tags
    assert tags["airflow.dag_id"] == "finetune" and tags["airflow.try_number"] == "2"
    assert tags["airflow.run_id"] == "manual__2026-11-29T00:00:00+00:00"
    assert tags["finetune.snapshot_sha256"] == "ab" * 32 and tags["finetune.config_sha256"] == "cd" * 32
    assert len(tags["finetune.git_commit"]) == 40  # this checkout's commit
    assert "## Intended use" in version.description and "| accuracy | 0.8000 | - |" in version.description
    with tracking.module_api():
        card = mlflow.artifacts.load_text(f"runs:/{first.mlflow_run_id}/model_card.md")
    assert card == version.description

    again = register.run(cfg)  # a retried task: same pipeline run, same version
    assert again.version == first.version
    assert len(client().search_model_versions("name='support-intents'")) == 1


class Crash(BaseException):
    """The process dying right after a call reached the registry (not an Exception: nothing catches it)."""


class CrashingClient:
    """The real MLflow client, except that the first call of ``method`` matching ``when`` goes
    through to the registry and then the process 'dies'."""

    def __init__(self, real, method, when=lambda *args, **kwargs: True):
        self.real, self.method, self.when, self.crashed = real, method, when, False

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if name != self.method or self.crashed:
            return attr

        def call(*args, **kwargs):
            result = attr(*args, **kwargs)
            if self.when(*args, **kwargs):
                self.crashed = True
                raise Crash(f"died after {name}")
            return result

        return call


def _alias_is(alias):
    return lambda name, set_alias, version: set_alias == alias


@pytest.mark.parametrize(
    "method, when, attempts",
    [
        ("create_model_version", lambda *a, **k: True, 1),  # the version exists, nothing else
        ("set_registered_model_alias", _alias_is("challenger"), 1),  # challenger set, no promotion yet
        # Inside the promotion: its audit record written, no alias moved yet.
        ("create_run", lambda *a, **k: k.get("run_name", "").startswith("promoting"), 2),
        ("set_registered_model_alias", _alias_is("previous_champion"), 2),  # half moved
        ("set_registered_model_alias", _alias_is("champion"), 2),  # moved, the attempt not recorded as done
    ],
    ids=["after-version", "after-challenger", "after-audit", "after-previous-champion", "after-champion"],
)
def test_a_rerun_after_a_crash_ends_where_an_uninterrupted_run_does(
    tmp_path, classifier_dir, monkeypatch, method, when, attempts
):
    from pipeline import tracking

    register.run(_inputs(tmp_path, classifier_dir, "r1", True, 0.8))  # version 1, champion
    real = client()
    crashing = CrashingClient(real, method, when)
    monkeypatch.setattr(tracking, "client", lambda: crashing)
    cfg = _inputs(tmp_path, classifier_dir, "r2", True, 0.9, champion="1")
    with pytest.raises(Crash):
        register.run(cfg)
    assert crashing.crashed
    monkeypatch.setattr(tracking, "client", lambda: real)
    again = register.run(cfg)  # the retry of the task

    assert again.version == "2" and again.promoted
    assert len(real.search_model_versions("name='support-intents'")) == 2
    assert aliases(real) == {"champion": "2", "challenger": "2", "previous_champion": "1"}
    records = [r for r in promotion_audit(real) if r.data.tags["promotion.version"] == "2"]
    # One record per attempt that reached the lock: the crashed one (if it got that far), then the retry's.
    assert len(records) == attempts
    if attempts == 2:  # the crashed attempt shows as what it was: begun, never finished
        assert "promoting" in {r.data.tags["promotion.outcome"] for r in records}
    assert real.get_model_version("support-intents", "2").tags[register.PROMOTION_DONE] in ("promoted", "unchanged")
    assert register.run(cfg).aliases == ["challenger", "champion"]  # and once more changes nothing
    assert aliases(real) == {"champion": "2", "challenger": "2", "previous_champion": "1"}


def test_the_model_card_shows_the_gate_metric_per_language_beside_the_champion():
    cfg = load_config(None, ["run_id=card"])
    evaluated = {
        "metrics": {"accuracy": 0.9},
        "gate_metric": "accuracy",
        "reason": "beats",
        "champion_version": "1",
        "champion_metrics": {"accuracy": 0.85},
        "slices": {"latin": {"rows": 171.0, "accuracy": 1.0}, "zh": {"rows": 171.0, "accuracy": 0.8}},
        "champion_slices": {"zh": {"rows": 171.0, "accuracy": 0.76}},
    }
    card = register.model_card(
        cfg, {"train": {"snapshot_uri": "file:///s.parquet"}, "evaluate": evaluated, "collect": {}, "validate": {}}
    )
    assert "### By language of the eval rows (accuracy)" in card
    assert "| zh | 171 | 0.8000 | 0.7600 |" in card and "| latin | 171 | 1.0000 | - |" in card


def _damaged(classifier_dir, into, damage):
    """A copy of the published classifier with one tensor of its weights damaged."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(classifier_dir, into)
    weights = load_file(into / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = damage(weights[name])
    save_file(weights, into / "model.safetensors", metadata={"format": "pt"})
    return name


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.new_empty(0), "is empty (shape [0]): saved from an ungathered ZeRO-3 partition"),
        (lambda t: t.clone().fill_(float("nan")), "has 32 NaN or infinite values of 32: training diverged"),
    ],
    ids=["zero3-empty", "nan"],
)
def test_a_model_with_an_empty_or_non_finite_tensor_is_refused_and_nothing_registered(
    tmp_path, classifier_dir, damage, message
):
    register.run(_inputs(tmp_path, classifier_dir, "ok", True, 0.8))
    name = _damaged(classifier_dir, tmp_path / "damaged", damage)
    with pytest.raises(ModelError, match=re.escape(f"tensor {name} of model.safetensors {message}")) as refused:
        register.run(_inputs(tmp_path, tmp_path / "damaged", "bad", True, 0.99))
    assert refused.value.exit_code == 2
    assert len(client().search_model_versions("name='support-intents'")) == 1
    assert aliases(client()) == {"champion": "1", "challenger": "1"}


def test_a_lora_adapter_that_changes_nothing_is_refused_and_a_trained_one_passes(tmp_path, tiny_lm_dir):
    """PEFT initialises lora_B to zero: an adapter no optimizer step reached is a no-op, and
    registering it would serve the base model under the fine-tune's name."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.models import check_weights

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(tmp_path / "untrained")
    with pytest.raises(ModelError, match=r"the LoRA adapter changes nothing: lora_B @ lora_A is zero in all \d+"):
        check_weights(tmp_path / "untrained")
    with torch.no_grad():  # one module's B moved, as one optimizer step would
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.01)
    model.save_pretrained(tmp_path / "trained")
    check_weights(tmp_path / "trained")


def _without_tokenizer_json(model_dir, into):
    shutil.copytree(model_dir, into)
    (into / "tokenizer.json").unlink()


def _without_chat_template(model_dir, into):
    shutil.copytree(model_dir, into)
    (into / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((into / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (into / "tokenizer_config.json").write_text(json.dumps(config))


CHAT = ["task=causal-lm", "model_name=support-chat"]


@pytest.mark.parametrize(
    "model, settings, damage, message",
    [
        # transformers then builds a BERT tokenizer of its 5 special tokens: every text reads as [UNK].
        (
            "classifier_dir",
            [],
            _without_tokenizer_json,
            "the served tokenizer reads 'Where is my order #A1234?' as "
            "nothing but its unknown token '[UNK]' (5 tokens in all)",
        ),
        # Loads, saves and passes every weight check; only answering a chat message fails.
        (
            "tiny_lm_dir",
            CHAT,
            _without_chat_template,
            "Failed to apply chat template: Cannot use chat template "
            "functions because tokenizer.chat_template is not set",
        ),
    ],
    ids=["tokenizer-json-removed", "chat-template-removed"],
)
def test_a_model_that_cannot_be_served_is_refused_before_it_is_logged_and_nothing_registered(
    tmp_path, request, model, settings, damage, message
):
    """register asks the saved artifact, through mlflow.pyfunc as serving loads it, one short
    input: a model whose weights pass check_weights but which cannot answer is refused, exit 2,
    naming the round trip; no version, the champion untouched, the run and the logged model FAILED."""
    from mlflow.entities import LoggedModelStatus

    from pipeline.models import check_weights

    good = request.getfixturevalue(model)
    name = "support-chat" if settings else "support-intents"
    register.run(_inputs(tmp_path, good, "ok", True, 0.8, settings=settings))
    damage(good, tmp_path / "damaged")
    check_weights(tmp_path / "damaged")  # the weights are fine: only serving finds it broken
    round_trip = r"the serving round trip \(mlflow\.pyfunc load \+ predict of .+\) failed: "
    with pytest.raises(ModelError, match=round_trip + re.escape(message)) as refused:
        register.run(_inputs(tmp_path, tmp_path / "damaged", "bad", True, 0.99, settings=settings))
    assert refused.value.exit_code == 2 and str(tmp_path / "damaged") in str(refused.value)
    assert len(client().search_model_versions(f"name='{name}'")) == 1
    assert aliases(client(), name) == {"champion": "1", "challenger": "1"}
    experiment = client().get_experiment_by_name(name).experiment_id
    [run] = client().search_runs([experiment], filter_string="tags.`finetune.run_id` = 'bad'")
    assert run.info.status == "FAILED"
    [logged] = client().search_logged_models([experiment], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert logged.status == LoggedModelStatus.FAILED  # stopped before its artifacts were uploaded


def _invocations(port: int, texts: list[str]) -> list[dict]:
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps({"inputs": texts}, ensure_ascii=False).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"]


def test_the_champion_is_served_and_a_restart_after_a_roll_back_serves_the_previous_one(
    tmp_path, classifier_dir, monkeypatch, capsys
):
    """`finetune serve`: MLflow's scoring server for the version champion names at start, on
    loopback; English and Chinese utterances get labels and scores; after a roll-back a restarted
    server serves the previous champion, and `make down` stops it."""
    from pipeline import promote, services
    from tests.helpers import free_port

    register.run(_inputs(tmp_path, classifier_dir, "s1", True, 0.8))
    register.run(_inputs(tmp_path, classifier_dir, "s2", True, 0.9, champion="1", champion_accuracy=0.8))
    port = free_port()
    monkeypatch.setenv("SERVE_PORT", str(port))
    home = Path(os.environ["FINETUNE_HOME"])
    labels = {"order_status", "password_reset", "refund_request"}  # classifier_dir's head
    try:
        assert services.main(["serve"]) == 0
        assert json.loads(services.pid_file(home, "serve").read_text())["version"] == "2"
        assert f"serving support-intents version 2 (champion when started) at http://127.0.0.1:{port}" in (
            capsys.readouterr().out
        )
        predictions = _invocations(port, ["where is my parcel", "我要退款", "reset my password please"])
        assert len(predictions) == 3 and all(p["label"] in labels and 0 < p["score"] <= 1 for p in predictions)

        rollback = ["run_id=rb", "promote.version=previous_champion", "promote.force=true", "promote.reason=v2 bad"]
        promote.run(load_config(None, rollback))
        assert services.main(["serve"]) == 0  # still the one started: the alias was resolved at its start
        assert json.loads(services.pid_file(home, "serve").read_text())["version"] == "2"
        assert services.main(["down"]) == 0 and not services.pid_file(home, "serve").exists()
        assert services.main(["serve"]) == 0
        assert json.loads(services.pid_file(home, "serve").read_text())["version"] == "1"
        assert len(_invocations(port, ["我的订单在哪里"])) == 1
    finally:
        services.main(["down"])
    assert services.running(home, "serve") is None


def test_a_served_chat_champion_answers_a_chat_message(tmp_path, tiny_lm_dir, monkeypatch):
    """The causal-LM champion behind the same scoring server: an OpenAI-style chat request to
    /invocations gets an assistant message back, from the version champion named at start."""
    import urllib.request

    from pipeline import services
    from tests.helpers import free_port

    register.run(_inputs(tmp_path, tiny_lm_dir, "c1", True, 0.8, settings=CHAT))
    port = free_port()
    monkeypatch.setenv("SERVE_PORT", str(port))
    home = Path(os.environ["FINETUNE_HOME"])
    try:
        assert services.main(["serve", "--model", "support-chat"]) == 0
        assert json.loads(services.pid_file(home, "serve").read_text())["version"] == "1"
        body = {"messages": [{"role": "user", "content": "Where is my order #A1234?"}], "max_tokens": 8}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        [choice] = answer["choices"] if isinstance(answer, dict) else answer[0]["choices"]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    finally:
        services.main(["down"])
    assert services.running(home, "serve") is None


def test_a_preference_tuned_model_registers_as_a_chat_model_with_its_reference(tmp_path, tiny_lm_dir):
    """DPO's model is a chat model: logged as one (llm/v1/chat, as the causal-LM family's), never as
    a text classifier with a random head, and its lineage names the reference its reward is against."""
    import mlflow

    register.run(_inputs(tmp_path, tiny_lm_dir, "p1", True, 0.8, settings=["task=preference", "model_name=chat-dpo"]))
    version = client().get_model_version("chat-dpo", "1")
    with tracking.module_api():
        info = mlflow.models.get_model_info("models:/chat-dpo/1")
    flavor = info.flavors["transformers"]
    assert flavor["task"] == "text-generation" and flavor["pipeline_model_type"].endswith("ForCausalLM")
    assert info.metadata["task"] == "llm/v1/chat"  # OpenAI-style messages in and out
    assert version.tags["finetune.reference_model"] == version.tags["finetune.base_model"]  # no train.reference_model
    assert "preference-tuned (DPO" in version.description


def test_with_approval_required_register_sets_challenger_only_and_says_it_awaits_approval(
    tmp_path, classifier_dir, capsys
):
    approval = ("promote.require_approval=true",)
    first = register.run(_inputs(tmp_path, classifier_dir, "a1", True, 0.9, settings=approval))
    assert first.awaiting_approval and not first.promoted and first.aliases == ["challenger"]
    assert [(m.alias, m.version) for m in first.alias_moves] == [("challenger", "1")]
    assert aliases(client()) == {"challenger": "1"} and promotion_audit(client()) == []  # nothing attempted
    assert "version 1 passed the gate and is awaiting approval (promote.require_approval)" in capsys.readouterr().err
    assert register.PROMOTION_DONE not in client().get_model_version("support-intents", "1").tags
    assert first.drift == []  # no validate result: nothing to compare with
    # The gate refused: nobody is asked, the result says nothing awaits.
    refused = register.run(_inputs(tmp_path, classifier_dir, "a2", False, 0.5, settings=approval))
    assert not refused.awaiting_approval and aliases(client()) == {"challenger": "2"}
    # Off (the default): register promotes as before.
    third = register.run(_inputs(tmp_path, classifier_dir, "a3", True, 0.95))
    assert not third.awaiting_approval and third.promoted and aliases(client())["champion"] == "3"


def test_drift_measures_are_validates_report_each_with_its_bar(tmp_path):
    import pandas as pd

    from pipeline import drift

    labels = pd.Series(["order", "password", "refund"] * 10)
    before = pd.Series(["where is my order", "reset my password", "i want a refund"] * 10)
    after = pd.Series(["cancel subscription now", "update billing address", "wrong parcel arrived"] * 10)
    report = drift.compare(before, after, labels, labels, 0.2, 0.3, 0.05)
    storage.write_json((tmp_path / "drift.json").as_uri(), report)
    measures = register.drift_measures({"drift_report_uri": (tmp_path / "drift.html").as_uri()})
    assert [m["check"] for m in measures] == ["drift_label_psi", "drift_length_ks", "drift_oov_rate"]
    oov = measures[-1]
    assert (oov["of"], oov["max"], oov["passed"]) == ("text", 0.05, False) and oov["value"] > 0.05
    assert register.drift_measures({"drift_report_uri": ""}) == []
