"""Shared argument checks of the hooks."""


def _reject_unknown(hook: str, unknown: dict, allowed: str) -> None:
    """A config typo (``burnin=3``) is an error that names it and lists what the hook accepts."""
    if unknown:
        raise TypeError(f'{hook} got unknown option(s) {sorted(unknown)}; allowed: {allowed}')
