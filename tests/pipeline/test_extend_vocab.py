"""train.extend_vocab: the characters of the training split that the base model's tokenizer maps to
its unknown token become new tokens whose embeddings start as the unknown token's (the extended
model computes what the base model computed), then train with the head while the body is frozen,
under each ZeRO stage; the extended tokenizer is published and registered with the model."""

import pytest

from pipeline import local, register, steps, storage, tracking
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.models import extend_embeddings, extend_vocabulary
from tests.helpers import collect_snapshot, run_step_here, train_settings, write_jsonl

INSTRUCTIONS = "pkg://pipeline/data/support_instructions.jsonl"
CHINESE = ["我想取消订单", "我的订单到哪了", "退款什么时候到账", "取消订单可以吗"]


def test_the_extended_model_starts_out_computing_what_the_base_model_computed(classifier_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    unknown = tokenizer.unk_token_id
    texts = [*CHINESE, "where is my order 🙏"]
    added = extend_vocabulary(tokenizer, texts, min_count=2)
    # Only characters that read as [UNK] and occur at least twice, most frequent first (ties by code point).
    assert list(added)[:2] == ["单", "订"] and all(ids == [unknown] for ids in added.values())
    assert "退" not in added and "🙏" not in added  # once each: they stay unknown
    assert all(base_tokenizer(c, add_special_tokens=False)["input_ids"] == [unknown] for c in added)
    assert len(tokenizer) == len(base_tokenizer) + len(added)
    encoded = tokenizer(CHINESE[0], add_special_tokens=False)["input_ids"]
    assert len(encoded) == len(CHINESE[0]) and tokenizer.convert_ids_to_tokens(encoded)[-2:] == ["订", "单"]
    assert tokenizer("where is my order")["input_ids"] == base_tokenizer("where is my order")["input_ids"]

    base = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    extend_embeddings(model, list(added.values()))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    with torch.no_grad():
        before = base(**base_tokenizer(texts, padding=True, return_tensors="pt")).logits
        after = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert torch.allclose(before, after, atol=1e-6)


def _train(snapshot, model_dir, run_id, *extra):
    return local.launch_local(
        "train", train_settings(snapshot, model_dir, run_id, "train.batch_size=8", "train.logging_steps=2", *extra)
    )


def _weights(path):
    """The tensors by name; ZeRO-3's consolidated save spells LayerNorm's weight and bias with
    their legacy names (gamma, beta), which from_pretrained maps back."""
    from safetensors.torch import load_file

    legacy = {".gamma": ".weight", ".beta": ".bias"}
    return {
        next((k[: -len(old)] + new for old, new in legacy.items() if k.endswith(old)), k): v
        for k, v in load_file(str(path / "model.safetensors")).items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_the_first_phase_trains_the_new_embeddings_and_the_head_and_leaves_the_body(snapshot, classifier_dir, stage):
    """Training cut at the end of the first phase (max_steps = one epoch): under every ZeRO stage the
    published body equals the base model's bit for bit while the new rows and the head moved."""
    epoch = snapshot.rows_train // (8 * 2)  # micro-batches of 8 on each of 2 ranks, the last partial one dropped
    result = _train(
        snapshot,
        classifier_dir,
        f"frozen{stage}",
        f"train.zero_stage={stage}",
        "train.epochs=2",
        "train.extend_vocab_epochs=1",
        "train.learning_rate=0.01",
        f'train.trainer_args={{"max_steps": {epoch}}}',
    )
    assert result["global_step"] == epoch
    summary = storage.read_json(result["summary_uri"])
    assert summary["deepspeed"]["zero_stage"] == stage
    added = summary["extended_vocab"]["added_tokens"]
    assert added > 20  # small_data's Chinese characters the MiniLM vocabulary lacks
    model_dir = storage.local_path(result["model_uri"])
    base, trained = _weights(classifier_dir), _weights(model_dir)
    embeddings = "bert.embeddings.word_embeddings.weight"
    body = [k for k in base if k.startswith("bert.") and k != embeddings]
    assert set(trained) == set(base), (sorted(set(base) - set(trained)), sorted(set(trained) - set(base)))
    assert body and all((trained[k] == base[k]).all() for k in body)
    assert trained[embeddings].shape[0] == base[embeddings].shape[0] + added
    unknown = base[embeddings][100]  # [UNK]: where every new row started
    assert (trained[embeddings][-added:] - unknown).abs().amax(dim=1).min() > 0  # every new row trained
    assert (trained["classifier.weight"] - base["classifier.weight"]).abs().max() > 0

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == trained[embeddings].shape[0]
    assert summary["extended_vocab"]["tokens"][0] in tokenizer.get_vocab()


@pytest.mark.slow
def test_after_the_first_phase_the_body_trains_and_the_registered_model_reads_the_new_characters(
    snapshot, classifier_dir, tmp_path
):
    import mlflow
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = _train(
        snapshot, classifier_dir, "two-phase", "train.zero_stage=3", "train.epochs=2", "train.extend_vocab_epochs=1"
    )
    model_dir = storage.local_path(result["model_uri"])
    base, trained = _weights(classifier_dir), _weights(model_dir)
    assert any((trained[k] != base[k]).any() for k in base if k.startswith("bert.encoder."))

    uris = {step: (tmp_path / f"{step}.json").as_uri() for step in ("collect", "evaluate")}
    storage.write_json(uris["collect"], {"sha256": "ab" * 32, "rows": 120, "rows_train": 96, "rows_eval": 24})
    storage.write_json(
        uris["evaluate"],
        {
            "metrics": {"accuracy": 0.9, "macro_f1": 0.9},
            "gate_metric": "accuracy",
            "promote": True,
            "reason": "test",
            "champion_version": "",
        },
    )
    register.run(
        load_config(
            None,
            [
                "run_id=two-phase",
                f"register.collect_result_uri={uris['collect']}",
                f"register.train_result_uri={result['result_uri']}",
                f"register.evaluate_result_uri={uris['evaluate']}",
            ],
        )
    )
    with tracking.module_api():
        served = mlflow.pyfunc.load_model("models:/support-intents@champion")
    tokenizer = served._model_impl.pipeline.tokenizer
    assert (
        len(tokenizer)
        == len(AutoTokenizer.from_pretrained(model_dir))
        > len(AutoTokenizer.from_pretrained(classifier_dir))
    )
    assert tokenizer.unk_token_id not in tokenizer("订单", add_special_tokens=False)["input_ids"]
    local = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = model(**local(CHINESE, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    assert served.predict(CHINESE)["label"].tolist() == [model.config.id2label[i] for i in expected]


@pytest.mark.slow
def test_a_frozen_first_phase_under_deepspeeds_own_optimizer_is_refused_by_name(snapshot, classifier_dir, capsys):
    """DeepSpeed's CPU Adam (train.offload_optimizer) holds every parameter in one group, so the
    body cannot be held still: the step says so and what to set before it loads a model or builds
    DeepSpeed's engine (no CPU Adam compiled, no checkpoint written), and publishes nothing."""
    with pytest.raises(steps.StepFailed) as failed:
        _train(snapshot, classifier_dir, "offload", "train.epochs=2", "train.offload_optimizer=true")
    assert failed.value.returncode == 2 and not failed.value.retryable
    assert "set train.extend_vocab_epochs=0" in str(failed.value)
    log = capsys.readouterr().out  # the step's output, streamed by the launcher
    assert "train: extend_vocab:" in log and "Loading weights" not in log  # transformers' progress line
    run = load_config(None, ["run_id=offload"])
    assert not storage.exists(run.step_uri("train") + "/model") and not storage.exists(
        run.step_uri("train") + "/checkpoints"
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage, lora_r", [(2, 8), (3, 0)])
def test_a_causal_lm_trains_its_new_tokens_beside_the_lora_adapter_and_publishes_them_merged(
    tmp_path, tiny_lm_dir, stage, lora_r
):
    """Opt-in for a causal LM: the tiny Llama's 1,000-token byte-level BPE reads the shipped chats'
    rarer Chinese characters as a token per byte. The new rows train as PEFT's trainable tokens
    beside a LoRA adapter (ZeRO-2; under ZeRO-3 PEFT gathers them on a CUDA device, so not on CPU)
    and are merged into the published model, or with every weight under ZeRO-3. evaluate scores the
    model and the base model, whose rows for the new tokens start as training's did."""
    import json

    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in storage.local_path(INSTRUCTIONS).read_text().splitlines()[:120]]
    snapshot = collect_snapshot([write_jsonl(tmp_path / "chat.jsonl", rows)], "task=causal-lm")
    lm = [
        "task=causal-lm",
        "train.max_seq_len=192",
        "train.batch_size=8",
        "train.learning_rate=1e-2",
        f"train.lora_r={lora_r}",
        "train.epochs=2",
        "train.extend_vocab=true",
        "train.extend_vocab_learning_rate=0.05",
        f"train.zero_stage={stage}",
    ]
    result = local.launch_local("train", train_settings(snapshot, tiny_lm_dir, "lm-vocab", *lm))
    added = storage.read_json(result["summary_uri"])["extended_vocab"]["added_tokens"]
    assert added > 10
    model_dir = storage.local_path(result["model_uri"])
    base, merged = _weights(tiny_lm_dir), _weights(model_dir)
    embeddings = "model.embed_tokens.weight"
    assert (
        merged[embeddings].shape[0]
        == base[embeddings].shape[0] + added
        == len(AutoTokenizer.from_pretrained(model_dir))
    )
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    new_id = len(base_tokenizer)  # the most frequent new character, and the bytes it was before
    pieces = base_tokenizer(tokenizer.convert_ids_to_tokens(new_id), add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1 and (merged[embeddings][new_id] - base[embeddings][pieces].mean(dim=0)).abs().max() > 0
    evaluated = run_step_here(
        "evaluate",
        train_settings(snapshot, tiny_lm_dir, "lm-vocab", *lm)[:3]
        + [
            "task=causal-lm",
            "train.max_seq_len=192",
            f"evaluate.snapshot_uri={snapshot.snapshot_uri}",
            f"evaluate.model_uri={result['model_uri']}",
            "evaluate.generate_rows=2",
        ],
    )
    assert evaluated["metrics"]["perplexity"] < evaluated["base_metrics"]["perplexity"]


def test_an_adapter_registered_alone_cannot_carry_new_tokens():
    with pytest.raises(ConfigError, match="train.extend_vocab with train.lora_merge=false"):
        load_config(None, ["task=causal-lm", "train.extend_vocab=true", "train.lora_r=8", "train.lora_merge=false"])
    assert not load_config(None, ["task=causal-lm", "train.lora_r=8", "train.lora_merge=false"]).train.extend_vocab
