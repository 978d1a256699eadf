"""Command line: `python -m explorer <command> ... [--json]`, the same engine as the app.

Bad input exits with status 2 and one line on stderr; --json puts the result on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys

from explorer.core.errors import ExplorerInputError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump
        raise ExplorerInputError(f"{self.prog}: {message}")


def _model_args(p):
    p.add_argument("--model", default="demo", help="'demo', 'smollm2', a local folder or a hub id")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on small machines)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _pair_args(p, required: bool = True):
    p.add_argument("--clean", required=required)
    p.add_argument("--corrupted", required=required)
    p.add_argument("--clean-answer", required=required)
    p.add_argument("--corrupted-answer", required=required)


def _ablation_args(p):
    p.add_argument("--targets", required=True, help="e.g. L3H1,2.0,attn2,mlp1,resid3")
    p.add_argument("--method", default="zero", choices=["zero", "mean", "resample"])
    p.add_argument("--positions", default="all", help="all, last, or comma-separated positions")


def _positions_arg(text: str):
    from explorer.core.positions import parse
    return parse(text, allowed=("all", "last"), name="--positions")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m explorer", description="Circuit Explorer, headless.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("baseline", help="logit difference, answer probabilities and top tokens of both runs")
    _model_args(p), _pair_args(p)
    p.add_argument("--top-k", type=int, default=10)
    p = sub.add_parser("patch", help="activation patching sweep")
    _model_args(p), _pair_args(p, required=False)
    p.add_argument("--prompts", default=None, help="JSONL prompt set instead of one pair: mean per cell over its "
                                                   "headline pairs (positions all or last)")
    p.add_argument("--max-pairs", type=int, default=None, help="with --prompts: the first N headline pairs")
    p.add_argument("--site", default="resid_post", help="resid_pre|resid_post|attn_out|mlp_out|head_out")
    p.add_argument("--positions", default="each", choices=["each", "last", "all"])
    p.add_argument("--heads", default=None, help="a head set like 1.3,2.0: patched alone and together")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    p.add_argument("--receiver", default=None, help="path patching: 'logits' or LAYER.HEAD.q|k|v (senders: all earlier heads)")
    p = sub.add_parser("ablate", help="ablate targets on the clean and the corrupted run")
    _model_args(p), _pair_args(p)
    _ablation_args(p)
    p.add_argument("--reference", default=None, help="JSONL set whose clean prompts give mean/resample values")
    p = sub.add_parser("attribute", help="attribution patching (first-order Taylor) for every site")
    _model_args(p), _pair_args(p)
    p.add_argument("--site", default="head_out", help="resid_pre|attn_out|mlp_out|head_out")
    p.add_argument("--exact", action="store_true", help="also run exact patching and report Spearman rho")
    p = sub.add_parser("dla", help="direct logit attribution at the last position")
    _model_args(p), _pair_args(p)
    p.add_argument("--run", default="clean", choices=["clean", "corrupted"])
    p = sub.add_parser("lens", help="logit lens, both runs")
    _model_args(p), _pair_args(p)
    p = sub.add_parser("run", help="ablate targets over a prompt set and write a run card")
    _model_args(p)
    p.add_argument("--prompts", required=True, help="JSONL prompt set")
    _ablation_args(p)
    p.add_argument("--reference", default=None, help="held-out JSONL set for mean/resample (default: the set's clean prompts)")
    p.add_argument("--n-random", type=int, default=10)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--min-mean-drop", type=float, default=1.0)
    p.add_argument("--min-relative-drop", type=float, default=0.2)
    p.add_argument("--min-specificity", type=float, default=3.0)
    p.add_argument("--specificity-floor", type=float, default=0.1)
    p.add_argument("--card", default=None, help="write the run card JSON here")
    p = sub.add_parser("models", help="list or prepare models")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    _story_parser(sub)
    return parser


def _load(args):
    from explorer.sources.models import load_model
    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      threads=args.threads)


def _pair(args, lm):
    from explorer.core.prompts import PromptPair, tokenize_pair
    return tokenize_pair(lm.tokenizer, PromptPair(args.clean, args.corrupted, args.clean_answer, args.corrupted_answer),
                         lm.arch)


class _ProgressBar:
    """A tqdm bar on stderr, opened on the first update so errors before any work stay one line."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def __call__(self, fraction: float, text: str) -> None:
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=100, desc=self.label, file=sys.stderr, leave=False)
        self.bar.n = int(fraction * 100)
        self.bar.set_postfix_str(text)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_baseline(args) -> dict:
    from explorer.analyses.baseline import baseline
    lm = _load(args)
    res = baseline(lm, _pair(args, lm), top_k=args.top_k)
    out = _json(lm, res)
    if not args.json:
        print(f"{res.formula}\nLD clean = {res.ld_clean:+.4f}   LD corrupted = {res.ld_corrupted:+.4f}")
        print(res.answers.to_string(index=False))
        print(res.top_tokens.to_string(index=False))
    return out


