"""recipe.main's data-file check: bad files are refused before Ray starts, naming the key,
the file and the field."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from recipe.config import ConfigError
from recipe.main import ENGINE_WARNINGS, check_data_files, quiet_engine_warnings


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _row(truth="4"):
    return {"data_source": "toy", "prompt": [{"role": "user", "content": "2+2?"}],
            "reward_model": {"style": "rule", "ground_truth": truth}}


def _cfg(train, val=None):
    return OmegaConf.create({"data": {"train_files": str(train), "val_files": str(val or train)}})


def test_good_files_pass(tmp_path):
    check_data_files(_cfg(_write(tmp_path / "t.parquet", [_row(), _row("5")])))


def test_not_parquet_names_key_and_file(tmp_path):
    bad = tmp_path / "train.parquet"
    bad.write_text("question,answer\n1+1,2\n")
    with pytest.raises(ConfigError, match=rf"^data\.train_files: {bad}: not a readable parquet file"):
        check_data_files(_cfg(bad, _write(tmp_path / "v.parquet", [_row()])))


def test_missing_column_and_missing_truth(tmp_path):
    good = _write(tmp_path / "good.parquet", [_row()])
    no_source = _write(tmp_path / "nosrc.parquet", [{k: v for k, v in _row().items() if k != "data_source"}])
    with pytest.raises(ConfigError, match=r"^data\.val_files: .*nosrc\.parquet: missing required column\(s\): "
                                          r"data_source"):
        check_data_files(_cfg(good, no_source))
    no_truth = _write(tmp_path / "notruth.parquet", [_row(), _row(None)])
    with pytest.raises(ConfigError, match=r"notruth\.parquet: row 1: missing field reward_model\.ground_truth"):
        check_data_files(_cfg(no_truth))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.train_files: .*absent\.parquet: no such file"):
        check_data_files(_cfg(tmp_path / "absent.parquet"))


def test_engine_warnings_filtered_for_workers(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "default::DeprecationWarning")
    cfg = OmegaConf.create({"ray_kwargs": {"ray_init": {}}})
    quiet_engine_warnings(cfg)
    quiet_engine_warnings(cfg)  # idempotent
    value = cfg.ray_kwargs.ray_init.runtime_env.env_vars.PYTHONWARNINGS
    assert value == f"default::DeprecationWarning,{ENGINE_WARNINGS}"


def test_join_existing_cluster(monkeypatch):
    from omegaconf import OmegaConf

    from recipe.main import join_existing_cluster

    def cfg(**ray_init):
        return OmegaConf.create({"ray_kwargs": {"ray_init": {"num_cpus": 8, "num_gpus": 2, **ray_init}}})

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/x/plugins")
    c = cfg()
    assert join_existing_cluster(c) is None and c.ray_kwargs.ray_init.num_cpus == 8
    c = cfg(address="local")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert join_existing_cluster(c) is None, "address=local: verl starts its own Ray"
    c = cfg()
    assert join_existing_cluster(c) == "10.0.0.1:6379"
    ri = c.ray_kwargs.ray_init
    assert ri.address == "10.0.0.1:6379" and ri.num_cpus is None and ri.num_gpus is None
    assert ri.runtime_env.env_vars.PYTHONPATH == "/x/plugins"
    c = cfg(address="10.0.0.2:6379")
    assert join_existing_cluster(c) == "10.0.0.2:6379", "the config's address wins over RAY_ADDRESS"
