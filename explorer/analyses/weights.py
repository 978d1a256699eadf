"""Weights view: a head's OV circuit read out through the unembedding, QK through the embedding.

OV maps what a head reads to what it writes: M = W_O_h W_V_h (d_model x d_model). Its
input side is read through the embedding (with the layer's input-norm gain), its output
side through the unembedding (with the final-norm gain): output directions live in
logit space, not embedding space (seed mistake 6). Rotary embeddings and q/k norms are
outside these matrices, so the QK view shows content matching only.
The per-head matrices are small and come back on the CPU (the SVD runs there: MPS has none);
products with the embedding and unembedding run on the model's device.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from explorer.core.adapters import LINEAR
from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import show_token, single_token_ids
from explorer.core.runtime import to_host, to_model


@dataclass(frozen=True)
class HeadWeights:
    """One head's projections, on the CPU in float32."""

    q: torch.Tensor  # [d_head, d_model]
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor  # [d_model, d_head]


def head_weights(lm, layer: int, head: int) -> HeadWeights:
    arch = lm.arch
    arch.check_head(layer, head)
    if arch.layer_kind(layer) == LINEAR:
        raise ExplorerInputError(f"Layer {layer} is linear attention (Gated DeltaNet): it has no QK/OV circuit to show.")
    fam, model = arch.family.name, lm.torch_model
    attn = lm.sites.mixer(model, layer)
    H, hd, d = arch.n_heads, arch.head_dim, arch.d_model
    kv = head // (H // arch.n_kv_heads)
    if fam == "gpt2":
        w = attn.c_attn.weight.detach().float()  # Conv1D [d, 3d]: x @ w
        q, k, v = (w[:, i * d + head * hd: i * d + (head + 1) * hd].T for i in range(3))
        o = attn.c_proj.weight.detach().float()[head * hd:(head + 1) * hd, :].T
    elif fam == "gpt_neox":
        w = attn.query_key_value.weight.detach().float().view(H, 3 * hd, d)
        q, k, v = w[head, :hd], w[head, hd:2 * hd], w[head, 2 * hd:]
        o = attn.dense.weight.detach().float()[:, head * hd:(head + 1) * hd]
    else:
        wq = attn.q_proj.weight.detach().float()
        if wq.shape[0] == 2 * H * hd:  # Qwen3.5 gated attention: [query | gate] per head
            q = wq.view(H, 2 * hd, d)[head, :hd]
        else:
            q = wq[head * hd:(head + 1) * hd]
        k = attn.k_proj.weight.detach().float()[kv * hd:(kv + 1) * hd]
        v = attn.v_proj.weight.detach().float()[kv * hd:(kv + 1) * hd]
        o = attn.o_proj.weight.detach().float()[:, head * hd:(head + 1) * hd]
    return HeadWeights(to_host(q), to_host(k), to_host(v), to_host(o))


def _gain(norm, offset: float, like: torch.Tensor) -> torch.Tensor:
    """The norm's gain [d_model] on the device and dtype of `like`; ones for a norm without weights."""
    w = getattr(norm, "weight", None)
    return (w.detach().float() + offset) if w is not None else torch.ones_like(like)


def _input_norm(lm, layer: int):
    layer_mod = lm.sites.layer(lm.torch_model, layer)
    for name in ("input_layernorm", "ln_1"):
        if hasattr(layer_mod, name):
            return getattr(layer_mod, name)
    return None


def _readers(lm, layer: int):
    """Embedding rows as the layer's attention reads them, and unembedding rows as logits read writes."""
    fam = lm.arch.family
    w_e = lm.sites.embed(lm.torch_model).weight.detach().float()
    w_u = lm.sites.unembed(lm.torch_model).weight.detach().float()
    g_in = _gain(_input_norm(lm, layer), fam.norm_weight_offset, w_e[0])
    g_out = _gain(lm.sites.final_norm(lm.torch_model), fam.norm_weight_offset, w_u[0])
    return w_e * g_in, w_u * g_out


def ov_circuit(lm, layer: int, head: int, n_directions: int = 4, k: int = 8) -> pd.DataFrame:
    """Top singular directions of W_O W_V: input tokens (embedding side), output tokens (unembedding side)."""
    w = head_weights(lm, layer, head)
    m = w.o @ w.v  # [d_model, d_model]: residual read -> residual written
    u, s, vh = torch.linalg.svd(m)
    emb, unemb = _readers(lm, layer)
    u, vh = to_model(lm, u, torch.float32), to_model(lm, vh, torch.float32)
    rows = []
    for i in range(min(n_directions, len(s))):
        reads = emb @ vh[i]
        writes = unemb @ u[:, i]
        top_in = reads.topk(k).indices.tolist()
        top_out = writes.topk(k).indices.tolist()
        rows.append({"direction": i, "singular_value": float(s[i]),
                     "reads_tokens (embedding side)": " ".join(show_token(lm.tokenizer, t) for t in top_in),
                     "writes_tokens (unembedding side)": " ".join(show_token(lm.tokenizer, t) for t in top_out)})
    return pd.DataFrame(rows)


def qk_circuit(lm, layer: int, head: int, n_directions: int = 4, k: int = 8) -> pd.DataFrame:
    """Top singular directions of W_Q^T W_K, both sides read through the embedding."""
    w = head_weights(lm, layer, head)
    m = w.q.T @ w.k  # [d_model (query side), d_model (key side)]
    u, s, vh = torch.linalg.svd(m)
    emb, _ = _readers(lm, layer)
    u, vh = to_model(lm, u, torch.float32), to_model(lm, vh, torch.float32)
    rows = []
    for i in range(min(n_directions, len(s))):
        q_tokens = (emb @ u[:, i]).topk(k).indices.tolist()
        k_tokens = (emb @ vh[i]).topk(k).indices.tolist()
        rows.append({"direction": i, "singular_value": float(s[i]),
                     "query_tokens": " ".join(show_token(lm.tokenizer, t) for t in q_tokens),
                     "key_tokens": " ".join(show_token(lm.tokenizer, t) for t in k_tokens)})
    return pd.DataFrame(rows)


def ov_token_matrix(lm, layer: int, head: int, tokens: list[str]) -> pd.DataFrame:
    """For listed tokens: the logit each output token gets when the head attends fully to each
    input token (embedding -> OV -> unembedding; norms as gains). Copying heads show a diagonal."""
    ids = single_token_ids(lm.tokenizer, tokens)
    w = head_weights(lm, layer, head)
    emb, unemb = _readers(lm, layer)
    values = to_host((emb[ids] @ to_model(lm, (w.o @ w.v).T, torch.float32)) @ unemb[ids].T)  # [input, output token]
    rows = [{"input_token": tokens[i], "output_token": tokens[j], "logit": float(values[i, j])}
            for i in range(len(ids)) for j in range(len(ids))]
    return pd.DataFrame(rows)
