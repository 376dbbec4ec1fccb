"""The category of the layers' warnings."""

__all__ = ['CBNWarning']


class CBNWarning(UserWarning):
    """A layer cannot do what it was configured for, or saw its model used in a way it cannot
    follow exactly (said once per layer and cause). A subclass of ``UserWarning``, so filters on
    that keep working; ``warnings.simplefilter('error', CBNWarning)`` turns them into errors."""
