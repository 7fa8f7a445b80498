"""verl's ``file`` metrics logger appends instead of truncating.

verl 0.9.1's ``FileLogger`` opens its JSONL file with mode ``"wb"``: a resumed run wipes
the metrics of the steps before the crash. The replacement resolves the path the same
way (``VERL_FILE_LOGGER_PATH``, else ``VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl``)
and opens it with ``"ab"``, so a resumed run continues the same file.
"""

from __future__ import annotations

import os

from ._util import rebind


def _appending(cls):
    class AppendingFileLogger(cls):
        """``FileLogger`` whose JSONL file is opened for appending."""

        def __init__(self, project_name: str, experiment_name: str):
            self.project_name = project_name
            self.experiment_name = experiment_name
            self.filepath = os.getenv("VERL_FILE_LOGGER_PATH", None)
            if self.filepath is None:
                root = os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", "."))
                self.filepath = os.path.join(root, project_name, f"{experiment_name}.jsonl")
            os.makedirs(os.path.dirname(os.path.abspath(self.filepath)), exist_ok=True)
            print(f"Appending metrics to {os.path.abspath(self.filepath)}")
            self.fp = open(self.filepath, "ab", buffering=0)

    AppendingFileLogger.__name__ = "FileLogger"
    return AppendingFileLogger


def apply() -> None:
    """Make ``verl.utils.tracking.FileLogger`` append (idempotent)."""
    rebind("verl.utils.tracking", "FileLogger", _appending)
