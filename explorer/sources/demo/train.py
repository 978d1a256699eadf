"""Train the bundled demo model: `python -m explorer.sources.demo.train [--out DIR] [--steps N]`.

A 4-layer Qwen2-architecture transformer (RMSNorm, rotary, grouped-query attention)
with a word-level tokenizer, trained on all four synthetic families at once. One CPU
thread and fixed seeds make it deterministic: the same seed gives identical weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch

from explorer.sources.demo.tasks import GENERATORS, vocabulary
from explorer.sources.tiny import word_level_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "model"
TASK_WEIGHTS = {"set_completion": 0.4, "ioi": 0.2, "factual_recall": 0.2, "induction": 0.2}
HELD_OUT_MODULUS = 10  # a prompt whose sha256 is 0 mod this is never trained on


def is_held_out(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def model_config(vocab_size: int):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                       rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=2, eos_token_id=2,
                       pad_token_id=1, use_cache=False)


def training_examples(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n (prompt, answer) examples, drawn from the families by TASK_WEIGHTS, none held out."""
    names, weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
    out = []
    while len(out) < n:
        pair = GENERATORS[rng.choices(names, weights)[0]](rng)
        for prompt, answer in ((pair.clean, pair.clean_answer), (pair.corrupted, pair.corrupted_answer)):
            if not is_held_out(prompt) and len(out) < n:
                out.append((prompt, answer))
    return out


def encode_batch(tokenizer, examples):  # -> ids [batch, pos], answer position [batch], answer id [batch]
    prompts = [tokenizer(p)["input_ids"] for p, _ in examples]
    answers = [tokenizer.convert_tokens_to_ids(a) for _, a in examples]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    # Right padding is harmless: causal attention keeps pads from reaching earlier positions.
    return ids, torch.tensor([len(p) - 1 for p in prompts]), torch.tensor(answers)


def train(out: Path = DEFAULT_OUT, steps: int = 3000, batch: int = 64, lr: float = 2e-3, seed: int = 0,
          log_every: int = 100) -> str:
    from transformers import AutoModelForCausalLM
    from tqdm import tqdm

    torch.set_num_threads(1)  # a fixed thread count keeps float reductions, hence weights, identical
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    tokenizer = word_level_tokenizer(vocabulary(), bos="<bos>")
    model = AutoModelForCausalLM.from_config(model_config(len(tokenizer)), attn_implementation="eager")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    rng = random.Random(seed)
    start, running = time.time(), None
    bar = tqdm(range(steps), desc="training demo model", mininterval=5)
    for step in bar:
        ids, answer_pos, answer_ids = encode_batch(tokenizer, training_examples(rng, batch))
        logits = model(ids).logits[torch.arange(len(ids)), answer_pos]  # [batch, vocab]
        loss = torch.nn.functional.cross_entropy(logits, answer_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    meta = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "task_weights": TASK_WEIGHTS,
            "held_out_rule": f"sha256(prompt) % {HELD_OUT_MODULUS} == 0 is never trained on",
            "train_seconds": round(time.time() - start, 1), "final_loss": round(running, 5),
            "weights_sha256": digest, "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    return digest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    digest = train(args.out, steps=args.steps, seed=args.seed)
    print(f"weights sha256 {digest} -> {args.out}")


if __name__ == "__main__":
    main()
