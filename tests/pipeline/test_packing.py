"""Packing without cross-talk: conversations packed into one sequence never attend to each other,
so each one's loss equals its loss alone (tiny Llama, CPU, the collator training uses)."""

import pytest

from pipeline import chat


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), AutoTokenizer.from_pretrained(tiny_lm_dir)


def _conversations(n):
    return [
        [
            {"role": "user", "content": f"where is my parcel number {i}? it is late " * (1 + i % 3)},
            {"role": "assistant", "content": f"let me check order {i} for you " * (1 + i % 2)},
        ]
        for i in range(n)
    ]


def _token_losses(model, batch):
    import torch

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
    return losses, targets != chat.IGNORE


def test_each_packed_conversation_has_the_loss_it_has_alone(lm):
    model, tokenizer = lm
    examples, _ = chat.prepare(tokenizer, _conversations(6), chat.chat_template(tokenizer, ""), 512, "truncate")
    packed = chat.pack(examples, 512)
    assert len(packed) == 1 and packed[0]["position_ids"].count(0) == 6
    collate = chat.PackedCollator(tokenizer.pad_token_id)
    losses, mask = _token_losses(model, collate(packed))
    start, worst = 0, 0.0
    for example in examples:  # every conversation alone, then its slice of the packed row
        alone, alone_mask = _token_losses(model, collate([example]))
        n = len(example["input_ids"])
        here, here_mask = losses[0, start : start + n - 1], mask[0, start : start + n - 1]
        assert here_mask.tolist() == alone_mask[0].tolist()
        worst = max(worst, abs(float(here[here_mask].sum() - alone[0][alone_mask[0]].sum())))
        start += n
    assert worst <= 1e-4, f"packed vs alone: {worst}"


def test_without_position_ids_the_conversations_would_attend_to_each_other(lm):
    model, tokenizer = lm  # what the check above would catch: the old packing (one causal mask for all)
    examples, _ = chat.prepare(tokenizer, _conversations(3), chat.chat_template(tokenizer, ""), 512, "truncate")
    batch = chat.PackedCollator(tokenizer.pad_token_id)(chat.pack(examples, 512))
    mixed, mask = _token_losses(model, {k: v for k, v in batch.items() if k not in ("position_ids", "use_cache")})
    separate, _ = _token_losses(model, batch)
    second = slice(len(examples[0]["input_ids"]), None)
    assert float((mixed[0, second] - separate[0, second])[mask[0, second]].abs().max()) > 1e-3


def test_padding_is_a_block_of_its_own_and_never_a_target(lm):
    _, tokenizer = lm
    batch = chat.PackedCollator(tokenizer.pad_token_id)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [8], "labels": [-100]},
        ]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]] and "attention_mask" not in batch
    assert batch["use_cache"] is False  # with a cache transformers would not build the packed mask
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]


# A second template family beside the shipped ChatML (train.chat_template accepts Jinja text).
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, end_of_turn", [(chat.CHATML, "<|im_end|>\n"), (ZEPHYR, "</s>\n")], ids=["chatml", "zephyr"]
)
def test_packed_labels_are_each_conversations_assistant_tokens_and_nothing_else(lm, template, end_of_turn):
    """Several multi-turn conversations (with and without a system turn) packed into rows with
    padding: each packed example carries exactly its unpacked labels but the first (never
    predicted from the previous example), the learned tokens decode to its assistant turns and their
    end-of-turn marker only, and no padding token or token across a boundary is a target."""
    _, tokenizer = lm
    conversations = [
        [
            *([{"role": "system", "content": f"Be brief, agent {i}."}] if i % 2 else []),
            {"role": "user", "content": f"where is parcel {i}?"},
            {"role": "assistant", "content": f"Parcel {i} ships today."},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": f"You are welcome ({i})."},
        ]
        for i in range(7)
    ]
    examples, counts = chat.prepare(tokenizer, conversations, template, 512, "truncate")
    assert counts["kept"] == 7
    width = 2 * max(len(e["input_ids"]) for e in examples) + 3
    packed = chat.pack(examples, width)
    batch = chat.PackedCollator(tokenizer.pad_token_id)(packed)
    assert len(packed) > 1 and (batch["input_ids"] == tokenizer.pad_token_id).any()  # several rows, padding
    ids, labels, positions = (batch[k].tolist() for k in ("input_ids", "labels", "position_ids"))
    found = []
    for row in range(len(packed)):
        starts = [i for i, p in enumerate(positions[row]) if p == 0] + [len(positions[row])]
        for begin, end in zip(starts, starts[1:]):
            found.append((ids[row][begin:end], labels[row][begin:end]))
    by_ids = {tuple(e["input_ids"]): e for e in examples}
    seen = 0
    for segment_ids, segment_labels in found:
        example = by_ids.get(tuple(segment_ids))
        if example is None:  # the padding block
            assert set(segment_ids) == {tokenizer.pad_token_id} and set(segment_labels) == {chat.IGNORE}
            continue
        seen += 1
        assert segment_labels == [chat.IGNORE, *example["labels"][1:]]  # the unpacked mask, boundary ignored
        messages = conversations[example["example_id"]]
        learned = tokenizer.decode([t for t, label in zip(segment_ids, segment_labels) if label != chat.IGNORE])
        expected = "".join(m["content"] + end_of_turn for m in messages if m["role"] == "assistant")
        assert learned == expected
    assert seen == 7
