"""Direct logit attribution at the last position, through the final norm with the cached scale.

Each component's output (embedding, attention and MLP per layer, each head, biases) is
pushed through the final norm *linearised at this run's final residual* (the scale, and
the centring for LayerNorm, come from the same run: seed mistake 5 was leaving it out)
and dotted with W_U[clean] - W_U[corrupted]. The components sum to the true logit
difference; the result carries the residual error so the UI can show it. The maths runs on the
model's device in float32 (cached activations are moved there); only the frames leave.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from explorer.core.cache import get_activations
from explorer.core.errors import ExplorerInputError
from explorer.core.results import Result, make_spec, nullable_ints
from explorer.core.prompts import TokenizedPair, show_token, single_token_ids
from explorer.core.runtime import to_model
from explorer.core.metrics import logit_diff

DLA_FORMULA = ("DLA(c) = norm_lin(c) · (W_U[clean_answer] − W_U[corrupted_answer]), norm_lin = final norm with "
               "the scale (and centring, for LayerNorm) frozen at this run's final residual")


def _eps(norm) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return 1e-6


class FrozenNorm:
    """The final norm, linearised at one residual vector x: a linear map plus a bias."""

    def __init__(self, lm, x_final: torch.Tensor):  # x_final: [d_model], on any device
        fam = lm.arch.family
        norm = lm.sites.final_norm(lm.torch_model)
        self.lm = lm
        x = to_model(lm, x_final, torch.float32)
        self.layernorm = fam.norm_kind == "layernorm"
        eps = _eps(norm)
        if self.layernorm:
            self.scale = 1.0 / torch.sqrt(x.var(unbiased=False) + eps)
        else:
            self.scale = 1.0 / torch.sqrt(x.pow(2).mean() + eps)
        weight = norm.weight.detach().float() if getattr(norm, "weight", None) is not None else torch.ones_like(x)
        self.gain = weight + fam.norm_weight_offset
        bias = getattr(norm, "bias", None)
        self.bias = bias.detach().float() if bias is not None else None
        with torch.no_grad():  # how well the linearisation reproduces the real module at x
            real = norm(to_model(lm, x_final).unsqueeze(0)).float()[0]  # the module in the model's own dtype
            self.check_error = float((real - self(x, with_bias=True)).abs().max())

    def __call__(self, c: torch.Tensor, with_bias: bool = False) -> torch.Tensor:  # c: [..., d_model], any device
        c = to_model(self.lm, c, torch.float32)
        if self.layernorm:
            c = c - c.mean(-1, keepdim=True)
        out = c * self.scale * self.gain
        if with_bias and self.bias is not None:
            out = out + self.bias
        return out


def unembed_matrix(lm) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = lm.sites.unembed(lm.torch_model)
    return head.weight.detach().float(), (head.bias.detach().float() if getattr(head, "bias", None) is not None else None)


def o_proj_weight(lm, layer: int) -> torch.Tensor:
    """Output projection as [d_model, heads*d_head] whatever the module type."""
    proj = lm.sites.o_proj(lm.torch_model, layer)
    w = proj.weight.detach().float()
    return w.T if proj.__class__.__name__ == "Conv1D" else w


def o_proj_bias(lm, layer: int):
    proj = lm.sites.o_proj(lm.torch_model, layer)
    return proj.bias.detach().float() if getattr(proj, "bias", None) is not None else None


def head_contributions(lm, layer: int, z: torch.Tensor) -> torch.Tensor:
    """z: [head, d_head] at one position (any device) -> each head's write to the residual [head, d_model],
    on the model's device in float32."""
    w = o_proj_weight(lm, layer)
    n_heads = z.shape[0]
    return torch.einsum("hd,mhd->hm", to_model(lm, z, torch.float32), w.view(w.shape[0], n_heads, -1))


def softcap(lm) -> float | None:
    cfg = lm.torch_model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "final_logit_softcapping", None)


