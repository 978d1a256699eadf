"""Sparse autoencoders in SAELens' on-disk format: read, written, and mapped onto this project's sites.

A folder holds `cfg.json` and `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in], plus threshold [d_sae] for JumpReLU) and optionally `sparsity.safetensors` (key `sparsity`: log10
firing frequency per latent). Architectures standard (ReLU), topk and jumprelu (BatchTopK saves as jumprelu) are
read; so is the flat config SAELens wrote before version 6. Loading is kept apart from the maths: `load_sae`
checks everything a user can get wrong and says what to change, `SAE` only encodes and decodes.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from explorer.core.adapters import SITE_ALIASES, SITES
from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import HOST, REPO_ROOT, to_host, to_model

CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
SAE_LENS_FORMAT_VERSION = "6.54.12"  # what we write as metadata.sae_lens_version: >= 6 means "not the flat format"
ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALISATIONS = ("none", "expected_average_only_in")
# SAELens names we know but do not implement: refused by name instead of read wrongly.
KNOWN_UNSUPPORTED = {
    "gated": "gated SAEs (a separate gate encoder)", "matryoshka_batchtopk": "Matryoshka BatchTopK (training-only)",
    "batchtopk": "BatchTopK during training (SAELens saves the inference form as jumprelu)",
    "transcoder": "transcoders (input and output sites differ)", "skip_transcoder": "skip transcoders",
    "jumprelu_transcoder": "JumpReLU transcoders", "temporal": "temporal SAEs",
    "matching_pursuit": "matching pursuit SAEs",
    "abstopk": "AbsTopK SAEs (negative activations)",
}
SPLICEABLE_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
# TransformerLens hook suffixes -> our sites. resid_mid (between attention and MLP) has no site in the engine.
_TL_HOOKS = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
             "hook_mlp_out": "mlp_out", "hook_resid_mid": "resid_mid"}
_HF_SUBMODULES = {"": "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
                  "attention": "attn_out", "linear_attn": "attn_out"}


def hook_to_site(hook_name: str) -> tuple[str, int]:
    """(site, layer) for a hook name in any of the three spellings:
    TransformerLens `blocks.14.hook_resid_post`, a Hugging Face module path `model.layers.14` (the module's output;
    `.mlp` and `.self_attn` below it give mlp_out and attn_out) and ours, `resid_post.14` or `resid_post:14`."""
    name = (hook_name or "").strip()
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", name)
    if m and m.group(2) in _TL_HOOKS:
        return _usable(_TL_HOOKS[m.group(2)], int(m.group(1)), name)
    if m and m.group(2) == "hook_z" or name.endswith("attn.hook_z"):
        raise ExplorerInputError(f"Hook {name!r} is an attention head output (hook_z); SAEs on head outputs are not "
                                 "supported yet: use an SAE on resid_pre, resid_post, attn_out or mlp_out.")
    m = re.fullmatch(r"(?:[\w.]*\.)?(?:layers|h)\.(\d+)(?:\.(\w+))?", name)
    if m and (m.group(2) or "") in _HF_SUBMODULES:
        return _usable(_HF_SUBMODULES[m.group(2) or ""], int(m.group(1)), name)
    m = re.fullmatch(r"(?:blocks\.(\d+)\.)?([a-z_]+)(?:[.:](\d+))?", name)
    if m and (m.group(1) is None) != (m.group(3) is None):
        site = SITE_ALIASES.get(m.group(2), m.group(2))
        if site in SITES:
            return _usable(site, int(m.group(1) or m.group(3)), name)
    raise ExplorerInputError(
        f"Hook name {name!r} names no site. Use blocks.L.hook_resid_post (or hook_resid_pre, hook_attn_out, "
        "hook_mlp_out), a module path like model.layers.L, or resid_post.L.")


def _usable(site: str, layer: int, name: str) -> tuple[str, int]:
    if site == "resid_mid":
        raise ExplorerInputError(f"Hook {name!r} is resid_mid (between attention and MLP), which the engine cannot "
                                 "read or write yet: use an SAE on resid_pre, resid_post, attn_out or mlp_out.")
    if site not in SPLICEABLE_SITES:
        raise ExplorerInputError(f"Hook {name!r} maps to site {site!r}; an SAE needs one of "
                                 f"{', '.join(SPLICEABLE_SITES)}.")
    return site, layer


OUTLIER_RATIO = 10.0  # a position whose activation norm is this many times the prompt's median is an outlier


def spliced_positions(act: torch.Tensor) -> torch.Tensor:
    """Which positions an SAE reads and writes: [..., pos] bool for act [..., pos, d]. Not position 0 (BOS, or the
    attention sink of a model without one) and not the rare later positions where a model parks another massive
    activation (norm > OUTLIER_RATIO x the median of positions >= 1; SmolLM2 does this after a window that starts
    on a weak token, at ~150x the usual norm). Left in, a handful of them dominate any squared error."""
    norm = act.norm(dim=-1)
    keep = torch.ones_like(norm, dtype=torch.bool)
    keep[..., 0] = False
    if norm.shape[-1] > 1:
        median = norm[..., 1:].median(dim=-1, keepdim=True).values
        keep &= norm <= OUTLIER_RATIO * median
    return keep


def site_hook_name(site: str, layer: int) -> str:
    """The TransformerLens spelling we write into cfg.json (SAELens tools read it)."""
    return f"blocks.{layer}.hook_{site}"


@dataclass(frozen=True)
class SAEConfig:
    """What cfg.json says, normalised. `metadata` keeps every other metadata key so a save round-trips it."""

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    model_name: str = ""
    context_size: int | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def site(self) -> tuple[str, int]:
        return hook_to_site(self.hook_name)

    def to_dict(self) -> dict:
        """cfg.json as SAELens 6 writes it. dtype is what SAELens computes in; the file may hold float16."""
        meta = {**self.metadata, "sae_lens_version": SAE_LENS_FORMAT_VERSION, "hook_name": self.hook_name,
                "model_name": self.model_name, "context_size": self.context_size}
        meta.setdefault("sae_lens_training_version", None)
        out = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize_activations, "reshape_activations": "none", "metadata": meta}
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return out

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "cfg.json") -> "SAEConfig":
        """Read a SAELens 6 config or the older flat one (metadata at the top level, `hook_point`,
        `activation_fn_str`, a boolean normalize_activations)."""
        if not isinstance(cfg, dict):
            raise ExplorerInputError(f"{where} must hold a JSON object.")
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else None
        version = (meta or {}).get("sae_lens_version") or cfg.get("sae_lens_version")
        flat = meta is None or not _at_least_6(version)
        if flat:  # the pre-6 layout: everything at the top level
            meta = {k: v for k, v in cfg.items() if k not in ("metadata",)}
            meta.update(cfg.get("metadata") or {})
            meta.setdefault("hook_name", cfg.get("hook_name") or cfg.get("hook_point"))
        arch = cfg.get("architecture")
        act_fn = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if arch is None:
            arch = "topk" if act_fn == "topk" else "standard"
        if arch in KNOWN_UNSUPPORTED:
            raise ExplorerInputError(f"{where}: architecture {arch!r} ({KNOWN_UNSUPPORTED[arch]}) is not supported; "
                                     f"supported: {', '.join(ARCHITECTURES)}.")
        if arch not in ARCHITECTURES:
            raise ExplorerInputError(f"{where}: unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}.")
        if arch == "standard" and act_fn not in ("relu", None):
            raise ExplorerInputError(f"{where}: activation function {act_fn!r} is not supported for a standard SAE "
                                     "(only relu).")
        norm = cfg.get("normalize_activations", "none")
        norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
        if norm not in NORMALISATIONS:
            raise ExplorerInputError(f"{where}: normalize_activations {norm!r} is not supported; supported: "
                                     f"{', '.join(NORMALISATIONS)}.")
        if cfg.get("reshape_activations", "none") not in ("none", None):
            raise ExplorerInputError(f"{where}: reshape_activations {cfg['reshape_activations']!r} (head outputs) "
                                     "is not supported; use an SAE on a residual, attention or MLP output.")
        k = cfg.get("k", kwargs.get("k"))
        if arch == "topk" and not (isinstance(k, int) and k > 0):
            raise ExplorerInputError(f"{where}: a topk SAE needs a positive integer k, got {k!r}.")
        for key in ("d_in", "d_sae"):
            if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                raise ExplorerInputError(f"{where}: {key} must be a positive integer, got {cfg.get(key)!r}.")
        hook = meta.get("hook_name")
        if not hook:
            raise ExplorerInputError(f"{where} names no hook (metadata.hook_name): the SAE's site is unknown.")
        known = {"sae_lens_version", "hook_name", "model_name", "context_size"}
        return cls(architecture=arch, d_in=cfg["d_in"], d_sae=cfg["d_sae"], hook_name=str(hook),
                   k=k if arch == "topk" else None, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                   normalize_activations=norm,
                   rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
                   model_name=str(meta.get("model_name") or ""), context_size=meta.get("context_size"),
                   metadata={} if flat else {k: v for k, v in meta.items() if k not in known})


def _at_least_6(version) -> bool:
    m = re.match(r"(\d+)", str(version or ""))
    return bool(m) and int(m.group(1)) >= 6


class Placement:
    """What runtime.to_model needs to put a tensor where an SAE computes: a device and a dtype."""

    def __init__(self, device):
        self.device = device
        self.torch_model = self  # to_model reads lm.torch_model.dtype
        self.dtype = torch.float32


class SAE(torch.nn.Module):
    """encode: x [..., d_in] -> latents [..., d_sae]; decode: latents -> reconstruction [..., d_in].

    Parameters are float32 on `device` whatever the file held; inputs are cast to float32 there (so a
    half-precision model's activations are encoded in full precision). Outputs stay on the SAE's device.
    """

    def __init__(self, cfg: SAEConfig, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                 b_dec: torch.Tensor, threshold: torch.Tensor | None = None, sparsity: torch.Tensor | None = None,
                 folder: Path | None = None, device: str = "cpu"):
        super().__init__()
        self.cfg = cfg
        where = Placement(device)
        p = lambda t: torch.nn.Parameter(to_model(where, t.detach().float()).clone(), requires_grad=False)  # noqa
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = p(W_enc), p(b_enc), p(W_dec), p(b_dec)
        self.threshold = p(threshold) if threshold is not None else None
        self.sparsity = sparsity  # log10 firing frequency [d_sae], CPU, or None
        self.folder = folder

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """x on the SAE's device in float32."""
        return to_model(Placement(self.device), x, torch.float32)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., d_sae]
        x = self.place(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "topk":
            values, index = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, index, values.relu())
        if self.cfg.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decoder_rows(self) -> torch.Tensor:
        """[d_sae, d_in]: what one unit of each latent adds to the reconstruction."""
        if self.cfg.rescale_acts_by_decoder_norm:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        return self.W_dec

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # [..., d_sae] -> [..., d_in]
        return self.place(latents) @ self.decoder_rows() + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def check_latent(self, latent: int) -> int:
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < self.d_sae:
            raise ExplorerInputError(f"Latent {latent} is out of range: this SAE has latents 0..{self.d_sae - 1}.")
        return latent

    def state(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return {k: v.detach() for k, v in out.items()}

    @property
    def identity(self) -> str:
        """A hash of config and weights, for cache keys."""
        digest = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True, default=str).encode())
        for name, t in sorted(self.state().items()):
            digest.update(name.encode())
            digest.update(t.to(HOST).contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]

    def describe(self) -> dict:
        site, layer = self.cfg.site
        return {"folder": None if self.folder is None else str(self.folder), "architecture": self.cfg.architecture,
                "d_in": self.cfg.d_in, "d_sae": self.d_sae, "k": self.cfg.k, "hook_name": self.cfg.hook_name,
                "site": site, "layer": layer, "model_name": self.cfg.model_name}


