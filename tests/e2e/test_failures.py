"""Bad input fails before Ray starts, with exit status 2 and a message naming the key and file."""

from __future__ import annotations

import os
import subprocess
import time

from tests.e2e.test_main_job import ROOT


def test_non_parquet_train_file_fails_fast(tmp_path):
    bad = tmp_path / "train.parquet"
    bad.write_text("not parquet at all\n")
    start = time.time()
    proc = subprocess.run([str(ROOT / "run.sh"), f"data.train_files={bad}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RECIPE_ARTIFACTS": str(tmp_path / "a")})
    elapsed = time.time() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"data.train_files: {bad}: not a readable parquet file" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert elapsed < 120, elapsed  # config, data preparation of the val set, the check; no Ray, no workers
