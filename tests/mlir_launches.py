"""Records the MLIR kernel launches a test's steps make."""

from optgen.runtime import mlir_jit


class Launches:
    """Wraps ``mlir_jit.Launch.run`` (every launch of a plan) for one test: (count, pieces) per launch
    in ``launches``, its arguments after lo/hi in ``arguments`` (memrefs as (address, length))."""

    def __init__(self, monkeypatch):
        self.launches: list[tuple[int, int]] = []
        self.arguments: list[list] = []
        original = mlir_jit.Launch.run

        def recorded(launch, slots, values):
            self.launches.append((launch.count, launch.split))
            self.arguments.append([slots[a] if isinstance(a, mlir_jit.Slot) else a for a in launch.args] + list(values))
            original(launch, slots, values)

        monkeypatch.setattr(mlir_jit.Launch, "run", recorded)


def launches_before_each_run(monkeypatch) -> tuple[Launches, list[int]]:
    """The launches, and how many had run when each parameter's plan began its run."""
    counter, before = Launches(monkeypatch), []
    run = mlir_jit.LaunchPlan.run

    def recorded_run(self, *args):
        before.append(len(counter.launches))
        run(self, *args)

    monkeypatch.setattr(mlir_jit.LaunchPlan, "run", recorded_run)
    return counter, before
