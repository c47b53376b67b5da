"""The chat format, its rules, the assistant-only loss mask, the length policy and the text
metrics, on the tiny Llama's real BPE tokenizer."""

import pytest

from pipeline import chat


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def test_instruction_and_chat_records_become_messages():
    assert chat.to_messages({"system": "Be brief.", "prompt": "Hi", "response": "Hello"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert chat.to_messages({"prompt": "Hi", "response": "Hello", "system": ""})[0]["role"] == "user"
    text = '[{"role": "user", "content": "你好 👋"}, {"role": "assistant", "content": "您好"}]'
    assert chat.parse_messages(text)[0]["content"] == "你好 👋"
    assert chat.parse_messages(chat.dumps(chat.parse_messages(text))) == chat.parse_messages(text)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "Hi"}, "needs either 'messages' or both 'prompt' and 'response'"),
        ({"prompt": "Hi", "response": 3}, "'response' is int 3, not a string"),
        ({"messages": "not json"}, "'messages' is not valid JSON"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "message 1: role 'bot' is not one of"),
        ({"messages": [{"role": "user", "content": None}]}, "message 1 (user): content is NoneType"),
    ],
)
def test_malformed_records_say_what_is_wrong(record, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        chat.to_messages(record)


@pytest.mark.parametrize(
    "roles, problem",
    [
        (["system", "user", "assistant"], None),
        (["user", "assistant", "user", "assistant"], None),
        (["user", "user", "assistant"], "message 2 is user, expected assistant (role order)"),
        (["assistant", "user"], "message 1 is assistant, expected user (role order)"),
        (["system", "user"], "no assistant turn"),
        (["user", "assistant", "user"], "message 3 is user: a conversation must end with an assistant turn"),
        (["user", "system", "assistant"], "message 2 is system, expected assistant (role order)"),
    ],
)
def test_role_rules(roles, problem):
    assert chat.role_problem([{"role": r, "content": "x"} for r in roles]) == problem


def test_empty_assistant_turn_is_a_problem():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]
    assert chat.role_problem(messages) == "message 2 is an empty assistant turn"


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It ships today."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    template = chat.chat_template(tokenizer, "")
    ids, labels = chat.encode(tokenizer, messages, template)
    assert len(ids) == len(labels)
    learned = [i for i, label in zip(ids, labels) if label != chat.IGNORE]
    assert all(label in (chat.IGNORE, token) for token, label in zip(ids, labels))
    # Both answers with their end-of-turn marker, and nothing of the system or user turns.
    assert tokenizer.decode(learned) == "It ships today.<|im_end|>\nYou're welcome.<|im_end|>\n"
    prompt_part = tokenizer.decode([i for i, label in zip(ids, labels) if label == chat.IGNORE])
    assert "Be brief." in prompt_part and "Where is my order?" in prompt_part and "ships" not in prompt_part


def test_train_on_inputs_puts_the_loss_on_the_prompt_too_and_keeps_what_would_have_nothing_to_learn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "order " * 60}]
    messages.append({"role": "assistant", "content": "fine"})
    template = chat.chat_template(tokenizer, "")
    ids, labels = chat.encode(tokenizer, messages, template, train_on_inputs=True)
    assert labels == ids and "Be brief." in tokenizer.decode(labels)
    # Cut before the answer: nothing to learn with the assistant-only mask, the prompt with train_on_inputs.
    _, counts = chat.prepare(tokenizer, [messages], template, 48, "truncate")
    assert counts["dropped_no_target"] == 1
    examples, counts = chat.prepare(tokenizer, [messages], template, 48, "truncate", train_on_inputs=True)
    assert counts["kept"] == counts["truncated"] == 1 and examples[0]["labels"] == ids[:48]


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tokenizer):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [{"role": "user", "content": "order " * 10}, {"role": "assistant", "content": "ok " * 40}]
    prompt_only_fits = [{"role": "user", "content": "order " * 60}, {"role": "assistant", "content": "fine"}]
    template = chat.chat_template(tokenizer, "")
    examples, counts = chat.prepare(tokenizer, [short, long, prompt_only_fits], template, 48, "truncate")
    assert counts == {"examples": 3, "kept": 2, "truncated": 2, "dropped_overlong": 0, "dropped_no_target": 1}
    assert [e["example_id"] for e in examples] == [0, 1] and all(len(e["input_ids"]) <= 48 for e in examples)
    examples, counts = chat.prepare(tokenizer, [short, long, prompt_only_fits], template, 48, "drop")
    assert counts["kept"] == 1 and counts["dropped_overlong"] == 2 and examples[0]["example_id"] == 0


def test_packing_keeps_every_token_and_the_length_bound(tokenizer):
    conversations = [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        for i in range(10)
    ]
    examples, _ = chat.prepare(tokenizer, conversations, chat.chat_template(tokenizer, ""), 64, "truncate")
    packed = chat.pack(examples, 64)
    assert len(packed) < len(examples) and all(len(p["input_ids"]) <= 64 for p in packed)
    assert sum(len(p["input_ids"]) for p in packed) == sum(len(e["input_ids"]) for e in examples)
    assert [t for p in packed for t in p["labels"]] == [t for e in examples for t in e["labels"]]


def test_a_tokenizer_without_template_needs_one_configured(tmp_path, tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template and train.chat_template is not set"):
        chat.chat_template(tokenizer, "")
    assert chat.chat_template(tokenizer, "chatml") == chat.CHATML


def test_rouge_l_and_exact_match():
    assert chat.rouge_l("the order ships today", "the order ships today") == 1.0
    assert chat.rouge_l("the order ships today", "your order ships today") == pytest.approx(0.75)
    assert chat.rouge_l("订单已发货", "订单发货") == pytest.approx(2 * 0.8 * 1.0 / 1.8)  # CJK by character
    assert chat.rouge_l("refund approved", "no") == 0.0
    assert chat.exact_match("It ships today.", "it ships  today") == 1.0
    assert chat.exact_match("It ships today.", "It ships tomorrow.") == 0.0


def test_train_eos_token_becomes_the_saved_tokenizers_eos_and_a_stop_token_of_the_generation_config(
    tmp_path, tiny_lm_dir
):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    before = model.generation_config.eos_token_id
    token_id = chat.use_eos_token(tokenizer, model, "<|endoftext|>")
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).eos_token == "<|endoftext|>"
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == sorted({before, token_id})
    assert chat.stop_ids(AutoTokenizer.from_pretrained(tmp_path), str(tmp_path)) == {before, token_id}
