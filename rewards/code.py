"""Code reward (placeholder until the sandbox lands)."""


def register() -> None:
    pass
