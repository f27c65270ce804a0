"""Runtime: generated kernels behind the torch.optim.Optimizer API."""
