"""The metric formulas of DESIGN.md, in one place, with the text the UI shows beside them."""
from __future__ import annotations

import torch

LD_FORMULA = "LD = logit[last, clean_answer] − logit[last, corrupted_answer]"
RECOVERY_FORMULA = "recovery = (LD_patched − LD_corr) / (LD_clean − LD_corr)"
DAMAGE_FORMULA = "damage = (LD_clean − LD_patched) / (LD_clean − LD_corr)"
SHIFT_FORMULA = "shift = LD_ablated(R) − LD(R), signed, against run R's own baseline"
RELATIVE_DROP_FORMULA = "relative drop = (LD_clean − LD_ablated) / LD_clean"


def logit_diff(logits: torch.Tensor, clean_answer_id: int, corrupted_answer_id: int) -> torch.Tensor:
    """logits [..., vocab] at the last position -> LD [...] (the vocabulary is the last axis).

    Every logit difference in explorer goes through here. When a pass returned only the two answers'
    logits (engine.PassOptions(answers=...)), the ids are 0 and 1."""
    return logits[..., clean_answer_id] - logits[..., corrupted_answer_id]


def patch_effect(ld_patched, ld_clean: float, ld_corrupted: float, direction: str):
    """Recovery (denoise) or damage (noise), both 0 = no effect and 1 = full effect."""
    span = ld_clean - ld_corrupted
    if direction == "denoise":
        return (ld_patched - ld_corrupted) / span
    return (ld_clean - ld_patched) / span


def metric_name(direction: str) -> str:
    return "recovery" if direction == "denoise" else "damage"


def metric_formula(direction: str) -> str:
    return RECOVERY_FORMULA if direction == "denoise" else DAMAGE_FORMULA
