"""The pipeline's `train` step on a GPU: tokens/s, peak memory and MFU of a >= 0.5B-parameter
causal LM, with ZeRO-2, ZeRO-3 and ZeRO-3 + LoRA, in bf16. Nothing is downloaded: the model is
built from a Llama-shaped config (random init) and a byte-level BPE tokenizer trained here on
the project's shipped text; the data is the shipped support conversations, collected by the
real collect step. Each variant runs `finetune train` through the local launcher, exactly as
the DAG's task does, over every visible GPU.

MFU is reported against two peaks: the GPU's dense bf16 peak from its data sheet (--peak-tflops,
H100/H200 SXM: 989) and a matmul peak measured here on the same GPU (8192^3 bf16 matmuls), so
the figure means something on any GPU. FLOPs per token are 6 x trainable-and-frozen parameters
for the forward and backward passes, plus the attention term 12 x layers x hidden x seq_len
(the usual estimate); LoRA still runs the full forward and backward through the frozen weights.

    bench/gpu.sh                                                    # on the GPU machine: ~5 min
    .venv/bin/python bench/gpu_train.py --size tiny --precision fp32  # the same path on CPU (a test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, as bench/*.py do

from bench.harness import commit, machine  # noqa: E402
from pipeline import collect, local, storage  # noqa: E402
from pipeline.chat import CHATML  # noqa: E402
from pipeline.config import load_config  # noqa: E402

SIZES = {
    # name: hidden, layers, heads, kv heads, intermediate, vocab (Qwen2.5-0.5B-like at "0.6b")
    "0.6b": (1536, 20, 16, 8, 4096, 32000),
    "tiny": (64, 2, 4, 2, 128, 1000),
}
VARIANTS = {
    "zero2": ["train.zero_stage=2"],
    "zero3": ["train.zero_stage=3"],
    "zero3-lora": [
        "train.zero_stage=3",
        "train.lora_r=16",
        "train.lora_alpha=32",
        'train.lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]',
    ],
}
INSTRUCTIONS = "pkg://pipeline/data/support_instructions.jsonl"


def build_model(path: Path, size: str) -> int:
    """A Llama-shaped causal LM of ``size`` with random weights and a BPE tokenizer trained on the
    shipped text, saved like a pretrained checkpoint; its parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv_heads, intermediate, vocab = SIZES[size]
    texts = [
        json.loads(line)["text"]
        for line in (ROOT / "pipeline" / "data" / "support_intents.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    texts += (ROOT / "pipeline" / "data" / "support_instructions.jsonl").read_text(encoding="utf-8").splitlines()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHATML
    # The vocabulary is what the text yields (a small corpus stops BPE early); the embeddings
    # keep the configured size, as real models pad theirs.
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def matmul_peak_tflops(seconds: float = 10.0) -> float | None:
    """The bf16 matmul throughput this GPU reaches (8192^3, after warm-up); None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(20):
            a @ b
        runs += 20
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - started) / 1e12


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_variant(
    name: str, model_dir: Path, snapshot_uri: str, args: argparse.Namespace, world: int, params: int
) -> dict:
    overrides = [
        "task=causal-lm",
        f"run_id=bench-{name}",
        f"base_model={json.dumps(str(model_dir))}",
        f"train.snapshot_uri={snapshot_uri}",
        "train.epochs=1",
        f"train.batch_size={args.batch_size}",
        f"train.max_seq_len={args.seq_len}",
        "train.packing=true",
        "train.learning_rate=1e-4",
        f"train.precision={args.precision}",
        f"train.num_processes={world}",
        "train.logging_steps=10",
        *VARIANTS[name],
    ]
    started = time.perf_counter()
    result = local.launch_local("train", overrides)
    wall = time.perf_counter() - started
    summary = storage.read_json(result["summary_uri"])
    tokens = summary["train_tokens"]  # one epoch: every packed sequence's tokens
    seconds = summary["train_runtime_s"]
    hidden, layers = SIZES[args.size][0], SIZES[args.size][1]
    flops_per_token = 6 * params + 12 * layers * hidden * args.seq_len
    achieved = tokens * flops_per_token / seconds / 1e12
    return {
        "variant": name,
        "global_step": summary["global_step"],
        "train_tokens": tokens,
        "train_runtime_s": round(seconds, 2),
        "step_wall_s": round(wall, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "tokens_per_s_per_gpu": round(tokens / seconds / world, 1),
        "peak_memory_gib_rank0": round(summary["peak_memory_bytes"] / 2**30, 2),
        "achieved_tflops": round(achieved, 2),
        "train_loss": round(summary["train_loss"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="0.6b")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (data sheet)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="finetune-gpu-bench-") as tmp:
        os.environ["FINETUNE_HOME"] = str(Path(tmp) / "home")  # a private artifact store and MLflow DB
        model_dir = Path(tmp) / "model"
        started = time.perf_counter()
        params = build_model(model_dir, args.size)
        print(
            f"gpu bench: built a {params / 1e9:.3f}B-parameter model in {time.perf_counter() - started:.0f}s",
            file=sys.stderr,
            flush=True,
        )
        snapshot = collect.run(load_config(None, ["task=causal-lm", f"collect.sources={json.dumps([INSTRUCTIONS])}"]))
        world = max(gpu_count(), 1) if args.precision == "bf16" else 2
        peak = matmul_peak_tflops()
        figures = [run_variant(name, model_dir, snapshot.snapshot_uri, args, world, params) for name in args.variants]
    for figure in figures:
        figure["mfu_vs_datasheet"] = round(figure["achieved_tflops"] / (args.peak_tflops * world), 4)
        if peak:
            figure["mfu_vs_measured_matmul"] = round(figure["achieved_tflops"] / (peak * world), 4)
    report = {
        "name": "gpu",
        "command": " ".join([sys.executable, *sys.argv]),
        "size": args.size,
        "parameters": params,
        "precision": args.precision,
        "processes": world,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "datasheet_peak_tflops_per_gpu": args.peak_tflops,
        "measured_matmul_peak_tflops_per_gpu": round(peak, 1) if peak else None,
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "variants": figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
