"""The shipped Hugging Face configs searched end to end (real local Ray, MLflow on a temporary sqlite
file, reduced data and epochs via overrides), the picked LM exported as a save_pretrained directory
that from_pretrained reloads with the metric pick reported, and bad input refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from evaluators.batches import call, logits_of
from evaluators.hf.pruning import layer_shapes, parameter_count
from evaluators.tasks import make_task
from search.cli import main
from search.config import load_config
from search.driver import run_search
from tests.data import DATA_DIRS, data_root

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

REDUCED = {  # the shipped configs, smaller: 6 trials, little data, short training
    "hf_llama_lm.yaml": ["task.options.train_size=600", "task.options.test_size=120", "task.dense_epochs=2"],
    "hf_bert_sst2.yaml": ["task.options.train_size=800", "task.options.test_size=200", "task.options.vocab_size=800",
                          "task.dense_epochs=2"],
}
COMMON = ["search.num_trials=6", "search.population_size=4", "search.seed=1", "finetune.epochs=0.25",
          "measure.warmup=1", "measure.repeats=3"]


def use_sst2(monkeypatch) -> None:
    """Point $SECATEURS_DATA at the SST-2 file the shipped configs read (``.ci/run`` sets it to
    ../shared/data), or skip on a machine that does not have it."""
    root = data_root("sst2.csv")
    if root is None:
        pytest.skip(f"sst2.csv is in none of {', '.join(map(str, DATA_DIRS))}")
    monkeypatch.setenv("SECATEURS_DATA", str(root))


def search(name: str, tmp_path: Path, store: str):
    overrides = [*REDUCED[name], *COMMON, f"search.storage_path={tmp_path / 'ray'}"]
    config = load_config(ROOT / "configs" / name, overrides)
    result = run_search(config, config_name=name, tracking_uri=store, out=lambda line: None)
    client = MlflowClient(store)
    runs = client.search_runs([result.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
                              max_results=1000)
    trials = [r for r in runs if r.data.tags.get("secateurs.kind") in ("trial", "baseline")]
    policies = [json.loads(Path(client.download_artifacts(r.info.run_id, "policy.json", str(tmp_path))).read_text())
                for r in trials]
    return config, result, trials, policies


def assert_heads_neurons_and_layers_pruned(result, trials, policies, attention: str, mlp: str) -> None:
    assert sum(r.data.tags.get("secateurs.kind") == "trial" for r in trials) == 6
    dense_params = result.dense["params"]
    assert any(r.data.metrics["params"] < dense_params for r in trials)
    assert any(ratio > 0 for p in policies for g, ratio in p["ratios"].items() if g.endswith(attention))
    assert any(ratio > 0 for p in policies for g, ratio in p["ratios"].items() if g.endswith(mlp))
    assert any(p["drop_blocks"] for p in policies)


def test_llama_lm_search_then_pick_out_reloads_with_the_reported_perplexity(tmp_path, store, capsys, monkeypatch):
    use_sst2(monkeypatch)
    config, result, trials, policies = search("hf_llama_lm.yaml", tmp_path, store)
    assert_heads_neurons_and_layers_pruned(result, trials, policies, ".self_attn", ".mlp")
    assert all(r.data.metrics["tokens_per_s"] > 0 for r in trials)
    assert {p["gqa"] for p in policies} <= {"kv_groups", "query_heads"}

    out = tmp_path / "picked"
    code = main(["pick", result.parent_run_id, "--tracking-uri", store, "--out", str(out), "--register", "tiny-llama"])
    assert code == 0, capsys.readouterr().err
    assert {"config.json", "model.safetensors", "tokenizer.json", "model.onnx", "model.pt2"} <= {p.name for p in out.iterdir()}
    reported = json.loads((out / "metrics.json").read_text())["final"]["perplexity"]
    policy = json.loads((out / "policy.json").read_text())
    saved = json.loads((out / "config.json").read_text())

    import evaluators.hf  # noqa: F401  registers the secateurs_* model types (per-layer shapes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == make_task(config.task).tokenizer.get_vocab()
    shapes = layer_shapes(model)
    assert len(shapes) == saved["num_hidden_layers"] == 4 - len(policy["drop_blocks"])
    for shape in shapes:  # GQA whole: query heads a multiple of the key/value heads kept
        assert shape.num_attention_heads % shape.num_key_value_heads == 0
    task = make_task(config.task)
    assert task.score(model)["perplexity"] == reported  # exactly the number pick reported
    ids = task.example()["input_ids"][:1, :4]
    assert model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)

    registered = mlflow.pytorch.load_model("models:/tiny-llama@candidate")
    inputs = task.example()
    with torch.no_grad():
        assert torch.allclose(registered(*inputs.values()), logits_of(call(model, inputs)), atol=1e-4)
    assert parameter_count(model) < result.dense["params"]


def test_bert_sst2_search_prunes_heads_neurons_and_layers(tmp_path, store, monkeypatch):
    use_sst2(monkeypatch)
    _, result, trials, policies = search("hf_bert_sst2.yaml", tmp_path, store)
    assert_heads_neurons_and_layers_pruned(result, trials, policies, ".attention.self", ".intermediate")
    assert all(0.0 <= r.data.metrics["accuracy"] <= 1.0 for r in trials)


def _config(tmp_path: Path, task: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(f"task:\n{task}\nsearch: {{objectives: {{perplexity: min, latency_ms: min}}}}\n")
    return str(path)


@pytest.mark.parametrize("case", ["no_config", "family", "gqa", "seq_len", "every_layer"])
def test_bad_input_is_one_line_before_any_trial_and_writes_nothing(case, tmp_path, store, capsys, monkeypatch):
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    monkeypatch.setenv("SECATEURS_CACHE", str(cache))
    llama = str(ROOT / "configs" / "hf_llama_lm.yaml")
    if case in ("gqa", "every_layer"):
        use_sst2(monkeypatch)  # the shipped config's data are checked before its space
    if case == "no_config":
        (tmp_path / "empty").mkdir()
        argv, match = [_config(tmp_path, f"  name: hf_causal_lm\n  model: {tmp_path / 'empty'}")], "has no config.json"
    elif case == "family":
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
        argv = [_config(tmp_path, f"  name: hf_causal_lm\n  model: {tmp_path / 'gpt2'}")]
        match = "model_type 'gpt2' is not a family secateurs can prune; supported: llama"
    elif case == "gqa":  # 7 of 8 query heads in 4 key-value groups of 2
        argv = [llama, "--set", 'space.rules=[{match: "model.layers.*.self_attn", ratio: 0.125}]', "--set", "space.gqa=[kv_groups]",
                "--set", "task.options.train_size=200"]
        match = "breaks grouped-query attention"
    elif case == "every_layer":  # keep or drop each of the layers, none excluded: one policy drops them all
        argv = [llama, "--set", "space.depth.choice=per_block", "--set", "space.depth.max_drop=null"]
        match = "a policy could remove all 4 layers"
    else:
        argv, match = [llama, "--set", "task.options.seq_len=128"], "128 is above the model's max_position_embeddings (64)"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["search", *argv, "--tracking-uri", f"sqlite:///{tmp_path / 'bad.db'}"]) == 2  # a store not made yet
    err = capsys.readouterr().err
    assert err.startswith("secateurs: error: ") and err.count("\n") == 1 and match in err, err
    if case == "gqa":
        assert "valid ratios: 0, 0.25, 0.5, 0.75" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no bad.db, no ray results
    assert not cache.exists() or not any(cache.rglob("*.pt"))  # no dense model trained
