"""The one traced forward pass every experiment goes through.

`run` takes a batch of token ids, a list of interventions (write a value into a site
for chosen rows/positions/heads) and a list of sites to read, and returns the logits
at the last position plus what was read. Interventions and reads are applied in the
order the model computes them, which nnsight requires.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from explorer.core.adapters import SITE_ORDER, get_path
from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import to_host, to_model


# transformers 5.24 renames past_key_values to `cache`, a keyword nnsight's trace keeps for itself.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


@dataclass
class Intervention:
    """Write `value` into `site` of `layer` for batch `rows`.

    rows: [n] batch indices. pos: [n] positions, or None for all positions.
    heads: [n] head indices (head_out only), or None.
    value: [n, d] (or [n, d_head] for heads) when pos is given; [n, pos, d] when pos is None.
    value may also be a float scalar (e.g. 0.0 for zero ablation).
    """

    site: str
    layer: int
    rows: torch.Tensor
    pos: torch.Tensor | None
    value: torch.Tensor | float
    heads: torch.Tensor | None = None
    module: tuple[str, int] | None = None  # site "qkv": (projection path below the layer, d_head chunks)
    # Copy instead of writing `value`: (rows, pos) [n] each, read from the same site in this same pass
    # (a source prompt riding in the batch or packed sequence); needs pos.
    copy_from: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def order(self) -> tuple[int, int]:
        return (self.layer, SITE_ORDER[self.site])


def _as_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _on_model(lm, iv: Intervention) -> Intervention:
    """A copy of `iv` whose indices and value sit on the model's device (value in the model's dtype)."""
    move = lambda t: None if t is None else to_model(lm, t)
    return replace(iv, rows=move(iv.rows), pos=move(iv.pos), heads=move(iv.heads),
                   value=move(iv.value) if torch.is_tensor(iv.value) else iv.value,
                   copy_from=None if iv.copy_from is None else (move(iv.copy_from[0]), move(iv.copy_from[1])))


def _write(x: torch.Tensor, iv: Intervention, n_heads: int) -> None:
    """In-place write; x is [batch, pos, d] (head_out: [batch, pos, heads*d_head])."""
    value = iv.value.to(x.dtype) if torch.is_tensor(iv.value) else iv.value  # a site may compute in float32
    if iv.site in ("head_out", "qkv"):
        chunks = n_heads if iv.site == "head_out" else iv.module[1]
        view = x.view(x.shape[0], x.shape[1], chunks, -1)  # [batch, pos, head, d_head]
        if iv.copy_from is not None:
            value = view[iv.copy_from[0], iv.copy_from[1], iv.heads].clone()
        if iv.pos is None:
            view[iv.rows, :, iv.heads] = value
        else:
            view[iv.rows, iv.pos, iv.heads] = value
    elif iv.pos is None:
        x[iv.rows] = value
    else:
        x[iv.rows, iv.pos] = value if iv.copy_from is None else x[iv.copy_from[0], iv.copy_from[1]].clone()


def run(lm, input_ids: torch.Tensor, interventions: list[Intervention] = (), reads: list[tuple[str, int]] = (),
        all_logits: bool = False, skip_layers: int = 0, skip_value: torch.Tensor | None = None,
        past_key_values=None, keep: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, return_cache: bool = False, answers: tuple[int, ...] | None = None):
    """One traced forward pass. Returns (logits [batch, vocab] at the last position, reads).

    Tensors may come from anywhere: ids, masks, position ids, the skip value and the interventions'
    indices and values are moved to the model's device and dtype here. The logits come back on the
    CPU in float32 (float64 for a float64 model); reads stay on the model's device in its dtype, for
    the next pass (the activation cache hands out CPU copies).
    reads maps (site, layer) -> tensor [batch, pos, ...]; head_out is [batch, pos, head, d_head],
    attn_pattern is [batch, head, query, key]. With all_logits the logits are [batch, pos, vocab].
    skip_layers > 0 skips layers 0..skip_layers-1, feeding `skip_value` [batch, pos, d_model] to
    layer skip_layers as its input (work a patch cannot change). past_key_values: a cache of
    earlier positions, so input_ids hold only the later positions.
    keep: sequence indices whose logits to return ([batch, len(keep), vocab]) instead of the last
    position's. attention_mask (4D, additive) and position_ids pass through to the model (packed rows).
    return_cache: also return the key/value cache of this pass as a third value.
    answers: token ids; the logits returned are those ids' only ([..., len(answers)]), and the
    unembedding multiplies by just their rows (with a large vocabulary it is most of a short pass).
    """
    arch, sites = lm.arch, lm.sites
    for site, layer in reads:
        arch.check_layer(layer)
        if site == "attn_pattern":
            arch.check_softmax(layer, "An attention pattern")
    # Group by (layer, site) in execution order.
    steps: dict[tuple[int, int], tuple[str, int, list, bool]] = {}
    for iv in interventions:
        arch.check_layer(iv.layer)
        if iv.site == "attn_pattern":
            raise ExplorerInputError("Attention patterns can be read, not patched.")
        if iv.site == "qkv" and any(o.site == "qkv" and o.module != iv.module for o in interventions):
            raise ExplorerInputError("One pass can write only one query/key/value projection per layer.")
        steps.setdefault(iv.order, (iv.site, iv.layer, [], False))[2].append(_on_model(lm, iv))
    for site, layer in reads:
        key = (layer, SITE_ORDER[site])
        s, l, ivs, _ = steps.get(key, (site, layer, [], False))
        steps[key] = (s, l, ivs, True)
    input_ids = to_model(lm, input_ids)
    if skip_value is not None:
        skip_value = to_model(lm, skip_value)
    saved = {}
    kwargs = {} if all_logits else {"logits_to_keep": 1 if keep is None else to_model(lm, keep)}
    if past_key_values is not None:  # not `cache=`: nnsight's trace takes that keyword for itself
        kwargs["past_key_values"] = past_key_values
    if attention_mask is not None:
        kwargs["attention_mask"] = to_model(lm, attention_mask)
    if position_ids is not None:
        kwargs["position_ids"] = to_model(lm, position_ids)
    if return_cache:
        kwargs["use_cache"] = True
    with lm.lock, torch.no_grad():
        with lm.nn.trace(input_ids, **kwargs):
            root = lm.nn
            for layer in range(skip_layers):
                sites.layer(root, layer).skip(skip_value)
            for key in sorted(steps):
                site, layer, ivs, read = steps[key]
                n_heads = arch.heads_in(layer)
                if site == "resid_pre":
                    x = sites.layer(root, layer).input
                elif site == "qkv":
                    x = get_path(sites.layer(root, layer), ivs[0].module[0]).output
                elif site == "head_out":
                    x = sites.o_proj(root, layer).input
                elif site == "attn_out":
                    x = _as_tensor(sites.mixer(root, layer).output)
                elif site == "attn_pattern":
                    x = sites.mixer(root, layer).output[1]
                elif site == "mlp_out":
                    x = sites.mlp(root, layer).output
                elif site == "resid_post":
                    x = _as_tensor(sites.layer(root, layer).output)
                else:
                    raise ExplorerInputError(f"Unknown site {site!r}.")
                for iv in ivs:
                    _write(x, iv, n_heads)
                if read:
                    if site == "head_out":
                        saved[(site, layer)] = x.view(x.shape[0], x.shape[1], n_heads, -1).clone().save()
                    else:
                        saved[(site, layer)] = x.clone().save()
            if answers is not None:
                unembed = sites.unembed(lm.torch_model)
                bias = getattr(unembed, "bias", None)
                head = sites.unembed(root)
                head.skip(torch.nn.functional.linear(head.input, unembed.weight[list(answers)],
                                                     None if bias is None else bias[list(answers)]))
            output = lm.nn.output.save()
    lm.forward_calls += 1
    logits = output.logits if all_logits or keep is not None else output.logits[:, -1, :]
    logits = to_host(logits)  # half precision widened for the metric; float64 (numerical checks) kept
    if not torch.isfinite(logits).all():
        raise ExplorerInputError(_overflow_message(lm))
    if return_cache:
        return logits, dict(saved), output.past_key_values
    return logits, dict(saved)


def _overflow_message(lm) -> str:
    if lm.dtype in ("float16", "bfloat16"):
        wider = "bfloat16 or float32" if lm.dtype == "float16" else "float32"
        return (f"The model's activations overflowed to inf/NaN in {lm.dtype}, so no logit difference can be "
                f"computed; load the model in {wider} (the dtype setting, or --dtype).")
    return (f"The model produced inf/NaN logits in {lm.dtype}, which no precision setting explains: its "
            "weights are probably broken. Check the model folder.")
