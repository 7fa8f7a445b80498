"""GPU: ``python -m recipe.eval backend=vllm`` on a tiny model (skipped without CUDA and vllm).

The vLLM backend of recipe.eval cannot run on the CPU development machine; this is its
only test. Head size 64 (hidden 256, 4 heads) so vLLM's attention kernels accept it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipe import eval as ev

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None, reason="needs a CUDA GPU and vllm"
)


def test_eval_vllm_backend(tmp_path):
    from recipe.models import build_tiny_model

    model = build_tiny_model(tmp_path / "models" / "tiny256", hidden_size=256, num_heads=4, num_kv_heads=2,
                             intermediate_size=512, vocab_size=512, max_train_rows=200)
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.eval", f"model_path={model}", "backend=vllm", "benchmarks=[math500,gsm8k]",
         "k=4", "pass_k=[1,4]", "max_tokens=32", "max_problems=5", "vllm.gpu_memory_utilization=0.3",
         f"out_dir={out}", f"paths.artifacts={tmp_path}"],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in (out / ev.SAMPLES_FILE).read_text().splitlines()]
    assert len(lines) == 2 * 5 * 4
    assert all(1 <= r["response_tokens"] <= 32 and r["finish_reason"] in ("stop", "length") for r in lines)
    results = json.loads((out / ev.RESULTS_JSON).read_text())
    assert results["backend"] == "vllm"
    assert {"math500/avg@4", "gsm8k/pass@4", "average/avg@4"} <= set(results["metrics"])
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())
