"""ModuliConfig validation and JSON round trip; CLI wiring."""

from __future__ import annotations

import pytest

from moduli_transform.cli import build_parser
from moduli_transform.config import ModuliConfig

CONFIGS = [
    ModuliConfig(),
    ModuliConfig(manifold="klein", inhibitor="ricker", sparsity=0.95, schedule="cubic", total_steps=50),
    ModuliConfig(targets=["recurrent", "re:.*h2h.*"], prune_also=["decoder.weight"], scope="global"),
    ModuliConfig(embedding="trained", control="shuffled", power=2, reduction="sum", seed=3, auto=True),
    ModuliConfig(manifold="euclidean", manifold_options={"dim": 5}, inhibitor_options={"invert": False}),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_round_trips_through_json(config):
    assert ModuliConfig.from_json(config.to_json()) == config
    assert ModuliConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize("options, message", [
    (dict(control="random"), "unknown control 'random'; expected one of moduli, l1, shuffled, none"),
    (dict(power=3), "power must be 1 or 2, got 3"),
    (dict(total_steps=0), "total_steps must be >= 1, got 0"),
    (dict(strength=-1.0), "strength must be >= 0"),
    (dict(scope="layer"), "unknown scope 'layer'"),
    (dict(targets=[]), "targets is an empty list"),
])
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        ModuliConfig(**options)


def test_unknown_config_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown config keys \['sparsty'\]"):
        ModuliConfig.from_dict({"sparsty": 0.9})


def test_callables_are_recorded_by_name():
    def my_schedule(step: int) -> float:
        return 0.5

    assert ModuliConfig(schedule=my_schedule).to_dict()["schedule"].endswith("my_schedule")


def test_cli_lists_the_library_inspect_command():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert "inspect" in subcommands
