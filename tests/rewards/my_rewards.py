"""A user's own reward module, as ``rewards.functions: {my_rewards.shorter: 0.5}`` names it (tests)."""


def shorter(completions, answer=None, **kwargs):
    return [1.0 / (1 + len(c)) if answer is not None else None for c in completions]