SHIPPED_DIR = REPO_ROOT / "explorer" / "sources" / "saes"


def shipped_saes(model_name: str | None = None) -> list[dict]:
    """The SAEs that ship with the app (name, folder, hook, d_sae, k, the model they were trained for), all or those
    for one model ('demo', 'smollm2')."""
    out = []
    for cfg_path in sorted(SHIPPED_DIR.glob(f"*/{CFG_FILE}")):
        try:
            cfg = SAEConfig.from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
        except (ExplorerInputError, ValueError):
            continue
        if model_name is not None and cfg.model_name != model_name:
            continue
        out.append({"name": cfg_path.parent.name, "folder": str(cfg_path.parent), "hook_name": cfg.hook_name,
                    "model_name": cfg.model_name, "d_sae": cfg.d_sae, "k": cfg.k})
    return out


def resolve_sae(name_or_folder, device: str = "cpu") -> "SAE":
    """load_sae for a folder, or for the name of a shipped SAE (explorer/sources/saes/<name>)."""
    text = str(name_or_folder)
    if "/" not in text and "\\" not in text and (SHIPPED_DIR / text / CFG_FILE).is_file():
        return load_sae(SHIPPED_DIR / text, device)
    if not Path(text).expanduser().exists() and "/" not in text:
        names = ", ".join(s["name"] for s in shipped_saes()) or "none"
        raise ExplorerInputError(f"No SAE named {text!r}: give a SAELens folder or a shipped SAE ({names}).")
    return load_sae(text, device)


