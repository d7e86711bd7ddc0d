"""Ranking a refined search's policies on one footing.

``search.refine`` fine-tunes a few frontier policies longer; the rest keep the scores of the
search's short fine-tune. Ranked side by side, the refined ones win because they were trained more,
not because they are better: the 5-seed benchmark's 2x search picked a refined ``uniform 0.75``
(55.7% -> 63.4%) over an unrefined ``uniform 0.5`` (60.3%), and ``uniform 0.5`` was the better model
after the real fine-tune. So a score is compared at the refinement's fidelity: measured on the refined
policies, and on the others the search's value plus the gain the refined pairs predict for it.

The gain is a straight line in the search's score, fitted to the refined pairs (``<score>_in_search``,
``<score>``) by least squares (the more a policy lost, the more a longer fine-tune gives back), and
held within the gains the pairs show: it never extrapolates past what was measured. One pair gives
its gain to every policy. With successive halving (``search.refine.rungs``) the same is done one rung
at a time: a policy is carried from the highest fidelity it was measured at (the search's, or the
rung where the halving dropped it) up to the next by the line through the pairs measured at both,
and so on to the last rung; only the policies of the last rung keep a measured score. The estimate is a column of its own, ``<score>_expected``; ``<score>`` stays
what was measured.

An estimate is not a measurement. Each step's fit carries an error, the root-mean-square of its
leave-one-out residuals (each pair's gain predicted from the other pairs: with one pair, the whole
gain), kept in ``<score>_expected_error``. The frontier and ``secateurs pick`` rank on
:func:`ranked`: an estimate less its error (more, for a score to minimise), a measured score as it
is. So an estimate takes a measured policy's place only by more than it can be wrong by. On seed 3
of the 5-seed benchmark (2026-12-01) the estimate of an unrefined ``uniform 0.5`` (0.7014) pushed
the refined ``global_magnitude 0.5`` (0.7010, measured) off the frontier, and the user was left with
``uniform 0.5``'s 0.6455 at 2x lower latency; the fit's error there is 0.032.

>>> t = pd.DataFrame({"accuracy": [0.72, 0.6335, 0.603], "accuracy_in_search": [0.70, 0.557, None],
...                   "refine_epochs": [2.0, 2.0, None]})
>>> expected(t, ["accuracy"])["accuracy_expected"].round(4).tolist()  # the third: 0.603 + the fitted gain
[0.72, 0.6335, 0.6613]
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

SUFFIX = "_expected"
ERROR = "_expected_error"  # the estimate's error: 0 where the score was measured at the last rung
# Scores that cannot leave a range: the built-in top-1 accuracy is a fraction. An estimate is held
# inside it (a policy at 0.978 carried up by a gain of 0.078 is expected at 1.0, not 1.056), unless a
# measured value lies outside it (a task's own "accuracy" in percent is not clipped).
BOUNDS: dict[str, tuple[float, float]] = {"accuracy": (0.0, 1.0)}


def refined(table: pd.DataFrame) -> pd.Series:
    """True for the rows ``search.refine`` fine-tuned longer (they have ``refine_epochs``)."""
    if "refine_epochs" not in table:
        return pd.Series(False, index=table.index)
    return table["refine_epochs"].notna() & (pd.to_numeric(table["refine_epochs"], errors="coerce") > 0)


def levels(table: pd.DataFrame, score: str) -> list[pd.Series]:
    """``score`` at each fidelity, lowest first: the search's fine-tune (``<score>_in_search`` on the
    refined rows), then each rung of the refinement (``<score>_rung<r>``; a search that kept no rungs
    has one, its refined ``score``); NaN where a policy was not measured at that fidelity."""
    done = refined(table)
    values = pd.to_numeric(table[score], errors="coerce")
    column = f"{score}_in_search"
    search = values.where(~done, pd.to_numeric(table[column], errors="coerce") if column in table else np.nan)
    rungs = sorted(int(m.group(1)) for c in table.columns if (m := re.fullmatch(re.escape(score) + r"_rung(\d+)", str(c))))
    above = [pd.to_numeric(table[f"{score}_rung{r}"], errors="coerce") for r in rungs] if rungs else [values.where(done)]
    while above and above[-1].isna().all():  # a rung a killed search never reached
        above.pop()
    return [search, *above]


def _pairs(lower: pd.Series, upper: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The rows measured at both fidelities: their ``lower`` values and the gain of each."""
    both = lower.notna() & upper.notna()
    before = lower[both].to_numpy(float)
    return before, upper[both].to_numpy(float) - before


