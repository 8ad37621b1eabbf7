"""NoKernel, the one error a kernel entry point raises where no kernel exists by design (here,
below select.py and the Triton emitters, which both raise it; select.py re-exports it)."""


class NoKernel(NotImplementedError):
    """No generated kernel exists or can run for this format / input / device, by design
    (decided before anything is launched): the caller uses the reference."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
