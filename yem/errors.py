"""The errors yem reports to people: one line that says where, what, and what to do."""


class YemError(Exception):
    """A problem the user can fix. The message reads `<where>: <what is wrong> (got X). <what to do>.`"""


class ParamsError(YemError):
    """params.yaml is invalid; every problem found is listed, one per line."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  {path} {problem}" for problem in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) with the params:\n{lines}")


class DataError(YemError):
    """An input image, caption or folder cannot be used."""


class ModelError(YemError):
    """The base model cannot be found or is not an SD3 pipeline."""


class CacheError(YemError):
    """A cached tensor file is missing, stale or unreadable."""


class WriteError(YemError):
    """An output cannot be written (full disk, read-only folder); the previous version is kept."""


class HardwareError(YemError):
    """The device cannot run the requested work (memory, precision, backend)."""


class TrainingStopped(YemError):
    """Training stopped early on purpose (signal, heat); rerunning resumes from the last checkpoint."""