def _additive_blocks(lm) -> bool:
    # Gemma normalises each block's output before adding it to the residual, so attn_out and
    # mlp_out are not the residual's summands and head writes are not additive.
    fam = lm.arch.family
    return fam.attn_post_norm is None and fam.mlp_post_norm is None


@dataclass(frozen=True)
class DLAResult(Result):
    _json_properties = ("error", "relative_error")

    frame: pd.DataFrame  # component, kind, layer, head, dla
    run: str
    ld_true: float  # LD from the model's own logits (before soft-capping where the model caps)
    ld_sum: float
    norm_check_error: float
    formula: str = DLA_FORMULA
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    @property
    def error(self) -> float:
        return self.ld_sum - self.ld_true

    def layers(self) -> pd.DataFrame:
        """The additive decomposition: embedding, attention and MLP (or block) per layer, bias terms."""
        return self.frame[self.frame["kind"].isin(["embed", "attn", "mlp", "block", "bias"])]

    def heads(self) -> pd.DataFrame:
        return self.frame[self.frame["kind"] == "head"]

    def top_heads(self, n: int = 3) -> list[tuple[int, int]]:
        """(layer, head) of the n heads with the largest |DLA|."""
        heads = self.heads()
        top = heads.reindex(heads["dla"].abs().sort_values(ascending=False).index).head(n)
        return [(int(r.layer), int(r.head)) for r in top.itertuples()]

    @property
    def relative_error(self) -> float:
        return abs(self.error) / max(abs(self.ld_true), 1e-9)

    @property
    def title(self) -> str:
        return f"Direct logit attribution to LD at the last position, {self.run} run"


def _reads(lm) -> list[tuple[str, int]]:
    L = lm.arch.n_layers
    reads = [("resid_pre", 0), ("resid_post", L - 1)]
    for layer in range(L):
        reads += [("resid_pre", layer), ("resid_post", layer)]
        if _additive_blocks(lm):
            reads += [("attn_out", layer), ("mlp_out", layer), ("head_out", layer)]
    return sorted(set(reads))


def dla(lm, tp: TokenizedPair, run: str = "clean") -> DLAResult:
    """Per-layer and per-head DLA of LD(clean_answer vs corrupted_answer) on one run."""
    if run not in ("clean", "corrupted"):
        raise ExplorerInputError("run must be 'clean' or 'corrupted'.")
    ids = tp.clean_ids if run == "clean" else tp.corrupted_ids
    logits, acts = get_activations(lm, ids, _reads(lm))
    L = lm.arch.n_layers
    x_final = acts[("resid_post", L - 1)][-1]
    norm = FrozenNorm(lm, x_final)
    w_u, b_u = unembed_matrix(lm)
    direction = w_u[tp.clean_answer_id] - w_u[tp.corrupted_answer_id]  # [d_model]

    def score(vec):
        return float(norm(vec) @ direction)

    rows = [{"component": "embed", "kind": "embed", "layer": None, "head": None, "dla": score(acts[("resid_pre", 0)][-1])}]
    for layer in range(L):
        if _additive_blocks(lm):
            rows.append({"component": f"L{layer} attn", "kind": "attn", "layer": layer, "head": None,
                         "dla": score(acts[("attn_out", layer)][-1])})
            rows.append({"component": f"L{layer} mlp", "kind": "mlp", "layer": layer, "head": None,
                         "dla": score(acts[("mlp_out", layer)][-1])})
        else:
            block = acts[("resid_post", layer)][-1] - acts[("resid_pre", layer)][-1]
            rows.append({"component": f"L{layer} block", "kind": "block", "layer": layer, "head": None,
                         "dla": score(block)})
    if norm.bias is not None:
        rows.append({"component": "final norm bias", "kind": "bias", "layer": L, "head": None,
                     "dla": float(norm.bias @ direction)})
    if b_u is not None:
        rows.append({"component": "unembed bias", "kind": "bias", "layer": L, "head": None,
                     "dla": float(b_u[tp.clean_answer_id] - b_u[tp.corrupted_answer_id])})
    frame = nullable_ints(pd.DataFrame(rows))
    ld_sum = float(frame["dla"].sum())
    ld_true = float(logit_diff(logits, tp.clean_answer_id, tp.corrupted_answer_id))
    cap = softcap(lm)
    if cap:  # undo tanh soft-capping so the target is the linear logit difference
        raw = torch.atanh((logits[[tp.clean_answer_id, tp.corrupted_answer_id]] / cap).clamp(-0.999999, 0.999999)) * cap
        ld_true = float(raw[0] - raw[1])
    heads = head_frame(lm, acts, norm, direction) if _additive_blocks(lm) else pd.DataFrame()
    frame = pd.concat([frame, heads], ignore_index=True)
    spec = make_spec("direct logit attribution", lm, tp, run=run, position="last")
    return DLAResult(frame, run, ld_true, ld_sum, norm.check_error, spec=spec)


