"""Patching speed: this engine against baselines measured in the same run, on the same weights.

Sweeps: full residual sweep (resid_pre, every layer x position) and head sweep
(head_out, every layer x head, all positions). Methods:
  (a) one nnsight trace per patch           (b) TransformerLens get_act_patch_* (where it converts)
  (c) this engine                            (d) one bare batched forward of all rows, no interventions
  (c*) this engine with every patch run in full: no patch skipped or trimmed for writing values
       equal to the target's (shows what packing and layer skipping give on their own)
Every method's recovery numbers are compared with (a). Prints a markdown table.

    python benchmarks/patching.py [--models demo,gpt2-small,smollm2] [--threads 1] [--repeat 1]
                                  [--device cpu|cuda|mps] [--dtype float32|bfloat16] [--no-tl]
Models: demo, smollm2 (prepared), or a random-weight shape built on the device: gpt2-small,
smollm2-shape, qwen1.5-1.8b, llama-7b.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer.core import cache, engine, scheduler

from explorer.analyses import patching  # noqa: E402
from explorer.analyses.baseline import pair_lds  # noqa: E402
from explorer.sources.models import load_model  # noqa: E402
from explorer.core.prompts import PromptPair, tokenize_pair  # noqa: E402

IOI = PromptPair("When Mary and John went to the store, John gave a drink to",
                 "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")


def random_shapes():
    """Random-weight models of real shapes (no download): name -> transformers config."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    return {
        "gpt2-small": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
        "smollm2-shape": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                     rope_theta=100000.0, max_position_embeddings=8192),
        "qwen1.5-1.8b": Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                                    num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
                                    max_position_embeddings=32768),
        "llama-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    }


def random_model(name: str, device: str, dtype: str, threads: int):
    """A random-weight model of a real shape, built directly on the device (seed 0), with a word-level
    tokenizer t0..tN, wrapped like load_model's models."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM
    from explorer.core.adapters import architecture_for
    from explorer.sources.models import LoadedModel
    from explorer.core.runtime import configure_threads, pick_device, pick_dtype
    from explorer.sources.tiny import word_level_tokenizer
    configure_threads(threads)
    device = pick_device(device)
    config = random_shapes()[name]
    tok = word_level_tokenizer([f"t{i}" for i in range(config.vocab_size - 2)])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dtype, device), attn_implementation="eager")
    model.eval().requires_grad_(False)
    nn = TransformersModel(model, tokenizer=tok, task="text-generation")
    return LoadedModel(nn=nn, tokenizer=tok, arch=architecture_for(config), model_id=f"random {name}",
                       weight_hash="random-seed0", dtype=dtype, device=device)


def pair_for(name: str, lm):
    if name == "demo":
        from explorer.surfaces.ui.state import DEMO_PAIR
        return tokenize_pair(lm.tokenizer, DEMO_PAIR)
    if name == "smollm2":
        return tokenize_pair(lm.tokenizer, IOI)
    words = " ".join(f"t{i}" for i in (11, 503, 77, 9021, 5, 311, 2040, 76, 19, 4400, 8, 1201, 333, 64))
    corrupt = words.replace("t2040", "t2041")
    return tokenize_pair(lm.tokenizer, PromptPair(words, corrupt, "t100", "t200"))


def fresh():
    cache.clear_memory()
    scheduler.clear_memo()
    for sub in ("results", "activations"):
        shutil.rmtree(cache.cache_dir() / sub, ignore_errors=True)


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        fresh()
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def secs(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s"


def recovery(lds, tp, lm):
    ld_clean, ld_corr = pair_lds(lm, tp)
    return (np.asarray(lds) - ld_corr) / (ld_clean - ld_corr)


def one_trace_per_patch(lm, tp, patches):
    _, source = cache.get_activations(lm, tp.clean_ids, sorted({(c.site, c.layer) for p in patches for c in p}))
    out = []
    ids = torch.tensor([list(tp.corrupted_ids)])
    for (cell,) in patches:
        act = source[(cell.site, cell.layer)]
        value = act if cell.head is None else act[:, cell.head]
        if cell.pos is not None:
            value = value[cell.pos]
        iv = engine.Intervention(cell.site, cell.layer, torch.tensor([0]),
                                 None if cell.pos is None else torch.tensor([cell.pos]), value.unsqueeze(0),
                                 None if cell.head is None else torch.tensor([cell.head]))
        logits = engine.run(lm, ids, [iv]).logits
        out.append(float(logits[0, tp.clean_answer_id] - logits[0, tp.corrupted_answer_id]))
    return np.array(out)


def bare_batched(lm, tp, rows: int):
    ids = torch.tensor([list(tp.corrupted_ids)]).expand(rows, -1)
    logits = engine.run(lm, ids).logits
    return logits


def tl_model(lm):
    """The same weights in TransformerLens, through its own conversion functions (no hub)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions as wc
    hf, arch = lm.torch_model, lm.arch
    cfg_hf = hf.config
    common = dict(n_layers=arch.n_layers, d_model=arch.d_model, n_heads=arch.n_heads, d_head=arch.head_dim,
                  d_vocab=arch.vocab_size, device=lm.device, dtype=lm.torch_model.dtype)
    if arch.name == "gpt2":
        cfg = HookedTransformerConfig(**common, n_ctx=cfg_hf.n_positions, d_mlp=4 * arch.d_model, act_fn="gelu_new",
                                      normalization_type="LN", eps=cfg_hf.layer_norm_epsilon)
        state = wc.convert_gpt2_weights(hf, cfg)
    elif arch.name in ("llama", "qwen2"):
        cfg = HookedTransformerConfig(
            **common, n_ctx=256, d_mlp=cfg_hf.intermediate_size, act_fn="silu", normalization_type="RMS",
            eps=cfg_hf.rms_norm_eps, positional_embedding_type="rotary", rotary_dim=arch.head_dim,
            rotary_base=int(getattr(cfg_hf, "rope_theta", None) or cfg_hf.rope_parameters["rope_theta"]),
            n_key_value_heads=arch.n_kv_heads, gated_mlp=True, final_rms=True, original_architecture="LlamaForCausalLM")
        state = (wc.convert_llama_weights if arch.name == "llama" else wc.convert_qwen2_weights)(hf, cfg)
    else:
        return None
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    return model.eval()


