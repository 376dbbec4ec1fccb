"""Mean ± standard deviation over runs (seeds), the one convention of the tables written by tools/."""
import math
import statistics
from typing import Iterable, Optional, Tuple


def mean_std(values: Iterable[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n − 1) of the finite values among ``values``.

    A single value has no standard deviation: ``(value, None)``. No finite value: ``(None, None)``.
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    if len(finite) == 1:
        return finite[0], None
    return statistics.mean(finite), statistics.stdev(finite)


def format_mean_std(mean: Optional[float], std: Optional[float], digits: int = 1,
                    scale: float = 1.0, missing: str = '–') -> str:
    """``'mean ± std'`` with ``digits`` decimals after multiplying by ``scale``.

    A single run (``std`` None) shows its value alone; no run (``mean`` None) shows ``missing``.
    """
    if mean is None:
        return missing
    if std is None:
        return f'{scale * mean:.{digits}f}'
    return f'{scale * mean:.{digits}f} ± {scale * std:.{digits}f}'
