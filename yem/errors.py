"""The errors yem reports to people: one line that says where, what, and what to do."""


class YemError(Exception):
    """A problem the user can fix. The message reads `<where>: <what is wrong> (got X). <what to do>.`"""


class ParamsError(YemError):
    """params.yaml is invalid; every problem found is listed, one per line."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        where = [f"{path}{problem}" if problem.startswith(":") else f"{path} {problem}" for problem in problems]
        if len(where) == 1:
            super().__init__(where[0])
        else:
            lines = "\n".join(f"  {line}" for line in where)
            super().__init__(f"{path}: {len(problems)} problems with the params:\n{lines}")


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


class StopRequested(TrainingStopped):
    """Someone asked the run to stop (Ctrl-C, kill, an IDE's stop button, a closed terminal) and it did, cleanly.

    Not a failure: the stage prints the message without "Error:" and exits with EXIT_STATUS, the status a shell
    gives a program stopped by SIGINT, so `yem train` knows the stage has already said how to resume."""

    EXIT_STATUS = 130
