"""Architecture adapters: one table row per model family, mapping site names to modules.

Everything family-specific lives here (module paths, norm flavour, layer kinds), so
the engines can speak only of sites: resid_pre, resid_post, attn_out, mlp_out,
head_out, attn_pattern. nnterp's names are accepted as aliases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from explorer.core.errors import ExplorerInputError

SITES = ("resid_pre", "head_out", "attn_out", "attn_pattern", "mlp_out", "resid_post")
# Order in which a layer computes its sites; nnsight needs interventions in this order.
# "qkv" (a head's query/key/value projection output) is internal: path patching writes it.
SITE_ORDER = {name: i for i, name in enumerate(("resid_pre", "qkv", "head_out", "attn_out", "attn_pattern",
                                                "mlp_out", "resid_post"))}
SITE_ALIASES = {
    # nnterp / TransformerLens spellings
    "layers_input": "resid_pre", "hook_resid_pre": "resid_pre",
    "layers_output": "resid_post", "hook_resid_post": "resid_post",
    "attentions_output": "attn_out", "hook_attn_out": "attn_out",
    "mlps_output": "mlp_out", "hook_mlp_out": "mlp_out",
    "hook_z": "head_out", "z": "head_out", "attention_probabilities": "attn_pattern",
    "hook_pattern": "attn_pattern", "pattern": "attn_pattern",
}
SOFTMAX, LINEAR = "softmax_attention", "linear_attention"
# How users write a head: L3H1, 3.1 or LinL0H2 (lower-cased before matching).
HEAD_LABEL = re.compile(r"^(?:linl|l)?(\d+)\s*(?:h|\.)\s*(\d+)$")


def canonical_site(name: str) -> str:
    site = SITE_ALIASES.get(name, name)
    if site not in SITES:
        raise ExplorerInputError(f"Unknown site {name!r}. Sites: {', '.join(SITES)}.")
    return site


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # path from the top module to the ModuleList of decoder layers
    embed: str
    final_norm: str
    unembed: str
    attn: str  # paths below here are relative to one decoder layer
    o_proj: str
    mlp: str
    norm_kind: str = "rmsnorm"  # or "layernorm"
    norm_weight_offset: float = 0.0  # Gemma / Qwen3.5 norms multiply by (1 + weight)
    pos_embed: str | None = None
    linear_attn: str | None = None  # hybrid models: the linear-attention mixer
    linear_o_proj: str | None = None
    attn_post_norm: str | None = None  # Gemma: norm applied to attn_out before the residual add
    mlp_post_norm: str | None = None


_LLAMA_LIKE = dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
                   unembed="lm_head", attn="self_attn", o_proj="self_attn.o_proj", mlp="mlp")

FAMILIES = (
    Family("gpt2", ("gpt2",), layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
           final_norm="transformer.ln_f", unembed="lm_head", attn="attn", o_proj="attn.c_proj", mlp="mlp",
           norm_kind="layernorm"),
    Family("gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", embed="gpt_neox.embed_in",
           final_norm="gpt_neox.final_layer_norm", unembed="lm_head", attn="attention",
           o_proj="attention.dense", mlp="mlp", norm_kind="layernorm"),
    Family("llama", ("llama",), **_LLAMA_LIKE),
    Family("mistral", ("mistral",), **_LLAMA_LIKE),
    Family("qwen2", ("qwen2",), **_LLAMA_LIKE),
    Family("qwen3", ("qwen3",), **_LLAMA_LIKE),
    Family("gemma2", ("gemma2",), **_LLAMA_LIKE, norm_weight_offset=1.0,
           attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm"),
    Family("gemma3", ("gemma3", "gemma3_text"), **_LLAMA_LIKE, norm_weight_offset=1.0,
           attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm"),
    Family("qwen3_5", ("qwen3_5", "qwen3_5_text", "qwen3_next"), **_LLAMA_LIKE, norm_weight_offset=1.0,
           linear_attn="linear_attn", linear_o_proj="linear_attn.out_proj"),
)
SUPPORTED = ", ".join(f.name for f in FAMILIES)


def get_path(root, path: str):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@dataclass(frozen=True)
class LayerInfo:
    index: int
    kind: str  # SOFTMAX or LINEAR
    n_heads: int
    head_dim: int


@dataclass(frozen=True)
class Architecture:
    """A family plus the numbers read from one model's config."""

    family: Family
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    layers_info: tuple[LayerInfo, ...]
    max_positions: int | None = None  # the context the model was built (and trained) for

    @property
    def name(self) -> str:
        return self.family.name

    def layer_kind(self, layer: int) -> str:
        return self.layers_info[layer].kind

    def heads_in(self, layer: int) -> int:
        return self.layers_info[layer].n_heads

    # --- validation, with messages a user can act on ---
    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ExplorerInputError(f"Layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}.")
        return layer

    def check_head(self, layer: int, head: int) -> None:
        self.check_layer(layer)
        n = self.heads_in(layer)
        if not isinstance(head, int) or not 0 <= head < n:
            raise ExplorerInputError(f"Head {head} is out of range for layer {layer}: it has heads 0..{n - 1}.")

    def check_softmax(self, layer: int, what: str) -> None:
        if self.layer_kind(layer) != SOFTMAX:
            raise ExplorerInputError(
                f"{what} needs a softmax attention layer, but layer {layer} is {self.layer_kind(layer).replace('_', ' ')} "
                "(Gated DeltaNet): it has no attention pattern. Pick a full-attention layer: "
                + ", ".join(str(i.index) for i in self.layers_info if i.kind == SOFTMAX) + "."
            )

    def check_prompt_length(self, n_tokens: int, which: str) -> None:
        if self.max_positions is not None and n_tokens > self.max_positions:
            raise ExplorerInputError(
                f"The {which} prompt is {n_tokens} tokens, longer than this model's context of "
                f"{self.max_positions} positions: shorten it.")

    def head_label(self, layer: int, head: int) -> str:
        prefix = "L" if self.layer_kind(layer) == SOFTMAX else "LinL"
        return f"{prefix}{layer}H{head}"

    def layers_table(self):
        import pandas as pd
        return pd.DataFrame([vars(i) for i in self.layers_info])


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise ExplorerInputError(
        f"Model family {model_type!r} is not supported yet: Circuit Explorer needs an adapter naming its "
        f"decoder layers, attention output projection, MLP, final norm and unembedding. Supported: {SUPPORTED}."
    )