def load_sae(folder, device: str = "cpu", hook_name: str | None = None) -> SAE:
    """Read a SAELens folder. Every problem a user can cause is one ExplorerInputError saying what to change.
    hook_name overrides the config's (for an SAE whose hook names no site we know)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ExplorerInputError(f"SAE folder {str(folder)!r} does not exist or is not a folder.")
    cfg_path, weights = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ExplorerInputError(f"SAE folder {str(folder)!r} has no {CFG_FILE}: it is not a SAELens folder.")
    if not weights.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        if pickled:
            raise ExplorerInputError(f"SAE folder {str(folder)!r} holds {', '.join(pickled)} but no {WEIGHTS_FILE}: "
                                     "pickled weights are never loaded (they can run code); save them as safetensors.")
        raise ExplorerInputError(f"SAE folder {str(folder)!r} has no {WEIGHTS_FILE}.")
    try:
        raw = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExplorerInputError(f"{cfg_path} is not valid JSON ({str(exc)[:120]}).") from None
    cfg = SAEConfig.from_dict(raw, str(cfg_path))
    if hook_name is not None:
        cfg = replace(cfg, hook_name=hook_name)
    cfg.site  # noqa: B018 - raises a clear message for a hook we cannot map
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ExplorerInputError(f"{weights} is not a readable safetensors file ({str(exc)[:120]}).") from None
    norm_factor = raw.get("norm_scaling_factor", (raw.get("metadata") or {}).get("norm_scaling_factor"))
    sae = _from_state(cfg, state, str(weights), norm_factor, device)
    sparsity_path = path / SPARSITY_FILE
    if sparsity_path.is_file():
        try:
            sparsity = load_file(str(sparsity_path)).get("sparsity")
        except (SafetensorError, OSError, ValueError, RuntimeError):
            raise ExplorerInputError(f"{sparsity_path} is not a readable safetensors file.") from None
        if sparsity is not None and tuple(sparsity.shape) == (cfg.d_sae,):
            sae.sparsity = to_host(sparsity)
    sae.folder = path
    return sae


def _from_state(cfg: SAEConfig, state: dict, where: str, norm_factor=None, device: str = "cpu") -> SAE:
    if "log_threshold" in state and "threshold" not in state:  # older JumpReLU checkpoints
        state["threshold"] = state.pop("log_threshold").exp()
    if "scaling_factor" in state:  # an old fine-tuning scale: all ones means none
        if not torch.allclose(state["scaling_factor"].float(), torch.ones(1, device=HOST)):
            raise ExplorerInputError(f"{where}: a finetuning scaling_factor other than 1 is not supported.")
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    for name, shape in shapes.items():
        if name not in state:
            raise ExplorerInputError(f"{where} has no tensor {name!r} (a {cfg.architecture} SAE needs "
                                     f"{', '.join(shapes)}).")
        if tuple(state[name].shape) != shape:
            raise ExplorerInputError(f"{where}: {name} has shape {list(state[name].shape)} but cfg.json (d_in {d_in}, "
                                     f"d_sae {d_sae}) needs {list(shape)}.")
        if not state[name].is_floating_point() or not torch.isfinite(state[name].float()).all():
            raise ExplorerInputError(f"{where}: {name} holds NaN or infinite values (or is not floating point); "
                                     "the SAE's weights are broken.")
    W_enc, W_dec, b_dec = state["W_enc"].float(), state["W_dec"].float(), state["b_dec"].float()
    if cfg.normalize_activations == "expected_average_only_in" and norm_factor:
        # x is scaled by the factor before encoding and divided by it after decoding: fold both into the weights.
        s = float(norm_factor)
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    # Without a stored factor, SAELens' load_from_disk computes on raw activations too (the factor is folded in
    # when it saves), so we match it.
    return SAE(replace(cfg, normalize_activations="none"), W_enc, state["b_enc"], W_dec, b_dec, state.get("threshold"),
               device=device)


def save_sae(sae: SAE, folder, dtype: str = "float32", sparsity: torch.Tensor | None = None) -> Path:
    """Write the SAELens folder (cfg.json, sae_weights.safetensors in `dtype`, sparsity.safetensors if given)."""
    from safetensors.torch import save_file

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ExplorerInputError(f"SAE weights can be saved as float32, float16 or bfloat16, not {dtype!r}.")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tensors = {k: v.detach().to(HOST, torch_dtype).contiguous() for k, v in sae.state().items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CFG_FILE).write_text(json.dumps(sae.cfg.to_dict(), indent=1))
    sparsity = sparsity if sparsity is not None else sae.sparsity
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().to(HOST, torch.float32).contiguous()}, str(path / SPARSITY_FILE))
    sae.folder = path
    return path


def log10_frequency(counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """What sparsity.safetensors stores: log10 of each latent's firing frequency (-inf-free: 1e-10 floor)."""
    return torch.log10(counts.float() / max(n_tokens, 1) + 1e-10)


