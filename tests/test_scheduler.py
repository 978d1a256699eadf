"""The pass scheduler's calibration and memory budget (its numbers are checked in test_patching.py)."""
import json
import re

import pytest
import torch

from explorer.core import calibration
from explorer.core.runtime import strict_float32


def test_pass_costs_are_measured_once_per_device_and_shape_and_kept_on_disk(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUIT_EXPLORER_CACHE", str(tmp_path))
    monkeypatch.setenv("CIRCUIT_EXPLORER_PASS_COSTS", "measure")
    calibration.clear()
    lm = tiny_model("llama")
    calls = lm.forward_calls
    costs = calibration.pass_costs(lm)
    assert costs.source == "measured" and costs.probe_s > 0
    assert costs.overhead_s > 0 and costs.flops_per_s > 0 and costs.small_batch_tokens >= 0
    assert lm.forward_calls == calls  # probe passes are not counted as an experiment's
    files = list((tmp_path / "calibration").iterdir())
    assert len(files) == 1 and re.fullmatch(r"[0-9a-f]{64}\.json", files[0].name)
    assert json.loads(files[0].read_text())["flops_per_s"] == costs.flops_per_s

    def no_probe(lm):
        raise AssertionError("measured twice")
    monkeypatch.setattr(calibration, "measure", no_probe)
    assert calibration.pass_costs(lm) is costs  # memory
    calibration.clear()
    from_disk = calibration.pass_costs(lm)  # a new process: the file
    assert from_disk.source == "disk" and from_disk.overhead_s == costs.overhead_s
    other_shape = tiny_model("gpt2")
    assert calibration.calibration_key(other_shape) != calibration.calibration_key(lm)
    monkeypatch.setenv("CIRCUIT_EXPLORER_PASS_COSTS", "constants")
    assert calibration.pass_costs(lm) == calibration.CPU_CONSTANTS
    calibration.clear()


def test_tf32_is_turned_off_for_float32_on_cuda(monkeypatch):
    """TF32 rounds float32 matmul inputs to 10 bits of mantissa; recoveries drifted by 2.6e-4."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        strict_float32("cpu")
        assert torch.get_float32_matmul_precision() == "high"  # nothing to do off CUDA
        monkeypatch.setenv("CIRCUIT_EXPLORER_ALLOW_TF32", "1")
        strict_float32("cuda:0")
        assert torch.get_float32_matmul_precision() == "high"  # the user's explicit choice stands
        monkeypatch.delenv("CIRCUIT_EXPLORER_ALLOW_TF32")
        strict_float32("cuda:0")
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
