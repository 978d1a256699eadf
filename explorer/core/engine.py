"""The one traced forward pass every experiment goes through.

`run` takes a batch of token ids, a list of interventions (write a value into a site
for chosen rows/positions/heads), a list of sites to read and PassOptions, and returns a
PassResult (logits, reads, key/value cache). `gradients` is the forward-and-backward pass
of attribution. Interventions and reads are applied in the order the model computes them,
which nnsight requires. This is the only module that opens a trace or takes a model's lock.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from explorer.core.adapters import SITE_ORDER, get_path
from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import HOST, to_host, to_model


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


@dataclass(frozen=True)
class Write:
    """One cell of one batch row to overwrite: the unit analyses speak in before grouping.

    pos None writes every position (value [pos, d]); head selects a head's slice of head_out.
    value: a tensor, or a float written as is (0.0 for zero ablation); copy_from: (row, pos) of the
    same site in this same pass to copy from instead (a source prompt riding in the batch).
    """

    site: str
    layer: int
    row: int
    pos: int | None
    head: int | None = None
    value: torch.Tensor | float | None = None
    copy_from: tuple[int, int] | None = None


def interventions(writes) -> list[Intervention]:
    """Group writes into as few Interventions as the engine can apply: one per site, layer, position
    kind (one or all), head kind and value kind (tensor, scalar, copy), rows stacked in order."""
    groups: dict = {}
    for w in writes:
        if w.copy_from is not None:
            kind = ("copy",)
        elif torch.is_tensor(w.value):
            kind = ("tensor",)
        else:
            kind = ("scalar", float(w.value))
        key = (w.site, w.layer, w.pos is None, w.head is not None, kind)
        groups.setdefault(key, []).append(w)
    long = lambda xs: torch.tensor(xs, dtype=torch.long, device=HOST)  # noqa: E731
    out = []
    for (site, layer, all_pos, has_head, kind), ws in groups.items():
        value = torch.stack([w.value for w in ws]) if kind[0] == "tensor" else kind[1] if kind[0] == "scalar" else 0.0
        copy = None if kind[0] != "copy" else (long([w.copy_from[0] for w in ws]), long([w.copy_from[1] for w in ws]))
        out.append(Intervention(site, layer, long([w.row for w in ws]), None if all_pos else long([w.pos for w in ws]),
                                value, long([w.head for w in ws]) if has_head else None, copy_from=copy))
    return out


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
    if iv.site in ("head_out", "qkv") and iv.heads is not None:
        chunks = n_heads if iv.site == "head_out" else iv.module[1]
        view = x.view(x.shape[0], x.shape[1], chunks, -1)  # [batch, pos, head, d_head]
        if iv.copy_from is not None:
            value = view[iv.copy_from[0], iv.copy_from[1], iv.heads].clone()
        if iv.pos is None:
            view[iv.rows, :, iv.heads] = value
        else:
            view[iv.rows, iv.pos, iv.heads] = value
        return
    if torch.is_tensor(value) and iv.site in ("head_out", "qkv") and value.shape[-1] != x.shape[-1]:
        value = value.flatten(-2)  # [..., head, d_head] for every head at once: the site's whole width
    if iv.pos is None:
        x[iv.rows] = value
    else:
        x[iv.rows, iv.pos] = value if iv.copy_from is None else x[iv.copy_from[0], iv.copy_from[1]].clone()


@dataclass(frozen=True)
class PassOptions:
    """How a pass runs, beyond its ids, interventions and reads.

    all_logits: logits at every position ([batch, pos, vocab]) instead of the last one.
    keep: sequence indices whose logits to return ([batch, len(keep), vocab]).
    answers: token ids; only their logits come back ([..., len(answers)]) and the unembedding multiplies
        by just their rows (with a large vocabulary it is most of a short pass).
    skip_layers > 0 skips layers 0..skip_layers-1, feeding `skip_value` [batch, pos, d_model] to layer
        skip_layers as its input (work a patch cannot change).
    past_key_values: a cache of earlier positions, so the ids hold only the later positions.
    attention_mask (4D, additive) and position_ids pass through to the model (packed rows).
    return_cache: the result carries this pass's key/value cache.
    """

    all_logits: bool = False
    keep: torch.Tensor | None = None
    answers: tuple[int, ...] | None = None
    skip_layers: int = 0
    skip_value: torch.Tensor | None = None
    past_key_values: object = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    return_cache: bool = False


DEFAULT = PassOptions()


@dataclass
class PassResult:
    """What one traced pass returns.

    logits: on the CPU in float32 (float64 for a float64 model), shaped as PassOptions asked.
    reads: (site, layer) -> tensor [batch, pos, ...] on the model's device in its dtype, for the next
        pass (the activation cache hands out CPU copies); head_out is [batch, pos, head, d_head],
        attn_pattern [batch, head, query, key].
    cache: the key/value cache when PassOptions.return_cache, else None.
    """

    logits: torch.Tensor
    reads: dict
    cache: object = None


def _site(lm, root, site: str, layer: int, module: tuple[str, int] | None = None):
    """The traced tensor of `site` at `layer` (head_out: the o_proj input, [batch, pos, heads*d_head])."""
    sites = lm.sites
    if site == "resid_pre":
        return sites.layer(root, layer).input
    if site == "qkv":
        return get_path(sites.layer(root, layer), module[0]).output
    if site == "head_out":
        return sites.o_proj(root, layer).input
    if site == "attn_out":
        return _as_tensor(sites.mixer(root, layer).output)
    if site == "attn_pattern":
        return sites.mixer(root, layer).output[1]
    if site == "mlp_out":
        return sites.mlp(root, layer).output
    if site == "resid_post":
        return _as_tensor(sites.layer(root, layer).output)
    raise ExplorerInputError(f"Unknown site {site!r}.")


def _check_reads(arch, reads) -> None:
    for site, layer in reads:
        arch.check_layer(layer)
        if site not in SITE_ORDER:
            raise ExplorerInputError(f"Unknown site {site!r}.")
        if site == "attn_pattern":
            arch.check_softmax(layer, "An attention pattern")


def run(lm, input_ids: torch.Tensor, interventions: list[Intervention] = (), reads: list[tuple[str, int]] = (),
        options: PassOptions = DEFAULT) -> PassResult:
    """One traced forward pass: write the interventions, read the sites, return a PassResult.

    Tensors may come from anywhere: ids, masks, position ids, the skip value and the interventions'
    indices and values are moved to the model's device and dtype here.
    """
    arch, o = lm.arch, options
    _check_reads(arch, reads)
    # Group by (layer, site) in execution order.
    steps: dict[tuple[int, int], tuple[str, int, list, bool]] = {}
    for iv in interventions:
        arch.check_layer(iv.layer)
        if iv.site == "attn_pattern":
            raise ExplorerInputError("Attention patterns can be read, not patched.")
        if iv.site == "qkv" and any(other.site == "qkv" and other.module != iv.module for other in interventions):
            raise ExplorerInputError("One pass can write only one query/key/value projection per layer.")
        steps.setdefault(iv.order, (iv.site, iv.layer, [], False))[2].append(_on_model(lm, iv))
    for site, layer in reads:
        key = (layer, SITE_ORDER[site])
        s, l, ivs, _ = steps.get(key, (site, layer, [], False))
        steps[key] = (s, l, ivs, True)
    input_ids = to_model(lm, input_ids)
    skip_value = None if o.skip_value is None else to_model(lm, o.skip_value)
    saved = {}
    kwargs = {} if o.all_logits else {"logits_to_keep": 1 if o.keep is None else to_model(lm, o.keep)}
    if o.past_key_values is not None:  # not `cache=`: nnsight's trace takes that keyword for itself
        kwargs["past_key_values"] = o.past_key_values
    if o.attention_mask is not None:
        kwargs["attention_mask"] = to_model(lm, o.attention_mask)
    if o.position_ids is not None:
        kwargs["position_ids"] = to_model(lm, o.position_ids)
    if o.return_cache:
        kwargs["use_cache"] = True
    with lm.lock, torch.no_grad():
        with lm.nn.trace(input_ids, **kwargs):
            root = lm.nn
            for layer in range(o.skip_layers):
                lm.sites.layer(root, layer).skip(skip_value)
            for key in sorted(steps):
                site, layer, ivs, read = steps[key]
                n_heads = arch.heads_in(layer)
                x = _site(lm, root, site, layer, ivs[0].module if ivs else None)
                for iv in ivs:
                    _write(x, iv, n_heads)
                if read:
                    if site == "head_out":
                        saved[(site, layer)] = x.view(x.shape[0], x.shape[1], n_heads, -1).clone().save()
                    else:
                        saved[(site, layer)] = x.clone().save()
            if o.answers is not None:
                unembed = lm.sites.unembed(lm.torch_model)
                bias = getattr(unembed, "bias", None)
                head = lm.sites.unembed(root)
                head.skip(torch.nn.functional.linear(head.input, unembed.weight[list(o.answers)],
                                                     None if bias is None else bias[list(o.answers)]))
            output = lm.nn.output.save()
    lm.forward_calls += 1
    logits = output.logits if o.all_logits or o.keep is not None else output.logits[:, -1, :]
    logits = to_host(logits)  # half precision widened for the metric; float64 (numerical checks) kept
    if not torch.isfinite(logits).all():
        raise ExplorerInputError(_overflow_message(lm))
    return PassResult(logits, dict(saved), output.past_key_values if o.return_cache else None)


def gradients(lm, input_ids: torch.Tensor, reads: list[tuple[str, int]], answers: tuple[int, int],
              interventions: list[Intervention] = ()) -> dict:
    """{read: (activation, d LD / d activation)} for one row, from one forward and one backward pass.

    LD = logit[last, answers[0]] - logit[last, answers[1]]. reads are (site, layer) in execution order;
    the autograd graph starts at the first layer read (earlier layers run without one). Interventions
    (written before the reads of their layer and site) let a caller splice values in, for example an
    SAE's reconstruction. Both tensors stay on the model's device, [1, pos, ...] each.
    """
    import nnsight

    from explorer.core.metrics import logit_diff

    _check_reads(lm.arch, reads)
    order = lambda r: (r[1], SITE_ORDER[r[0]])  # noqa: E731
    if list(reads) != sorted(reads, key=order):
        raise ExplorerInputError("Gradient reads must be listed in the order the model computes them.")
    writes: dict = {}
    for iv in interventions:
        writes.setdefault(iv.order, []).append(_on_model(lm, iv))
    input_ids = to_model(lm, input_ids)
    start = min([reads[0][1]] + [iv.layer for iv in interventions])
    with lm.lock, torch.enable_grad():
        with lm.nn.trace(input_ids):
            root = lm.nn
            first = lm.sites.embed(root).output if start == 0 else lm.sites.layer(root, start).input
            first.requires_grad_(True)  # weights are frozen; gradients flow from here on
            acts = nnsight.save([])
            pending = sorted(set(writes) | {order(r) for r in reads})
            wanted = {order(r): r for r in reads}
            for key in pending:
                ivs = writes.get(key, [])
                site, layer = wanted[key] if key in wanted else (ivs[0].site, ivs[0].layer)
                x = _site(lm, root, site, layer, ivs[0].module if ivs else None)
                for iv in ivs:
                    _write(x, iv, lm.arch.heads_in(layer))
                if key in wanted:
                    acts.append(x)
            ld = logit_diff(lm.nn.output.logits[:, -1, :], *answers)[0]
            grads = nnsight.save([])
            with ld.backward():
                for act in reversed(acts):
                    grads.append(act.grad)
            acts = [x.detach() for x in acts]
            nnsight.save(acts)
    lm.forward_calls += 1
    return dict(zip(reads, zip(acts, reversed(grads))))


def _overflow_message(lm) -> str:
    if lm.dtype in ("float16", "bfloat16"):
        wider = "bfloat16 or float32" if lm.dtype == "float16" else "float32"
        return (f"The model's activations overflowed to inf/NaN in {lm.dtype}, so no logit difference can be "
                f"computed; load the model in {wider} (the dtype setting, or --dtype).")
    return (f"The model produced inf/NaN logits in {lm.dtype}, which no precision setting explains: its "
            "weights are probably broken. Check the model folder.")