def check_fits(sae: SAE, lm) -> list[str]:
    """Refuse an SAE that cannot sit at its site in this model; return warnings for softer mismatches."""
    site, layer = sae.cfg.site
    if not 0 <= layer < lm.arch.n_layers:
        raise ExplorerInputError(f"The SAE's hook {sae.cfg.hook_name!r} is at layer {layer}, but this model has "
                                 f"layers 0..{lm.arch.n_layers - 1}: it was trained for another model.")
    if sae.cfg.d_in != lm.arch.d_model:
        named = f" (made for {sae.cfg.model_name!r})" if sae.cfg.model_name else ""
        raise ExplorerInputError(f"The SAE's d_in is {sae.cfg.d_in}{named}, but {site} at layer {layer} of "
                                 f"{lm.model_id!r} has {lm.arch.d_model} dimensions: load an SAE made for this model.")
    warnings = []
    ours = sae.cfg.metadata.get("model_weight_hash")
    if ours and ours != lm.weight_hash:
        warnings.append(f"The SAE was trained on weights {ours[:12]}…, not these ({lm.weight_hash[:12]}…): its "
                        "latents may not mean the same here.")
    elif sae.cfg.model_name and sae.cfg.model_name not in (lm.model_id, Path(lm.model_id).name) and not ours:
        warnings.append(f"The SAE names model {sae.cfg.model_name!r}; this is {lm.model_id!r}.")
    return warnings


def random_sae(cfg: SAEConfig, seed: int = 0, threshold: float = 0.0) -> SAE:
    """A random SAE for tests and as a trainer's starting point: decoder rows of unit norm, W_enc = W_dec^T."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen, device=HOST)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    b_enc = torch.randn(cfg.d_sae, generator=gen, device=HOST) * 0.1
    b_dec = torch.randn(cfg.d_in, generator=gen, device=HOST) * 0.1
    thr = torch.full((cfg.d_sae,), float(threshold), device=HOST) if cfg.architecture == "jumprelu" else None
    return SAE(cfg, W_dec.T.contiguous(), b_enc, W_dec, b_dec, thr)
