"""Records the MLIR kernel launches a test's steps make."""


class Launches:
    """Wraps ``module.launch`` (mlir_jit or mlir_steps, whichever calls it) for one test: (count, pieces)
    per launch in ``launches``, its arguments after lo/hi in ``arguments``."""

    def __init__(self, monkeypatch, module):
        self.launches: list[tuple[int, int]] = []
        self.arguments: list[list] = []
        original = module.launch

        def recorded(team, count, args, split=1):
            self.launches.append((count, split))
            self.arguments.append(list(args))
            original(team, count, args, split)

        monkeypatch.setattr(module, "launch", recorded)