def cmd_patch(args) -> dict:
    from explorer.analyses import patching
    given = [args.clean, args.corrupted, args.clean_answer, args.corrupted_answer]
    if args.prompts is None and any(v is None for v in given):
        raise ExplorerInputError("Give --clean, --corrupted, --clean-answer and --corrupted-answer, or --prompts FILE.")
    lm = _load(args)
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ExplorerInputError(f"--layers must be comma-separated integers, not {args.layers!r}.") from None
    if args.prompts is not None:
        return _patch_set(args, lm, layers)
    tp = _pair(args, lm)
    if args.receiver:
        from explorer.analyses.paths import parse_receiver, path_patch
        res = path_patch(lm, tp, parse_receiver(args.receiver, lm.arch))
        if not args.json:
            print(res.title)
            print(res.frame.to_string(index=False))
        return _json(lm, res)
    if args.heads:
        heads = patching.parse_heads(args.heads, lm.arch)
        res = patching.head_set_patch(lm, tp, heads, args.positions if args.positions != "each" else "all", args.direction)
        out = {**_json(lm, res), "title": res.singles.title, "formula": res.singles.formula,
               "records": _frame_records(res.singles.frame), "joint": res.joint_effect}
        if not args.json:
            print(res.singles.title)
            print(res.singles.frame.to_string(index=False))
            print(f"joint {res.singles.metric} = {res.joint_effect:.4f}; sum of singles = {res.sum_of_singles:.4f}")
        return out
    bar = _ProgressBar("patching")
    try:
        res = patching.patch_sweep(lm, tp, args.site, args.positions, args.direction, layers, progress=bar)
    finally:
        bar.close()
    out = _json(lm, res)
    if not args.json:
        print(res.title)
        print(res.formula)
        print(res.frame.to_string(index=False))
    return out


def _patch_set(args, lm, layers) -> dict:
    from explorer.analyses.patching import sweep_over_pairs
    from explorer.core.prompts import check_for_tokenizer, load_prompt_set
    ps = check_for_tokenizer(load_prompt_set(args.prompts), lm.tokenizer)
    pairs = ps.by_category("headline")[: args.max_pairs]
    positions = "all" if args.positions == "each" else args.positions
    bar = _ProgressBar("patching over the set")
    try:
        res = sweep_over_pairs(lm, pairs, args.site, positions, args.direction, layers, progress=bar)
    finally:
        bar.close()
    skipped = ps.errors + res.skipped
    if not args.json:
        print(res.title)
        if skipped:
            print(f"{len(skipped)} pair(s) skipped: " + "; ".join(skipped[:5]))
        print(res.summary.to_string(index=False))
    return {**_json(lm, res), "prompt_set": str(args.prompts), "sha256": ps.sha256, "skipped": skipped}


def _frame_records(frame) -> list[dict]:
    from explorer.core.results import records
    return records(frame)


def _json(lm, res) -> dict:
    """A result's own JSON (its spec, title, formula, records and numbers) with the model on top."""
    return {"model": lm.describe(), **res.to_json()}


def cmd_ablate(args) -> dict:
    from explorer.analyses.ablation import ablate_pair, parse_targets
    lm = _load(args)
    tp = _pair(args, lm)
    targets = parse_targets(args.targets, lm.arch)
    reference = None
    if args.method != "zero":
        if not args.reference:
            raise ExplorerInputError(f"{args.method} ablation needs --reference SET.jsonl (its clean prompts give the values).")
        from explorer.analyses.ablation import Reference
        from explorer.core.prompts import load_prompt_set
        reference = Reference.from_pairs(lm, load_prompt_set(args.reference).by_category("headline"))
    res = ablate_pair(lm, tp, targets, args.method, _positions_arg(args.positions), reference)
    if not args.json:
        print(res.title)
        print(res.shift_formula)
        print(res.frame.to_string(index=False))
    return {**_json(lm, res), "formula": res.shift_formula}


def cmd_attribute(args) -> dict:
    from explorer.analyses.attribution import attribution_patching, compare_with_exact, spearman
    lm = _load(args)
    tp = _pair(args, lm)
    res = attribution_patching(lm, tp)
    if args.site not in ("resid_pre", "attn_out", "mlp_out", "head_out"):
        raise ExplorerInputError("--site must be resid_pre, attn_out, mlp_out or head_out.")
    table = res.table(args.site, per_position=args.site != "head_out")
    out = {**_json(lm, res), "site": args.site, "records": _frame_records(table)}
    if args.exact:
        merged = compare_with_exact(lm, tp, res, args.site)
        out["spearman"] = spearman(merged["estimate"], merged["exact"])
        out["records"] = _frame_records(merged)
    if not args.json:
        print(res.formula)
        print((merged if args.exact else table).to_string(index=False))
        if args.exact:
            print(f"Spearman rho (estimate vs exact) = {out['spearman']:.3f}")
    return out


