"""The README's contributor example, run as written: a new criterion, a new unit kind and a new
granularity, each one class and one registry entry, prune a small model end to end."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from evaluators import granularities, pruning, units
from evaluators.criteria import CRITERIA
from spaces import Policy
from spaces.policy import GRANULARITIES as GRANULARITY_NAMES

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Contributing: add a criterion, a unit kind or a granularity"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the contributor section has no python example"
    return "\n".join(blocks)


@pytest.fixture
def example():
    """The README's code executed, and the registries put back as they were afterwards."""
    saved = [(registry, dict(registry)) for registry in (CRITERIA, units.UNIT_KINDS, granularities.GRANULARITIES, GRANULARITY_NAMES)]
    namespace: dict = {"__name__": "readme_example"}
    try:
        exec(compile(readme_example(), str(README), "exec"), namespace)
        yield namespace
    finally:
        for registry, before in saved:
            registry.clear()
            registry.update(before)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mlp, self.head = nn.Linear(6, 8), Mlp(8, 12), nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        return self.head(x + self.mlp(x))


def test_the_readme_example_adds_a_criterion_a_unit_kind_and_a_granularity(example):
    torch.manual_seed(0)
    dense, x = Net().eval(), torch.randn(5, 6)
    groups = {g.name: g for g in pruning.discover_groups(dense, x[:1], ["structured"])}
    assert groups["mlp"].kind == "mlp-neurons" and groups["mlp"].size == 12
    assert "mlp.fc1" not in groups and "embed" in groups  # the neurons are the new kind's; the residual width stays a channel group
    assert [g.name for g in pruning.discover_groups(dense, x[:1], ["neurons"])] == ["mlp"]
    assert "mlp-neurons" in CRITERIA["peak"].kinds and "conv" not in CRITERIA["peak"].kinds

    policy = Policy("peak", {"mlp": 0.5}, granularity="neurons")
    assert Policy.from_json(policy.to_json()) == policy  # spaces learned the granularity
    model = pruning.apply(policy, copy.deepcopy(dense), x[:1])
    assert model.mlp.fc1.out_features == 6 and model.mlp.fc2.in_features == 6
    # peak, by definition: the largest |w| among a neuron's fc1 row and fc2 column; the 6 lowest go
    peak = torch.maximum(dense.mlp.fc1.weight.abs().amax(1), dense.mlp.fc2.weight.abs().amax(0))
    dropped = torch.argsort(peak, stable=True)[:6]
    silenced = copy.deepcopy(dense)
    with torch.no_grad():
        silenced.mlp.fc2.weight[:, dropped] = 0.0
        assert torch.allclose(model(x), silenced(x), atol=1e-6)
    rebuilt = pruning.restore(policy, copy.deepcopy(dense), x[:1], model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))

    with pytest.raises(pruning.PruningError, match="criterion 'peak' does not apply to linear group 'embed'"):
        pruning.apply(Policy("peak", {"embed": 0.5}, granularity="structured"), copy.deepcopy(dense), x[:1])
    # built-in criteria score the new kind too (l2: its scorer unit_scores)
    assert pruning.apply(Policy("l2", {"mlp": 0.25}, granularity="structured"), copy.deepcopy(dense), x[:1]).mlp.fc1.out_features == 9


def test_a_registry_entry_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="unknown granularities \\['blocks'\\]"):
        class Blocks(units.UnitKind):
            name, kinds, granularities = "blocks", ("block",), ("blocks",)

        units.register_unit_kind(Blocks())
    with pytest.raises(ValueError, match="group kind 'attention-heads' with 'weight_scores'"):
        class Heads(units.UnitKind):
            name, kinds, scorer = "heads", ("attention-heads",), "weight_scores"

        units.register_unit_kind(Heads())
    with pytest.raises(ValueError, match="implements no scorer"):
        pruning.register_criterion(type("Nothing", (pruning.Criterion,), {"name": "nothing"})())
    assert "nothing" not in CRITERIA and "blocks" not in units.UNIT_KINDS
