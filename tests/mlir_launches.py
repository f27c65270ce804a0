"""Records the MLIR kernel launches a test's steps make."""

from optgen.runtime import mlir_jit


class Launches:
    """Wraps ``mlir_jit.launch`` (every launch plan binds it) for one test: (count, pieces) per launch
    in ``launches``, its arguments after lo/hi in ``arguments``."""

    def __init__(self, monkeypatch):
        self.launches: list[tuple[int, int]] = []
        self.arguments: list[list] = []
        original = mlir_jit.launch

        def recorded(team, count, args, split=1):
            self.launches.append((count, split))
            self.arguments.append(list(args))
            original(team, count, args, split)

        monkeypatch.setattr(mlir_jit, "launch", recorded)


def launches_before_each_run(monkeypatch) -> tuple[Launches, list[int]]:
    """The launches, and how many had run when each parameter's plan began its run."""
    counter, before = Launches(monkeypatch), []
    run = mlir_jit.LaunchPlan.run

    def recorded_run(self, *args):
        before.append(len(counter.launches))
        run(self, *args)

    monkeypatch.setattr(mlir_jit.LaunchPlan, "run", recorded_run)
    return counter, before