def head_frame(lm, acts, norm, direction) -> pd.DataFrame:
    rows = []
    for layer in range(lm.arch.n_layers):
        contrib = head_contributions(lm, layer, acts[("head_out", layer)][-1])
        values = norm(contrib) @ direction
        for head, value in enumerate(values.tolist()):
            rows.append({"component": lm.arch.head_label(layer, head), "kind": "head", "layer": layer, "head": head,
                         "dla": value})
        bias = o_proj_bias(lm, layer)
        if bias is not None:
            rows.append({"component": f"L{layer} attn bias", "kind": "head_bias", "layer": layer, "head": None,
                         "dla": float(norm(bias) @ direction)})
    return nullable_ints(pd.DataFrame(rows))


def head_token_table(lm, tp: TokenizedPair, heads: list[tuple[int, int]], tokens: list[str],
                     run: str = "clean") -> pd.DataFrame:
    """Each head's direct effect on each listed token's logit (e.g. all fruits), same frozen norm."""
    if not _additive_blocks(lm):
        raise ExplorerInputError("Per-head DLA needs heads that add to the residual; this family normalises the "
                                 "attention output first (Gemma), so use the per-layer view.")
    ids = tp.clean_ids if run == "clean" else tp.corrupted_ids
    _, acts = get_activations(lm, ids, _reads(lm))
    norm = FrozenNorm(lm, acts[("resid_post", lm.arch.n_layers - 1)][-1])
    w_u, _ = unembed_matrix(lm)
    token_ids = single_token_ids(lm.tokenizer, tokens)
    rows = []
    for layer, head in heads:
        lm.arch.check_head(layer, head)
        vec = norm(head_contributions(lm, layer, acts[("head_out", layer)][-1])[head])
        for t, tid in zip(tokens, token_ids):
            rows.append({"head": lm.arch.head_label(layer, head), "token": t, "logit_contribution": float(vec @ w_u[tid])})
    return pd.DataFrame(rows)


def head_top_tokens(lm, tp: TokenizedPair, layer: int, head: int, run: str = "clean", k: int = 10) -> pd.DataFrame:
    """Tokens a head's direct write promotes and suppresses most (through the unembedding)."""
    lm.arch.check_head(layer, head)
    if not _additive_blocks(lm):
        raise ExplorerInputError("Per-head DLA is not additive for this family (Gemma normalises attention output).")
    ids = tp.clean_ids if run == "clean" else tp.corrupted_ids
    _, acts = get_activations(lm, ids, _reads(lm))
    norm = FrozenNorm(lm, acts[("resid_post", lm.arch.n_layers - 1)][-1])
    w_u, _ = unembed_matrix(lm)
    logits = w_u @ norm(head_contributions(lm, layer, acts[("head_out", layer)][-1])[head])
    rows = []
    for sign, label in ((1, "promoted"), (-1, "suppressed")):
        vals, idx = (sign * logits).topk(k)
        for rank, (v, i) in enumerate(zip(vals.tolist(), idx.tolist()), 1):
            rows.append({"direction": label, "rank": rank, "token": show_token(lm.tokenizer, i), "logit_contribution": sign * v})
    return pd.DataFrame(rows)