def tl_sweep(model, tp, kind: str):
    from transformer_lens import patching as tlp
    a, b = tp.clean_answer_id, tp.corrupted_answer_id
    device = model.cfg.device
    clean = torch.tensor([list(tp.clean_ids)], device=device)
    corr = torch.tensor([list(tp.corrupted_ids)], device=device)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        metric = lambda logits: logits[0, -1, a] - logits[0, -1, b]  # noqa: E731
        if kind == "residual":
            out = tlp.get_act_patch_resid_pre(model, corr, clean_cache, metric)  # [layer, pos]
        else:
            out = tlp.get_act_patch_attn_head_out_all_pos(model, corr, clean_cache, metric)  # [layer, head]
    return out.flatten().float().cpu().numpy()


def sweep_patches(lm, tp, kind):
    L = lm.arch.n_layers
    if kind == "residual":
        return [(patching.Cell("resid_pre", l, p),) for l in range(L) for p in range(tp.n_pos)]
    return [(patching.Cell("head_out", l, None, h),) for l in range(L) for h in range(lm.arch.n_heads)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,gpt2-small,smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps; random shapes are built there")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-tl", action="store_true", help="leave TransformerLens (b) out (large shapes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        if name in random_shapes():
            lm = random_model(name, args.device, args.dtype, args.threads)
        else:
            lm = load_model(name, device=args.device, dtype=args.dtype, threads=args.threads)
        tp = pair_for(name, lm)
        try:
            tl = None if args.no_tl else tl_model(lm)
        except Exception as exc:  # a conversion this TransformerLens version does not offer
            print(f"TransformerLens conversion for {name} failed: {exc}", file=sys.stderr)
            tl = None
        for kind in ("residual", "heads"):
            patches = sweep_patches(lm, tp, kind)
            t_a, lds_a = timed(lambda: one_trace_per_patch(lm, tp, patches), 1)
            t_c, lds_c = timed(lambda: patching.patched_logit_diffs(lm, tp, patches), args.repeat)
            t_f, lds_f = timed(lambda: scheduler.patched_lds(lm, tp, patches, "denoise", trim=False), args.repeat)
            t_d, _ = timed(lambda: bare_batched(lm, tp, len(patches)), 1)
            rec_a, rec_c, rec_f = recovery(lds_a, tp, lm), recovery(lds_c, tp, lm), recovery(lds_f, tp, lm)
            t_b, err_b = float("nan"), float("nan")
            if tl is not None:
                t_b, lds_b = timed(lambda: tl_sweep(tl, tp, kind), 1)
                err_b = float(np.abs(recovery(lds_b, tp, lm) - rec_a).max())  # TL returns patched LDs
            rows.append({"model": name, "sweep": kind, "patches": len(patches), "a": t_a, "b": t_b, "c": t_c, "f": t_f, "d": t_d,
                         "err_c": float(np.abs(rec_c - rec_a).max()), "err_f": float(np.abs(rec_f - rec_a).max()),
                         "err_b": err_b})
            r = rows[-1]
            print(f"{name:10s} {kind:8s} n={r['patches']:4d}  (a) {t_a:7.2f}s  (b) {t_b:7.2f}s  (c) {t_c:7.2f}s  "
                  f"(c*) {t_f:7.2f}s  (d) {t_d:7.2f}s  a/c {t_a / t_c:5.1f}x  b/c {t_b / t_c:5.1f}x  d/c {t_d / t_c:4.2f}x  "
                  f"a/c* {t_a / t_f:5.1f}x  d/c* {t_d / t_f:4.2f}x  max|c-a| {r['err_c']:.1e}  max|c*-a| {r['err_f']:.1e}  "
                  f"max|b-a| {err_b:.1e}", flush=True)
    print()
    from explorer.core.calibration import pass_costs
    print(f"threads={args.threads}, torch {torch.__version__}, device {lm.device}, dtype {args.dtype}, "
          f"pass costs of the last model: {pass_costs(lm)}")
    print("| model | sweep | patches | (a) one trace/patch | (b) TransformerLens | (c) this engine | (c*) every patch in full | "
          "(d) bare batched | a/c | b/c | d/c | a/c* | d/c* | max abs diff vs a (recovery): c / c* / b |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sweep']} | {r['patches']} | {secs(r['a'])} | {secs(r['b'])} | {secs(r['c'])} | "
              f"{secs(r['f'])} | {secs(r['d'])} | {r['a'] / r['c']:.1f}x | {r['b'] / r['c']:.1f}x | {r['d'] / r['c']:.2f}x | "
              f"{r['a'] / r['f']:.1f}x | {r['d'] / r['f']:.2f}x | {r['err_c']:.1e} / {r['err_f']:.1e} / {r['err_b']:.1e} |")


if __name__ == "__main__":
    main()
