"""Path patching (source tracing): a sender's effect routed only through one receiver.

Denoise: each sender head's output is switched to its clean value while everything else
stays at the corrupted run, and only the direct path into the receiver is kept:
  receiver = a head's q, k or v: the receiver layer's input becomes
      resid_pre_corr + W_O,s (z_clean,s - z_corr,s)      (direct path only: no other component
  sees the change), that input goes through the layer's own input norm and projection,
  and only the receiver head's slice is written into the corrupted run (a traced pass).
  receiver = logits: the final residual gets the same direct term at the last position and
  goes through the real final norm and unembedding.
Metric: recovery, normalised by LD_clean - LD_corr like activation patching.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from explorer.core import engine
from explorer.core.adapters import get_path
from explorer.analyses.baseline import pair_lds
from explorer.core.cache import get_activations
from explorer.analyses.dla import head_contributions
from explorer.core.errors import ExplorerInputError
from explorer.core.metrics import logit_diff, patch_effect
from explorer.core.results import make_spec
from explorer.analyses.patching import PatchResult
from explorer.core.prompts import TokenizedPair
from explorer.core.runtime import HOST, to_model


def parse_receiver(text: str, arch) -> tuple:
    """'logits' or 'L.H.q' / 'L5H1 k' -> ('logits',) or (layer, head, which)."""
    text = text.strip().lower()
    if text in ("logits", "final", "resid_final"):
        return ("logits",)
    cleaned = text.replace("l", " ").replace("h", " ").replace(".", " ").split()
    try:
        layer, head, which = int(cleaned[0]), int(cleaned[1]), cleaned[2]
    except (IndexError, ValueError):
        raise ExplorerInputError(f"Cannot read receiver {text!r}: write 'logits' or LAYER.HEAD.q|k|v, e.g. 5.1.q") from None
    arch.check_head(layer, head)
    return (layer, head, which)


def path_patch(lm, tp: TokenizedPair, receiver: tuple, senders: list[tuple[int, int]] | None = None) -> PatchResult:
    """Recovery when each sender head (all positions) reaches the corrupted run only through `receiver`."""
    tp.require_same_length("Path patching")
    arch, sites = lm.arch, lm.sites
    last_layer = arch.n_layers - 1
    to_logits = receiver == ("logits",)
    r_layer = arch.n_layers if to_logits else receiver[0]
    if senders is None:
        senders = [(l, h) for l in range(r_layer) for h in range(arch.heads_in(l))]
    for layer, head in senders:
        arch.check_head(layer, head)
        if layer >= r_layer:
            raise ExplorerInputError(f"Sender L{layer}H{head} is not before the receiver layer {r_layer}.")
    if not senders:
        raise ExplorerInputError("No sender heads before the receiver.")
    site_reads = [("head_out", l) for l in sorted({l for l, _ in senders})]
    base_read = ("resid_post", last_layer) if to_logits else ("resid_pre", r_layer)
    _, clean = get_activations(lm, tp.clean_ids, site_reads)
    _, corr = get_activations(lm, tp.corrupted_ids, site_reads + [base_read])
    # The direct terms are summed in float32 on the model's device, then enter its modules in its dtype.
    delta = torch.stack([_direct_write(lm, l, h, clean[("head_out", l)] - corr[("head_out", l)]) for l, h in senders])
    resid = to_model(lm, corr[base_read], torch.float32).unsqueeze(0) + delta  # [sender, pos, d_model]
    a, b = tp.clean_answer_id, tp.corrupted_answer_id
    if to_logits:
        with torch.no_grad():
            final = sites.final_norm(lm.torch_model)(to_model(lm, resid[:, -1]))
            logits = sites.unembed(lm.torch_model)(final)[:, [a, b]].float()
        lds = logit_diff(logits, 0, 1).tolist()
    else:
        layer, head, which = receiver
        path, chunks, index = sites.qkv_slot(layer, head, which)
        proj = get_path(sites.layer(lm.torch_model, layer), path)
        with torch.no_grad():
            out = proj(sites.input_norm(lm.torch_model, layer)(to_model(lm, resid)))  # [sender, pos, chunks*d_head]
        value = out.view(out.shape[0], out.shape[1], chunks, -1)[:, :, index]  # [sender, pos, d_head]
        n = len(senders)
        iv = engine.Intervention("qkv", layer, torch.arange(n, device=HOST), None, value,
                                 torch.full((n,), index, device=HOST), module=(path, chunks))
        # Layers before the receiver are untouched by a write at the receiver: skip them,
        # feeding the receiver layer the corrupted run's cached residual.
        skip_value = corr[base_read].unsqueeze(0).expand(n, -1, -1).clone()
        options = engine.PassOptions(skip_layers=layer, skip_value=skip_value, answers=(a, b))
        logits = engine.run(lm, torch.tensor([list(tp.corrupted_ids)], device=HOST).expand(n, -1), [iv],
                            options=options).logits
        lds = logit_diff(logits, 0, 1).numpy()  # the pass returned the two answers' logits only
    ld_clean, ld_corr = pair_lds(lm, tp, require_span=True)
    frame = pd.DataFrame([{"layer": l, "head": h, "head_label": arch.head_label(l, h)} for l, h in senders])
    frame["ld_patched"] = lds
    frame["recovery"] = patch_effect(np.asarray(lds), ld_clean, ld_corr, "denoise")
    name = "logits (final residual, direct path)" if to_logits else f"L{receiver[0]}H{receiver[1]} {receiver[2]}"
    spec = make_spec("path patching", lm, tp, receiver=name, senders=[list(s) for s in senders], direction="denoise",
                     metric="recovery")
    return PatchResult(frame, f"head_out → {name}", "all", "denoise", ld_clean, ld_corr, tp, spec)


def _direct_write(lm, layer: int, head: int, dz: torch.Tensor) -> torch.Tensor:
    """What head `head` adds to the residual when its output changes by dz [pos, head, d_head]."""
    return torch.stack([head_contributions(lm, layer, dz[p])[head] for p in range(dz.shape[0])])  # [pos, d_model]
