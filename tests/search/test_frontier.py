"""Tests for search.frontier: dominance, hypervolume, knee point, frontier table and plot."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.frontier import (
    OBJECTIVES,
    frontier_table,
    hypervolume,
    knee_point,
    non_dominated,
    plot_frontier,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- non_dominated -----------------------------------------------------------


def test_objectives_default() -> None:
    assert OBJECTIVES == {"accuracy": "max", "latency_ms": "min", "size_mb": "min"}


def test_non_dominated_hand_checked_min_min() -> None:
    pts = [
        [1, 9],  # frontier
        [2, 4],  # frontier
        [3, 5],  # dominated by (2, 4)
        [4, 2],  # frontier
        [4, 3],  # dominated by (4, 2): equal x, worse y
        [7, 1],  # frontier
        [8, 8],  # dominated by many
    ]
    mask = non_dominated(pts, ["min", "min"])
    assert mask.dtype == bool
    assert mask.tolist() == [True, True, False, True, False, True, False]


def test_non_dominated_mixed_senses() -> None:
    # (accuracy: max, latency: min)
    pts = np.array([[0.90, 10.0], [0.85, 5.0], [0.80, 6.0], [0.95, 20.0], [0.90, 12.0]])
    assert non_dominated(pts, ["max", "min"]).tolist() == [True, True, False, True, False]
    # Flipping both senses flips the roles: the old worst points are now best.
    flipped = non_dominated(pts, ["min", "max"]).tolist()
    assert flipped == [False, False, True, True, True]


def test_non_dominated_all_max_equals_negated_min() -> None:
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 5, size=(30, 3)).astype(float)
    assert np.array_equal(non_dominated(pts, ["max"] * 3), non_dominated(-pts, ["min"] * 3))


def test_non_dominated_duplicates_both_kept() -> None:
    pts = [[1, 2], [1, 2], [2, 1], [3, 3], [3, 3]]
    assert non_dominated(pts, ["min", "min"]).tolist() == [True, True, True, False, False]


def test_non_dominated_nan_rows_excluded_and_do_not_dominate() -> None:
    pts = [[np.nan, 0.0], [1.0, 1.0], [2.0, 2.0], [0.0, np.nan]]
    # (nan, 0) would dominate (1, 1) and (2, 2) on y alone; it must not.
    assert non_dominated(pts, ["min", "min"]).tolist() == [False, True, False, False]
    assert non_dominated([[np.nan, np.nan]], ["min", "min"]).tolist() == [False]


def test_non_dominated_empty_and_single() -> None:
    empty = non_dominated(np.empty((0, 3)), ["min", "max", "min"])
    assert empty.shape == (0,) and empty.dtype == bool
    assert non_dominated([], ["min", "min"]).shape == (0,)
    assert non_dominated([[5.0, 5.0]], ["min", "min"]).tolist() == [True]


def test_non_dominated_single_objective() -> None:
    assert non_dominated([[3], [1], [1], [2]], ["min"]).tolist() == [False, True, True, False]


def test_non_dominated_bad_input() -> None:
    with pytest.raises(ValueError, match="'best'.*'min', 'max'"):
        non_dominated([[1, 2]], ["min", "best"])
    with pytest.raises(ValueError, match="3 objectives"):
        non_dominated([[1, 2, 3]], ["min", "min"])
    with pytest.raises(ValueError, match="shape"):
        non_dominated([1.0, 2.0], ["min", "min"])
    with pytest.raises(ValueError, match="string"):
        non_dominated([[1, 2]], "mm")


# --- hypervolume -------------------------------------------------------------


def test_hypervolume_2d_hand_computed() -> None:
    # One point: a single box.
    assert hypervolume([[0, 0]], ["min", "min"], [1, 1]) == pytest.approx(1.0)
    assert hypervolume([[1, 1]], ["min", "min"], [3, 4]) == pytest.approx(6.0)
    # Two overlapping boxes: 2x1 + 1x2 - 1x1 = 3.
    assert hypervolume([[1, 2], [2, 1]], ["min", "min"], [3, 3]) == pytest.approx(3.0)
    # Staircase of three: (0,3),(1,1),(3,0) with ref (4,4):
    # 4*1 [x 0..4, y 3..4] + 3*2 [x 1..4, y 1..3] + 1*1 [x 3..4, y 0..1] = 11.
    assert hypervolume([[0, 3], [1, 1], [3, 0]], ["min", "min"], [4, 4]) == pytest.approx(11.0)
    # Adding a dominated point and a duplicate changes nothing.
    pts = [[0, 3], [1, 1], [3, 0], [2, 2], [1, 1]]
    assert hypervolume(pts, ["min", "min"], [4, 4]) == pytest.approx(11.0)


def test_hypervolume_3d_hand_computed() -> None:
    s3 = ["min"] * 3
    assert hypervolume([[0, 0, 0]], s3, [1, 1, 1]) == pytest.approx(1.0)
    assert hypervolume([[0, 0, 0]], s3, [2, 3, 4]) == pytest.approx(24.0)
    # Boxes [0,2]x[1,2]x[1,2] and [1,2]x[0,2]x[1,2] (volume 2 each) overlap in the
    # unit cube at (1,1,1): 2 + 2 - 1 = 3.
    assert hypervolume([[0, 1, 1], [1, 0, 1]], s3, [2, 2, 2]) == pytest.approx(3.0)
    # Add the third such box: each pair and the triple overlap in the same unit cube,
    # so inclusion-exclusion gives 3*2 - 3*1 + 1 = 4.
    pts = [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    assert hypervolume(pts, s3, [2, 2, 2]) == pytest.approx(4.0)
    # Same points, reference 3: each box 3*2*2 = 12; every pair and the triple meet in
    # the 2-cube above (1,1,1), volume 8: 36 - 24 + 8 = 20.
    assert hypervolume(pts, s3, [3, 3, 3]) == pytest.approx(20.0)
    # Nested boxes: the inner one adds nothing.
    assert hypervolume([[0, 0, 0], [1, 1, 1]], s3, [2, 2, 2]) == pytest.approx(8.0)


def test_hypervolume_4d_unit_hypercube() -> None:
    assert hypervolume([[0, 0, 0, 0]], ["min"] * 4, [1, 1, 1, 1]) == pytest.approx(1.0)
    # Two 4-D boxes of volume 2 overlapping in volume 1.
    pts = [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert hypervolume(pts, ["min"] * 4, [2, 2, 1, 1]) == pytest.approx(3.0)


def test_hypervolume_max_senses_negate_points_and_reference() -> None:
    # accuracy 0.8 (max) with reference 0.5 -> width 0.3; latency 2 (min) with reference 10 -> 8.
    assert hypervolume([[0.8, 2.0]], ["max", "min"], [0.5, 10.0]) == pytest.approx(0.3 * 8.0)
    pts = np.array([[1, 2], [2, 1]], dtype=float)
    assert hypervolume(-pts, ["max", "max"], [-3, -3]) == pytest.approx(3.0)


def test_hypervolume_non_contributing_points() -> None:
    s2 = ["min", "min"]
    assert hypervolume([[3, 0]], s2, [3, 3]) == 0.0  # on the reference boundary: not strict
    assert hypervolume([[4, 4], [0, 5]], s2, [3, 3]) == 0.0
    assert hypervolume([], s2, [3, 3]) == 0.0
    assert hypervolume([[np.nan, 0.0]], s2, [3, 3]) == 0.0
    # A point outside the reference does not add anything to one inside.
    assert hypervolume([[1, 1], [0, 5]], s2, [2, 2]) == pytest.approx(1.0)
    assert isinstance(hypervolume([[1, 1]], s2, [2, 2]), float)


def test_hypervolume_bad_reference() -> None:
    with pytest.raises(ValueError, match="reference"):
        hypervolume([[1, 1]], ["min", "min"], [2, 2, 2])
    with pytest.raises(ValueError, match="finite"):
        hypervolume([[1, 1]], ["min", "min"], [2, np.nan])
    with pytest.raises(ValueError, match="'up'"):
        hypervolume([[1, 1]], ["min", "up"], [2, 2])


def _grid_count(points: list[tuple[int, ...]], ref: int, k: int) -> int:
    """Unit cells [c, c+1)^k inside [0, ref)^k dominated by some point (p <= c componentwise)."""
    count = 0
    for cell in itertools.product(range(ref), repeat=k):
        if any(all(p[d] <= cell[d] for d in range(k)) for p in points):
            count += 1
    return count


GRID = 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, GRID)] * 2), min_size=0, max_size=8))
def test_hypervolume_matches_grid_count_2d(points: list[tuple[int, int]]) -> None:
    expected = _grid_count(points, GRID, 2)
    assert hypervolume(points, ["min", "min"], [GRID, GRID]) == pytest.approx(expected)
    # Same set seen as a maximisation problem.
    negated = [[-x for x in p] for p in points]
    assert hypervolume(negated, ["max", "max"], [-GRID, -GRID]) == pytest.approx(expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, GRID)] * 3), min_size=0, max_size=8))
def test_hypervolume_matches_grid_count_3d(points: list[tuple[int, int, int]]) -> None:
    expected = _grid_count(points, GRID, 3)
    assert hypervolume(points, ["min"] * 3, [GRID] * 3) == pytest.approx(expected)
    mixed = [[p[0], -p[1], p[2]] for p in points]
    assert hypervolume(mixed, ["min", "max", "min"], [GRID, -GRID, GRID]) == pytest.approx(expected)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, 3)] * 4), min_size=1, max_size=6))
def test_hypervolume_matches_grid_count_4d(points: list[tuple[int, int, int, int]]) -> None:
    assert hypervolume(points, ["min"] * 4, [3] * 4) == pytest.approx(_grid_count(points, 3, 4))


# --- knee_point --------------------------------------------------------------


def test_knee_symmetric_frontier() -> None:
    # A convex symmetric frontier; the middle point is closest to the ideal (0, 0).
    pts = [[0.0, 1.0], [0.2, 0.45], [0.45, 0.2], [1.0, 0.0], [0.3, 0.3], [0.9, 0.9]]
    assert knee_point(pts, ["min", "min"]) == 4


def test_knee_ignores_dominated_and_nan_rows_and_normalises() -> None:
    # Latency is on a much larger scale; normalisation makes the middle point the knee.
    pts = [
        [np.nan, 0.0],  # not finite: ignored
        [0.95, 1000.0],
        [0.90, 100.0],
        [0.50, 10.0],
        [0.10, 0.0],  # frontier: fastest
        [0.80, 900.0],  # dominated by (0.90, 100)
    ]
    assert knee_point(pts, ["max", "min"]) == 2


def test_knee_single_and_zero_range() -> None:
    assert knee_point([[3.0, 4.0]], ["min", "max"]) == 0
    # Second objective constant: it counts as 0, so the best in the first wins.
    assert knee_point([[2.0, 5.0], [1.0, 5.0], [3.0, 5.0]], ["min", "min"]) == 1


def test_knee_no_finite_rows() -> None:
    with pytest.raises(ValueError, match="finite"):
        knee_point([[np.nan, 1.0], [np.inf, 2.0]], ["min", "min"])
    with pytest.raises(ValueError, match="finite"):
        knee_point(np.empty((0, 2)), ["min", "min"])


# --- frontier_table ----------------------------------------------------------


def _trials() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial": [0, 1, 2, 3, 4],
            "accuracy": [0.90, 0.85, 0.80, 0.95, np.nan],
            "latency_ms": [10.0, 5.0, 6.0, 20.0, 1.0],
            "size_mb": [4.0, 3.0, 3.5, 8.0, 1.0],
        }
    )


def test_frontier_table_adds_pareto_column() -> None:
    df = _trials()
    out = frontier_table(df)
    assert out["pareto"].dtype == bool
    assert out["pareto"].tolist() == [True, True, False, True, False]
    assert "pareto" not in df.columns  # input untouched
    assert out.drop(columns="pareto").equals(df)


def test_frontier_table_custom_objectives() -> None:
    df = _trials()
    out = frontier_table(df, {"accuracy": "max", "size_mb": "min"})
    assert out["pareto"].tolist() == [True, True, False, True, False]
    out = frontier_table(df, {"latency_ms": "min"})
    assert out["pareto"].tolist() == [False, False, False, False, True]


def test_frontier_table_empty() -> None:
    out = frontier_table(_trials().iloc[:0])
    assert len(out) == 0 and "pareto" in out.columns


def test_frontier_table_errors() -> None:
    df = _trials().drop(columns="size_mb")
    with pytest.raises(ValueError, match=r"size_mb.*columns present.*latency_ms"):
        frontier_table(df)
    with pytest.raises(ValueError, match="'fastest'"):
        frontier_table(_trials(), {"accuracy": "fastest"})
    with pytest.raises(ValueError):
        frontier_table(_trials(), {})


# --- plot_frontier -----------------------------------------------------------


def test_plot_frontier_writes_png(tmp_path) -> None:
    df = frontier_table(_trials())
    out = plot_frontier(df, tmp_path / "sub" / "frontier.png", title="test")
    assert out == tmp_path / "sub" / "frontier.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_frontier_with_dense_and_str_path(tmp_path) -> None:
    dense = {"accuracy": 0.97, "latency_ms": 25.0, "size_mb": 10.0}
    out = plot_frontier(frontier_table(_trials()), str(tmp_path / "d.png"), dense=dense)
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("n_rows", [0, 1])
def test_plot_frontier_tiny_frames(tmp_path, n_rows: int) -> None:
    df = frontier_table(_trials().iloc[:n_rows])
    out = plot_frontier(df, tmp_path / f"f{n_rows}.png", dense={"accuracy": 0.9, "latency_ms": 1.0, "size_mb": 1.0})
    assert out.read_bytes()[:8] == PNG_MAGIC
    out = plot_frontier(df, tmp_path / f"g{n_rows}.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_frontier_without_pareto_column(tmp_path) -> None:
    out = plot_frontier(_trials(), tmp_path / "p.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_frontier_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="size_mb"):
        plot_frontier(_trials().drop(columns="size_mb"), tmp_path / "x.png")
    with pytest.raises(ValueError, match="latency_ms"):
        plot_frontier(_trials(), tmp_path / "x.png", dense={"accuracy": 0.9, "size_mb": 1.0})