def cmd_dla(args) -> dict:
    from explorer.analyses.dla import dla
    lm = _load(args)
    res = dla(lm, _pair(args, lm), args.run)
    if not args.json:
        print(res.title)
        print(res.formula)
        print(res.frame.to_string(index=False))
        print(f"true LD {res.ld_true:+.5f}, sum of components {res.ld_sum:+.5f}, error {res.error:+.2e}")
    return _json(lm, res)


def cmd_lens(args) -> dict:
    from explorer.analyses.lens import logit_lens
    lm = _load(args)
    res = logit_lens(lm, _pair(args, lm))
    if not args.json:
        print(res.title)
        print(res.frame.to_string(index=False))
    return _json(lm, res)


def cmd_run(args) -> dict:
    from explorer.analyses.ablation import Thresholds, ablate_set, parse_targets, save_run_card
    from explorer.core.prompts import load_prompt_set
    lm = _load(args)
    from explorer.core.prompts import check_for_tokenizer
    ps = check_for_tokenizer(load_prompt_set(args.prompts), lm.tokenizer)
    for err in ps.errors:
        print(f"warning: {args.prompts} {err}", file=sys.stderr)
    pairs = ps.by_category("headline")[: args.max_pairs] + ps.by_category("control")
    reference = load_prompt_set(args.reference).by_category("headline") if args.reference else None
    th = Thresholds(args.min_mean_drop, args.min_relative_drop, args.min_specificity, args.specificity_floor)
    bar = _ProgressBar("prompt set")
    try:
        res = ablate_set(lm, pairs, parse_targets(args.targets, lm.arch), args.method, _positions_arg(args.positions),
                         reference, th, n_random=args.n_random, progress=bar)
    finally:
        bar.close()
    card = res.run_card(lm, ps.path, ps.sha256)
    if args.card:
        save_run_card(card, args.card)
    if not args.json:
        for k, v in res.metrics.items():
            print(f"{k:40s} {v}")
        print(f"status: {res.status}")
        for w in res.warnings:
            print(f"warning: {w}")
    return card


def cmd_models(args) -> dict:
    if args.action == "list":
        from explorer.sources.models import known_models
        rows = known_models()
        if not args.json:
            for r in rows:
                print(f"{r['name']:10s} {r['status']:12s} {r['description']}")
        return {"models": rows}
    if args.name != "smollm2":
        raise ExplorerInputError("Only 'smollm2' can be prepared: `python -m explorer models prepare smollm2`.")
    from explorer.sources.smollm2 import prepare
    folder = prepare(progress=lambda f, t: print(t, file=sys.stderr))
    if not args.json:
        print(f"SmolLM2-135M-Instruct ready in {folder}; use --model smollm2")
    return {"prepared": "smollm2", "folder": str(folder)}


# ---- stories: `story export STORY --out talk.html` ----
def _story_parser(sub) -> None:
    p = sub.add_parser("story", help="export a story (a JSON/TOML list of views) as one offline HTML file")
    p.add_argument("action", choices=["export"])
    p.add_argument("story", help="a story file, or the name of one under stories/")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--png-dir", default=None, help="also write one PNG per step into this folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print what was written as JSON on stdout")


def cmd_story(args) -> dict:
    from pathlib import Path
    from explorer.sources.models import load_model
    from explorer.surfaces.stories import STORIES_DIR, export_html, load_story
    path = Path(args.story)
    if not path.exists() and (STORIES_DIR / path.name).exists():
        path = STORIES_DIR / path.name
    story = load_story(path)
    bar = _ProgressBar("story")
    try:
        out = export_html(story, args.out, png_dir=args.png_dir, progress=bar,
                          load_model=lambda name, **kw: load_model(name, threads=args.threads, **kw))
    finally:
        bar.close()
    if not args.json:
        print(f"{story.title}: {len(story.steps)} steps written to {out}"
              + (f", one PNG per step in {args.png_dir}" if args.png_dir else ""))
    return {"story": story.title, "steps": len(story.steps), "out": str(out), "png_dir": args.png_dir}


COMMANDS = {"baseline": cmd_baseline, "patch": cmd_patch, "ablate": cmd_ablate, "attribute": cmd_attribute,
            "dla": cmd_dla, "lens": cmd_lens, "run": cmd_run, "models": cmd_models,
            "story": cmd_story}


# ---- SAE and corpus commands (explorer/surfaces/sae_cli.py): registered here, in one block ----
from explorer.surfaces import sae_cli as _sae_cli  # noqa: E402

_core_parser = build_parser


def build_parser() -> argparse.ArgumentParser:  # noqa: F811 - the core parser plus `sae` and `corpus`
    parser = _core_parser()
    _sae_cli.register(parser, COMMANDS, _model_args, _pair_args)
    return parser
# ---- end of SAE commands ----


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            raise ExplorerInputError(f"Give a command: {', '.join(COMMANDS)}. See `python -m explorer --help`.")
        out = COMMANDS[args.command](args)
    except ExplorerInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(out, sys.stdout, default=float)
        sys.stdout.write("\n")
    return 0
