"""End-to-end searches with a real local Ray and a real MLflow store on a temporary sqlite file."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from search import frontier
from search.config import validate
from search.driver import run_search
from search.records import load_search
from search.refine import chosen_before
from spaces import Policy

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def tiny_config(tmp_path: Path, **task) -> dict:
    return {
        "task": {"dense_epochs": 3, **task},
        "space": {"criteria": ["l1", "l2", "random"], "ratio": {"low": 0.0, "high": 0.6, "step": 0.05},
                  "rules": [{"match": "classifier.*", "exclude": True}],
                  "finetune_lr": [0.005, 0.05], "finetune_optimizers": ["sgd", "adamw"]},
        "finetune": {"epochs": 0.2},
        "measure": {"warmup": 2, "repeats": 5},
        "search": {"num_trials": 6, "population_size": 4, "max_concurrent": 2, "seed": 3,
                   "storage_path": str(tmp_path / "ray"), "baseline_ratios": [0.5]},
        "tracking": {"experiment": "e2e"},
    }


def children(client: MlflowClient, result, kind: str):
    return client.search_runs(
        [result.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' and tags.`secateurs.kind` = '{kind}'",
        max_results=1000,
    )


def test_search_records_trials_frontier_and_artifacts(tmp_path, store):
    raw = tiny_config(tmp_path)
    raw["space"]["round_to"] = [1, 8]  # searched: each trial's policy.json says which it ran
    config = validate(raw)
    lines: list[str] = []
    result = run_search(config, config_name="tiny", tracking_uri=store, out=lines.append)
    client = MlflowClient(store)

    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["secateurs.kind"] == "search"
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"config.yaml", "frontier.csv", "frontier.png"} <= artifacts
    logged_config = yaml.safe_load(Path(client.download_artifacts(result.parent_run_id, "config.yaml", str(tmp_path))).read_text())
    assert logged_config == config.to_dict()

    dense = children(client, result, "dense")
    assert len(dense) == 1 and dense[0].data.metrics["accuracy"] == pytest.approx(result.dense["accuracy"])

    trials = children(client, result, "trial")
    assert len(trials) == 6
    named = {run.data.tags["secateurs.baseline"]: run for run in children(client, result, "baseline")}
    assert set(named) == {"uniform 0.5", "global_magnitude 0.5"}  # the default baselines, evaluated first
    assert {k: v for k, v in named["uniform 0.5"].data.params.items() if k.startswith("ratio.")} == {
        "ratio.features.0": "0.5", "ratio.features.3": "0.5", "ratio.features.7": "0.5", "ratio.classifier.1": "0.0"}
    searched = ["features.0", "features.3", "features.7"]
    ranked = {g: float(named["global_magnitude 0.5"].data.params["ratio." + g]) for g in searched}
    sizes = {"features.0": 32, "features.3": 64, "features.7": 64}  # DigitsCNN's widths
    assert len(set(ranked.values())) > 1  # one global ranking: the groups lose different shares...
    assert sum(ranked[g] * sizes[g] for g in searched) / sum(sizes.values()) == pytest.approx(0.5, abs=0.025)  # ...half in all
    logged = json.loads(Path(client.download_artifacts(result.parent_run_id, "baselines.json", str(tmp_path))).read_text())
    assert [b["name"] for b in logged] == ["uniform 0.5", "global_magnitude 0.5"]
    baselines = list(named.values())
    rows = []
    for run in trials + baselines:
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["policy.granularity"] == "channel"
        assert params["policy.criterion"] in {"l1", "l2", "random"}
        assert params["ratio.classifier.1"] == "0.0"  # excluded by the rule: logged, never pruned
        for key in ("accuracy", "accuracy_drop", "latency_ms", "size_mb", "macs", "params"):
            assert key in run.data.metrics
        # the trial's timeline (benchmarks/overhead.py splits the framework's cost with it): it ran inside fit()
        fit_started, m = parent.data.metrics["fit_started_unix_s"], run.data.metrics
        assert fit_started <= m["time_started_unix_s"] < m["time_started_unix_s"] + m["time_trial_s"] <= fit_started + parent.data.metrics["fit_wall_s"]
        policy_path = client.download_artifacts(run.info.run_id, "policy.json", str(tmp_path / run.info.run_id))
        policy = Policy.from_json(Path(policy_path).read_text())
        assert {g: r for g, r in policy.ratios.items()} == {k[6:]: float(v) for k, v in params.items() if k.startswith("ratio.") and float(v) > 0}
        assert set(policy.ratios) <= set(searched)
        assert 0.005 <= policy.finetune["lr"] <= 0.05 and policy.finetune["optimizer"] in {"sgd", "adamw"}
        assert float(params["finetune.lr"]) == policy.finetune["lr"] and params["finetune.optimizer"] == policy.finetune["optimizer"]
        assert run.data.metrics["accuracy_drop"] == pytest.approx(result.dense["accuracy"] - run.data.metrics["accuracy"])
        if policy.ratios:
            assert run.data.metrics["params"] < result.dense["params"]
        rows.append({"run_id": run.info.run_id, "pareto": run.data.tags["secateurs.pareto"],
                     **{m: run.data.metrics[m] for m in frontier.OBJECTIVES}})

    # The pareto tags agree with a non-dominated sort of what MLflow holds.
    table = pd.DataFrame(rows)
    expected = frontier.non_dominated(table[list(frontier.OBJECTIVES)].to_numpy(), list(frontier.OBJECTIVES.values()))
    assert list(table["pareto"] == "true") == list(expected)

    csv_path = client.download_artifacts(result.parent_run_id, "frontier.csv", str(tmp_path / "csv"))
    front = pd.read_csv(csv_path)
    assert set(front["run_id"]) == set(table.loc[expected, "run_id"])
    for row in front.itertuples():  # the frontier's policies are the ones its trials ran: their policy.json
        ran = Policy.from_json(Path(client.download_artifacts(row.run_id, "policy.json", str(tmp_path / "ran" / row.run_id))).read_text())
        assert Policy.from_json(row.policy) == ran and str(ran.round_to) == client.get_run(row.run_id).data.params["policy.round_to"]
    assert np.all(front["latency_ms"].diff().dropna() >= 0)

    assert parent.data.metrics["trials_completed"] == 8
    assert parent.data.metrics["frontier_size"] == expected.sum()
    # hypervolume after every completed trial; it can only grow as points are added
    history = [m.value for m in sorted(client.get_metric_history(result.parent_run_id, "hypervolume"), key=lambda m: m.step)]
    assert len(history) == 8 and all(b >= a for a, b in zip(history, history[1:])) and history[-1] > 0
    # the frontier was timed again at the end, alone; the in-search timing is kept beside it
    output = "\n".join(lines)
    untimed = [r for r in front["run_id"] if "latency_ms_in_search" not in client.get_run(r).data.metrics]
    assert all(client.get_run(r).data.metrics["latency_ms"] > 0 for r in front["run_id"])
    if untimed:  # a busy machine's timings can reshape the frontier in every pass up to the cap (a fresh-clone
        # run at d3b1766): a policy that joined it after the last pass keeps its in-search latency, and the
        # warning says how many and names them
        late = re.search(r"(\d+) frontier policies joined the frontier after the last pass[^(]*\(([^)]*)\)", output)
        assert late and int(late.group(1)) == len(untimed) and all(r[:12] in late.group(2) for r in untimed[:3]), (untimed, output[-3000:])
    assert "latency_ms_in_search" in client.get_run(dense[0].info.run_id).data.metrics
    # the dense model and the whole frontier were timed together in one round-robin pass: the
    # passes repeat until the frontier is within the last pass's policies
    passes = [int(n) for n in re.findall(r"re-measuring the latency of the dense model and (\d+) frontier policies, together", output)]
    # (on a busy machine the timings can reshape the frontier in every pass up to the cap of 4, and
    # then the last pass need not cover it: a full-suite run at 2aefeb9 timed 7, 6, 8 and 6 for a
    # frontier of 7)
    assert passes and (passes[-1] >= len(front) or len(passes) == 4), passes
    assert "[8/8]" in output and "Pareto frontier" in output and "mlflow ui --backend-store-uri" in output


def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path, store, monkeypatch):
    raw = tiny_config(tmp_path, name="tests.fragile_task:make_task")
    raw["space"]["rules"] = [{"match": "classifier.*", "exclude": True}, {"match": "features.0", "low": 0.0, "high": 0.6}]
    raw["search"]["num_trials"] = 8
    raw["search"]["baseline_ratios"] = []
    raw["search"]["storage_path"] = (tmp_path / "ray-uri").as_uri()  # a storage URI, as for s3:// or gs://
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_search(validate(raw), config_name="fragile", tracking_uri=None, out=lambda line: None)
    assert result.tracking_uri == store  # the default: sqlite:///mlflow.db in the working directory
    client = MlflowClient(store)
    trials = children(client, result, "trial")
    assert len(trials) == 8
    failed = [r for r in trials if r.info.status == "FAILED"]
    done = [r for r in trials if r.info.status == "FINISHED"]
    assert failed and done, "the seed should give both fragile and sound policies"
    for run in failed:
        assert "fragile model: only" in run.data.tags["secateurs.error"]
        ratio = float(run.data.params["ratio.features.0"])
        assert 32 - int(32 * ratio + 1e-9) < 24
        error_path = client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path / run.info.run_id))
        assert "RuntimeError" in Path(error_path).read_text()
    for run in done:
        assert 32 - int(32 * float(run.data.params.get("ratio.features.0", 0)) + 1e-9) >= 24
        assert "secateurs.pareto" in run.data.tags
    assert result.num_failed == len(failed)
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert client.get_run(result.parent_run_id).data.metrics["trials_failed"] == len(failed)
    experiment = client.get_run(result.parent_run_id).data.tags["secateurs.ray_experiment"]
    assert experiment.startswith("file://") and any((tmp_path / "ray-uri").iterdir())


def test_a_search_whose_every_trial_failed_exits_1_naming_the_first_error(tmp_path, store, capfd):
    from search.cli import main

    raw = tiny_config(tmp_path, name="tests.fragile_task:make_task")
    raw["space"]["criteria"] = ["l1"]
    raw["space"]["rules"] = [{"match": "classifier.*", "exclude": True}, {"match": "features.0", "low": 0.5, "high": 0.6}]
    raw["search"].update(num_trials=3, baseline_ratios=[])  # features.0 keeps at most 16 filters: every fine-tune raises
    (tmp_path / "all_fail.yaml").write_text(yaml.safe_dump(raw))
    code = main(["search", "all_fail.yaml", "--tracking-uri", store])
    err = capfd.readouterr().err
    assert code == 1, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("secateurs: error:")]
    assert "every trial failed (3)" in line and "fragile model: only" in line
    client = MlflowClient(store)
    (parent,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.`secateurs.kind` = 'search'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 3


def test_constraints_and_patience(tmp_path, store):
    raw = tiny_config(tmp_path)
    raw["search"].update({"num_trials": 30, "patience": 3, "baseline_ratios": [0.3, 0.6],
                          "constraints": ["accuracy_drop <= 0.02", "macs <= 0.6 * dense"], "remeasure": False})
    lines: list[str] = []
    result = run_search(validate(raw), config_name="constrained", tracking_uri=store, out=lines.append)
    client = MlflowClient(store)
    runs = children(client, result, "trial") + children(client, result, "baseline")
    assert len(runs) < 32, "patience should stop the search long before its budget"
    assert any("stopped early" in line for line in lines)
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    for run in runs:
        m = run.data.metrics
        feasible = m["accuracy_drop"] <= 0.02 + 1e-12 and m["macs"] <= 0.6 * result.dense["macs"]
        assert m["feasible"] == float(feasible)
        if run.data.tags["secateurs.pareto"] == "true":
            assert feasible  # the reported frontier honours the constraints


def test_sensitivity_analysis_is_logged_seeds_the_search_and_narrows_ranges(tmp_path, store):
    raw = tiny_config(tmp_path)
    raw["search"].update({"num_trials": 5, "baselines": [], "remeasure": False,
                          "sensitivity": {"ratios": [0.3, 0.6], "samples": 300, "seed_drops": [0.005, 0.03], "narrow": 0.01}})
    lines: list[str] = []
    result = run_search(validate(raw), config_name="sensitive", tracking_uri=store, out=lines.append)
    client = MlflowClient(store)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"sensitivity.csv", "sensitivity.png", "baselines.json", "narrowed.json"} <= artifacts
    table = pd.read_csv(client.download_artifacts(result.parent_run_id, "sensitivity.csv", str(tmp_path)))
    assert sorted(set(table["group"])) == ["features.0", "features.3", "features.7"]  # the searched groups, alone
    assert sorted(set(table["ratio"])) == [0.3, 0.6]
    assert np.allclose(table["accuracy_drop"], table["dense_proxy_accuracy"] - table["proxy_accuracy"])
    assert (table.groupby("group")["macs"].diff().dropna() < 0).all()  # pruning harder removes more MACs

    from evaluators.sensitivity import safe_ratios

    highs = json.loads(Path(client.download_artifacts(result.parent_run_id, "narrowed.json", str(tmp_path))).read_text())
    safe = safe_ratios(table.to_dict("records"), 0.01)
    assert highs and set(highs) == {g for g, r in safe.items() if r < 0.6 - 0.05 + 1e-9}
    for group, high in highs.items():
        assert high <= safe[group] + 1e-9 and high < 0.6
    trials = children(client, result, "trial")
    assert len(trials) == 5
    seeds = {run.data.tags["secateurs.seed"]: run for run in trials if "secateurs.seed" in run.data.tags}
    assert 1 <= len(seeds) <= 2
    for name, run in seeds.items():
        drop = float(name.removeprefix("sensitivity drop<="))
        expected = safe_ratios(table.to_dict("records"), drop)
        for group, ratio in expected.items():
            high = highs.get(group, 0.6)
            assert float(run.data.params["ratio." + group]) == pytest.approx(min(round(ratio / 0.05) * 0.05, high), abs=1e-9)
    for run in trials:  # the sampler stays inside the narrowed ranges
        for group, high in highs.items():
            assert float(run.data.params["ratio." + group]) <= high + 1e-9
    assert any(line.startswith("sensitivity: most fragile") for line in lines)


def test_latency_and_mac_seeds_are_points_of_the_sensitivity_path(tmp_path, store):
    raw = tiny_config(tmp_path)
    # no seed_macs: a search held to a MAC budget is seeded at its bound
    raw["search"].update({"num_trials": 4, "baselines": [], "remeasure": False, "constraints": ["macs <= 0.6 * dense"],
                          "sensitivity": {"ratios": [0.3, 0.6], "samples": 300, "seed_drops": [], "seed_latency": [0.95, 0.2]}})
    lines: list[str] = []
    result = run_search(validate(raw), config_name="latency-seeded", tracking_uri=store, out=lines.append)
    client = MlflowClient(store)
    table = pd.read_csv(client.download_artifacts(result.parent_run_id, "sensitivity.csv", str(tmp_path)))
    assert (table["latency_ms"] > 0).all() and table["dense_latency_ms"].nunique() == 1  # one timing of the dense model
    path = pd.read_csv(client.download_artifacts(result.parent_run_id, "sensitivity_path.csv", str(tmp_path)))
    ratios = [c for c in path.columns if c.startswith("ratio.")]
    assert sorted(ratios) == ["ratio.features.0", "ratio.features.3", "ratio.features.7"]
    assert (path[ratios].diff().dropna() >= -1e-9).all().all()  # along the path pruning only grows
    assert np.allclose(path["latency_fraction"], path["latency_ms"] / path["dense_latency_ms"])
    seeds = {run.data.tags["secateurs.seed"]: run for run in children(client, result, "trial") if "secateurs.seed" in run.data.tags}
    assert seeds
    for target in (0.95, 0.2):
        # each target takes the path point measured closest to it
        closest = path.loc[(path["latency_fraction"] - target).abs().idxmin()]
        assert str(target) in str(closest["seed_for"]).split()
        run = seeds.get(f"sensitivity latency~{target:g}x dense")
        if target == 0.95:
            # barely pruned, its pruned model breaks the MAC budget and is left out before any trial;
            # which path point is closest depends on the timings, so when a point pruned enough is
            # closest (a noisy machine), the seed runs, within the budget
            if run is None:
                assert any(line.startswith("sensitivity: seed 'sensitivity latency~0.95x dense' left out: "
                                           "its pruned model breaks macs <= 0.6 * dense") for line in lines), lines
            else:
                assert run.data.metrics["macs"] <= 0.6 * (run.data.metrics["macs"] - run.data.metrics["macs_change"])
            continue
        if run is None:
            # the same point as the other target's: recorded once, under that name, or left out once for
            # the MAC budget (a busy machine can time the barely pruned point closest to both targets)
            other = path.loc[(path["latency_fraction"] - 0.95).abs().idxmin()]
            assert closest.equals(other), (path, lines)
            assert len([name for name in seeds if "latency" in name]) == 1 or any(
                line.startswith("sensitivity: seed 'sensitivity latency~0.95x dense' left out: ") for line in lines), lines
            continue
        for column in ratios:
            assert float(run.data.params[column]) == pytest.approx(closest[column])
    assert any(line.startswith("sensitivity: latency seeds at") for line in lines)
    # the MAC seed ran (once: a latency seed at the same point would stand for it), its MACs within its target
    (line,) = [line for line in lines if line.startswith("sensitivity: MAC seeds at")]
    counted = float(line.split("MAC seeds at ")[1].split("x")[0])  # its MACs / dense, as the path counted them
    fraction = {name: r.data.metrics["macs"] / (r.data.metrics["macs"] - r.data.metrics["macs_change"]) for name, r in seeds.items()}
    name = "sensitivity macs<=0.6x dense"
    if name not in seeds:
        (name,) = [n for n, f in fraction.items() if "latency" in n and round(f, 3) == counted]
    assert 0 < fraction[name] <= 0.6 and round(fraction[name], 3) == counted


def test_a_budget_of_fine_tunes_stops_the_search_once_that_many_sampled_trials_were_fine_tuned(tmp_path, store):
    raw = tiny_config(tmp_path)
    raw["search"].update({"num_trials": 40, "remeasure": False, "screening": {"warmup": 1, "bn_batches": 4, "fine_tunes": 3}})
    lines: list[str] = []
    result = run_search(validate(raw), config_name="fine-tune-budget", tracking_uri=store, out=lines.append)
    client = MlflowClient(store)
    trials = children(client, result, "trial")
    fine_tuned = [r for r in trials if r.data.tags.get("secateurs.screened_out") != "true"]
    assert len(fine_tuned) == 3 and all(r.data.metrics["fidelity"] == 1 for r in fine_tuned)
    assert len(trials) < 40  # stopped long before the cap on sampled trials
    assert len(children(client, result, "baseline")) == 2  # baselines run whatever the budget
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert any(line.startswith("stopped: 3 sampled policies were fine-tuned") for line in lines)
    assert any("until 3 sampled policies are fine-tuned (at most 40 sampled)" in line for line in lines)


def test_screening_fine_tunes_only_trials_no_screened_trial_dominates(tmp_path, store):
    raw = tiny_config(tmp_path)
    # 16 sampled policies: whether one is dominated at screening hangs on measured latencies, and
    # with 10 a loaded CI machine once screened none out
    raw["search"].update({"num_trials": 16, "remeasure": False, "screening": {"warmup": 2, "bn_batches": 4}})
    lines: list[str] = []
    result = run_search(validate(raw), config_name="screened", tracking_uri=store, out=lines.append)
    client = MlflowClient(store)
    runs = children(client, result, "trial") + children(client, result, "baseline")
    assert len(runs) == 18
    out = [r for r in runs if r.data.tags.get("secateurs.screened_out") == "true"]
    kept = [r for r in runs if r not in out]
    assert out, "some of 16 sampled policies should be dominated at screening"
    for run in out:
        m = run.data.metrics
        assert m["fidelity"] == 0 and m["finetune_steps"] == 0 and run.data.tags["secateurs.kind"] == "trial"
        assert run.data.tags["secateurs.pareto"] == "false"
    for run in kept:
        m = run.data.metrics
        assert m["fidelity"] == 1 and m["finetune_steps"] > 0 and "screening_accuracy" in m
    assert all(r.data.metrics["fidelity"] == 1 for r in children(client, result, "baseline"))  # references are always fine-tuned

    def screened(run):
        m = run.data.metrics
        return (m.get("screening_accuracy", m["accuracy"]), m["latency_ms"], m["size_mb"])

    for run in out:  # each was stopped because another trial's screening result dominated its own
        others = [screened(r) for r in runs if r is not run]
        assert frontier.dominated(screened(run), others, list(frontier.OBJECTIVES.values()))
    # the frontier holds fine-tuned trials only, and equals a non-dominated sort of them
    table = pd.DataFrame([{"id": r.info.run_id, "pareto": r.data.tags["secateurs.pareto"] == "true",
                           **{k: r.data.metrics[k] for k in frontier.OBJECTIVES}} for r in kept])
    assert list(table["pareto"]) == list(frontier.non_dominated(table[list(frontier.OBJECTIVES)].to_numpy(), list(frontier.OBJECTIVES.values())))
    assert any("screened out" in line for line in lines)


def test_a_time_budget_spent_before_any_trial_ends_the_search_with_nothing_to_refine(tmp_path, store):
    raw = tiny_config(tmp_path)
    raw["search"].update({"num_trials": 4, "time_budget_s": 0.5, "refine": {"epochs": 1.0, "candidates": 2}})
    lines: list[str] = []
    result = run_search(validate(raw), config_name="spent", tracking_uri=store, out=lines.append)
    parent = MlflowClient(store).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == 0
    assert any(line.startswith("stopped: the time budget of 0.5 s was spent (0 trials recorded)") for line in lines)
    assert not any(line.startswith("refining") for line in lines)


def test_time_budget_bounds_the_whole_command_and_refine_share_fills_its_part(tmp_path, store):
    # search.time_budget_s is wall time for the whole command; with refine.share the trials stop when
    # that share of it is left and the refinement's epochs are as many as fit (at least refine.epochs).
    # 70 s: room for the dense reference, Ray's start and a few trials on a 2-core machine running
    # another test beside it (`make test` runs two at a time; 36 s saw no trial end there, and 50 s none
    # on a fresh clone beside the kill loops: the trials get until 0.4 of it is left, less the re-timing),
    # and a trial count no machine finishes in it (CI's ran 200 tiny trials in 45 s): the budget must stop it
    budget, share = 70.0, 0.4
    raw = tiny_config(tmp_path)
    raw["search"].update({"num_trials": 100_000, "time_budget_s": budget, "refine": {"epochs": 0.2, "candidates": 2, "share": share}})
    lines: list[tuple[float, str]] = []
    started = time.perf_counter()
    result = run_search(validate(raw), config_name="refined", tracking_uri=store,
                        out=lambda line: lines.append((time.perf_counter() - started, line)))
    wall = time.perf_counter() - started
    client = MlflowClient(store)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert 0 < parent.data.metrics["trials_completed"] < 100_000
    assert any(line.startswith(f"stopped: the time budget of {budget:g} s was spent") for _, line in lines)
    assert not any("interrupted" in line for _, line in lines)
    assert any("re-measuring the latency" in line or "not re-timing the frontier" in line for _, line in lines)
    refined = [r for r in children(client, result, "trial") + children(client, result, "baseline")
               if r.data.tags.get("secateurs.refined") == "true"]
    # the chosen are refined, unless the machine got slower than the trials planned with (CI runs another
    # test beside this one): then a fine-tune still running when the re-timing must start is stopped
    stopped = [line for _, line in lines if "stopped at the time budget before its" in line]
    announced = [(t, line) for t, line in lines if line.startswith("refining up to 2 frontier policies")]
    assert len(announced) == 1, lines
    at, line = announced[0]
    # "up to 2" of the frontier as ranked: fewer only when the first was stopped at the deadline or the
    # frontier had no other policy (one policy when the trials before the share left a frontier of one)
    chosen = chosen_before(parent.data.tags)
    assert 1 <= len(chosen) <= 2, (chosen, lines)
    if len(chosen) < 2:
        assert stopped or any(l.strip().startswith("1 refined: the frontier as ranked has no other policy")
                              for _, l in lines), lines
    # each chosen policy was refined, or named as stopped before its epochs ended (a slower machine)
    named = {c for c in chosen if any(l.strip().startswith(c[:12] + ":") for l in stopped)}
    assert len(refined) + len(stopped) == len(chosen) and {r.info.run_id for r in refined} | named == set(chosen), lines
    epochs = float(re.search(r"policies: ([0-9.]+) epochs", line).group(1))
    assert epochs > 0.2, line  # a trial's fine-tune of 0.2 epochs takes well under a second: the share fits many more
    assert "search.refine.share" in line
    assert parent.data.tags["secateurs.refine_epochs"] == f"{epochs:g}"
    for run in refined:
        m = run.data.metrics
        assert m["refine_epochs"] == epochs and m["time_refine_s"] > 0 and 0 <= m["accuracy_in_search"] <= 1
        history = sorted(client.get_metric_history(run.info.run_id, "accuracy"), key=lambda h: h.step)
        assert [h.step for h in history] == [0, 2] and m["accuracy"] == history[-1].value
        assert m["accuracy_drop"] == pytest.approx(result.dense["accuracy"] - m["accuracy"])
    # the trials left the refinement its share of the budget, and the refinement used it, within the budget
    timeline = "\n".join(f"{t:6.1f} s  {line}" for t, line in lines)
    assert budget - at >= 0.75 * share * budget, f"refinement started at {at:.1f} s of {budget:g}:\n{timeline}"
    ended = min(t for t, line in lines if "re-measuring the latency" in line or "not re-timing the frontier" in line)
    assert ended - at >= 0.25 * share * budget, timeline
    if not stopped:
        assert sum(r.data.metrics["time_refine_s"] for r in refined) >= 0.25 * share * budget
    # the re-timing and the report are inside the budget too (Ray's shut-down may add a moment)
    assert wall <= budget + 5, f"the command took {wall:.1f} s on a budget of {budget:g} s:\n{timeline}"
    # the frontier compares the accuracies at one fidelity (search.fidelity): the refined ones as
    # measured, the others with the gain the refined pairs predict less its error; frontier.csv shows them
    trials = load_search(result.parent_run_id, store).trials
    if not refined:  # all stopped: the frontier is the search's own
        assert "refine_epochs" not in trials and trials["pareto"].any()
        return
    done = trials["refine_epochs"].notna()
    assert done.sum() == len(refined) and (trials.loc[done, "accuracy_expected"] == trials.loc[done, "accuracy"]).all()
    fine = frontier.feasible_mask(trials)
    assert (trials.loc[done, "accuracy_expected_error"] == 0).all() and (trials.loc[fine & ~done, "accuracy_expected_error"] >= 0).all()
    ranked_at = trials["accuracy_expected"] - trials["accuracy_expected_error"]
    at_one_fidelity = trials.loc[fine].assign(accuracy=ranked_at)[["accuracy", "latency_ms", "size_mb"]].to_numpy(float)
    assert trials.loc[fine, "pareto"].tolist() == frontier.non_dominated(at_one_fidelity, ["max", "min", "min"]).tolist()
    csv = pd.read_csv(client.download_artifacts(result.parent_run_id, "frontier.csv", str(tmp_path)))
    assert {"accuracy", "accuracy_expected", "accuracy_expected_error"} <= set(csv.columns)