def _text_config(config):
    # Multimodal wrappers (Gemma 3, Qwen3.5) keep the language model's numbers in text_config.
    return getattr(config, "text_config", None) or config


def architecture_for(config) -> Architecture:
    cfg = _text_config(config)
    fam = family_for(getattr(cfg, "model_type", None) or getattr(config, "model_type", ""))
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
    layer_types = getattr(cfg, "layer_types", None) if fam.linear_attn else None
    infos = []
    for i in range(n_layers):
        if layer_types is not None and layer_types[i] == "linear_attention":
            infos.append(LayerInfo(i, LINEAR, cfg.linear_num_value_heads, cfg.linear_value_head_dim))
        else:
            infos.append(LayerInfo(i, SOFTMAX, n_heads, head_dim))
    vocab = getattr(cfg, "vocab_size")
    max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return Architecture(fam, n_layers, d_model, n_heads, n_kv, head_dim, vocab, tuple(infos), max_positions)


class Sites:
    """Module access for one architecture, on a torch model or an nnsight envoy (same paths)."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        self.fam = arch.family

    def layer(self, root, layer: int):
        return get_path(root, self.fam.layers)[layer]

    def mixer(self, root, layer: int):
        """The attention (or linear-attention) module of a layer."""
        path = self.fam.linear_attn if self.arch.layer_kind(layer) == LINEAR else self.fam.attn
        return get_path(self.layer(root, layer), path)

    def o_proj(self, root, layer: int):
        path = self.fam.linear_o_proj if self.arch.layer_kind(layer) == LINEAR else self.fam.o_proj
        return get_path(self.layer(root, layer), path)

    def input_norm(self, root, layer: int):
        layer_mod = self.layer(root, layer)
        for name in ("input_layernorm", "ln_1"):
            if hasattr(layer_mod, name):
                return getattr(layer_mod, name)
        raise ExplorerInputError(f"No input norm found for layer {layer} of {self.fam.name}.")

    def qkv_slot(self, layer: int, head: int, which: str) -> tuple[str, int, int]:
        """Where head `head`'s query/key/value lives: (projection path below the layer, number of
        d_head chunks in that projection's output, chunk index). GQA: k and v are the shared kv head."""
        arch, fam = self.arch, self.fam.name
        arch.check_head(layer, head)
        arch.check_softmax(layer, "Path patching into a head's query/key/value")
        if which not in ("q", "k", "v"):
            raise ExplorerInputError(f"Receiver input must be q, k or v, not {which!r}.")
        H, kv = arch.n_heads, head // (arch.n_heads // arch.n_kv_heads)
        if fam == "gpt2":
            return "attn.c_attn", 3 * H, {"q": 0, "k": H, "v": 2 * H}[which] + head
        if fam == "gpt_neox":
            return "attention.query_key_value", 3 * H, head * 3 + {"q": 0, "k": 1, "v": 2}[which]
        if which == "q":
            gated = fam == "qwen3_5"  # [query | gate] per head
            return "self_attn.q_proj", 2 * H if gated else H, 2 * head if gated else head
        return f"self_attn.{which}_proj", arch.n_kv_heads, kv

    def mlp(self, root, layer: int):
        return get_path(self.layer(root, layer), self.fam.mlp)

    def embed(self, root):
        return get_path(root, self.fam.embed)

    def final_norm(self, root):
        return get_path(root, self.fam.final_norm)

    def unembed(self, root):
        return get_path(root, self.fam.unembed)
