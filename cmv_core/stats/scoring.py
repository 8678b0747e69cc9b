"""Scoring rules for a judge's verdicts on delta pairs: AUC (Mann-Whitney) and Brier score."""

from __future__ import annotations

from collections.abc import Sequence

from cmv_core.stats.resampling import mean_or_none


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney): P(positive > negative) + P(tie)/2."""
    if not positives or not negatives:
        return None
    import numpy as np

    pos = np.asarray(positives, dtype=float)[:, None]
    neg = np.asarray(negatives, dtype=float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def paired_auc(differences: Sequence[float]) -> float | None:
    """AUC of a score difference d = score(winner) - score(loser) with each pair seen in both
    orientations (d labelled 1, -d labelled 0): the order of the two replies carries no signal."""
    return auc(list(differences), [-d for d in differences])


def brier(p_true: Sequence[float]) -> float | None:
    """Mean of (1 - p)^2 where p is the probability given to what happened."""
    return mean_or_none([(1.0 - p) ** 2 for p in p_true]) if p_true else None