def predicted_gain(before: np.ndarray, gains: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The gain at the search's values ``at``, from the pairs (``before``, ``gains``): a least-squares
    line, clipped to the gains measured (one pair, or pairs with one value: their mean gain).

    >>> predicted_gain(np.array([0.5, 0.7]), np.array([0.08, 0.02]), np.array([0.6, 0.4, 0.9])).round(3).tolist()
    [0.05, 0.08, 0.02]
    """
    if len(before) == 0:
        return np.zeros(len(at))
    if len(before) == 1 or np.ptp(before) == 0:
        return np.full(len(at), float(np.mean(gains)))
    slope, intercept = np.polyfit(before, gains, 1)
    return np.clip(intercept + slope * np.asarray(at, float), gains.min(), gains.max())


def fit_error(before: np.ndarray, gains: np.ndarray) -> float:
    """How far :func:`predicted_gain` can be off: the root-mean-square of its leave-one-out
    residuals, each pair's gain predicted from the others (one pair: nothing checks it, the whole gain).

    >>> round(fit_error(np.array([0.5515, 0.658, 0.7455]), np.array([0.094, 0.043, 0.024])), 4)
    0.0322
    """
    if len(before) == 0:
        return 0.0
    rest = [np.arange(len(before)) != i for i in range(len(before))]
    residuals = [gains[i] - predicted_gain(before[keep], gains[keep], before[i:i + 1])[0] for i, keep in enumerate(rest)]
    return float(np.sqrt(np.mean(np.square(residuals))))


def expected(table: pd.DataFrame, scores: Sequence[str]) -> pd.DataFrame:
    """A copy of ``table`` with ``<score>_expected`` and its error ``<score>_expected_error`` for each
    of ``scores`` when some rows were refined (measured at the last rung, error 0; the others carried
    up from the highest fidelity they were measured at, one rung at a time, each step's error added in
    quadrature, see the module), held inside :data:`BOUNDS`; unchanged otherwise. A column already
    there is kept: it was fitted on the whole search, ``table`` may be a part of it."""
    table = table.copy()
    if not refined(table).any():
        return table
    for score in scores:
        if score not in table or score + SUFFIX in table:
            continue
        scale = levels(table, score)
        if len(scale) < 2 or not len(_pairs(scale[0], scale[1])[0]):
            continue
        value, error = scale[0], pd.Series(0.0, index=table.index)
        for lower, upper in zip(scale, scale[1:]):
            before, gains = _pairs(lower, upper)
            carried = value + predicted_gain(before, gains, value.fillna(0.0).to_numpy())
            error = pd.Series(np.where(upper.notna(), 0.0, np.hypot(error, fit_error(before, gains))), index=table.index)
            value = upper.where(upper.notna(), carried)
        low, high = BOUNDS.get(score, (-np.inf, np.inf))
        if all((level.between(low, high) | level.isna()).all() for level in scale):
            value = value.clip(low, high)
        table[score + SUFFIX] = value.where(table[score].notna())
        table[score + ERROR] = error.where(table[score].notna())
    return table


def ranked(table: pd.DataFrame, senses: Mapping[str, str], caution: float = 1.0) -> pd.DataFrame:
    """``table`` as policies are ranked: each score of ``senses`` (name: ``max`` or ``min``) at the
    refinement's fidelity (:func:`expected`), measured where it was and estimated elsewhere, an
    estimate held back by ``caution`` times its error. The frontier and ``pick`` rank with the whole
    error (an estimate within its error of a measured score never takes the measured policy's place);
    the refinement, choosing what to measure next, and ``secateurs compare`` on the estimate itself (0)."""
    view = expected(table, list(senses))
    for score, sense in senses.items():
        if score + SUFFIX not in view:
            continue
        value = view[score + SUFFIX].where(view[score + SUFFIX].notna(), view[score])  # a row without an estimate keeps its own
        error = caution * pd.to_numeric(view.get(score + ERROR, pd.Series(0.0, index=view.index)), errors="coerce").fillna(0.0)
        view[score] = value - error if sense == "max" else value + error
    return view


def in_search(table: pd.DataFrame, scores: Sequence[str]) -> pd.DataFrame:
    """``table`` with each score at the search's own fine-tune: ``<score>_in_search`` on the refined
    rows. The footing on which searches that did not all refine are compared (``secateurs compare``).

    >>> t = pd.DataFrame({"accuracy": [0.72, 0.603], "accuracy_in_search": [0.70, None], "refine_epochs": [2.0, None]})
    >>> in_search(t, ["accuracy"])["accuracy"].tolist()
    [0.7, 0.603]
    """
    view = table.copy()
    done = refined(view)
    for score in scores:
        column = score + "_in_search"
        if column in view and score in view:
            view[score] = view[column].where(done & view[column].notna(), view[score])
    return view


def pairs_count(table: pd.DataFrame, score: str) -> int:
    """How many policies the estimate of ``score`` rests on: those measured at the last rung."""
    scale = levels(table, score) if score in table else []
    return int(scale[-1].notna().sum()) if len(scale) > 1 else 0


def describe(row: pd.Series, table: pd.DataFrame, score: str, sense: str = "max") -> str | None:
    """How ``row``'s ``score`` was ranked, for ``pick``'s report and model card (None: the search
    refined nothing, every score is the search's own). ``sense``: ``max`` or ``min``, which way the
    estimate's error was taken (:func:`ranked`)."""
    done = refined(table)
    if not done.any() or score not in row:
        return None
    epochs = float(pd.to_numeric(table.loc[done, "refine_epochs"]).max())
    guess = row.get(score + SUFFIX)

    def at(what: str, refined_word: str = "") -> str:  # the value ranked on, and how it came about
        error = float(row.get(score + ERROR, 0.0) or 0.0)
        error = 0.0 if error != error else error
        rank = float(guess) - error if sense == "max" else float(guess) + error
        held = (f" {'less' if sense == 'max' else 'plus'} its error {error:.4f} (the fit's leave-one-out error)" if error else "")
        return (f"ranked at {rank:.4f}: the {score} expected after {what}, {float(guess):.4f}, estimated from "
                f"{pairs_count(table, score)}{refined_word} policies{held} (search.fidelity)")

    if refined(row.to_frame().T).iloc[0]:
        measured = (f"{score} {float(row[score]):.4f} after the refinement's {float(row['refine_epochs']):g} epochs "
                    f"({float(row[f'{score}_in_search']):.4f} after the search's fine-tune)")
        if float(row["refine_epochs"]) >= epochs or guess is None or guess != guess:
            return measured
        return f"{measured}, a rung the successive halving did not keep it past; " + at(f"its last rung's {epochs:g} epochs")
    if guess is None or guess != guess:
        return None
    return f"{score} {float(row[score]):.4f} after the search's fine-tune (not refined); " + at(f"the refinement's {epochs:g} epochs", " refined")
