"""Every YAML in configs/ loads into its algorithm's dataclass, is complete, names a known dataset, and matches
what configs/make_configs.py writes from the dataclass defaults (so configs cannot drift)."""
import dataclasses
import importlib
import sys
from pathlib import Path

import pyrallis
import pytest
import yaml

import data

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(CONFIGS))
import make_configs  # noqa: E402

ALGORITHMS = {algo: spec["module"] for algo, spec in make_configs.ALGOS.items()}  # configs/<dir>/ -> module
YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml"))


def module_for(path: Path):
    algo = path.relative_to(CONFIGS).parts[0]
    assert algo in ALGORITHMS, f"{path}: no algorithm file for configs/{algo}/"
    return importlib.import_module(ALGORITHMS[algo])


def test_every_algorithm_has_its_configs():
    for algo in ALGORITHMS:
        files = {str(p.relative_to(CONFIGS / algo)) for p in (CONFIGS / algo).rglob("*.yaml")}
        assert "quickstart.yaml" in files
        assert {f"o2o/{e}/{lvl}-v0.yaml" for e in ("hopper", "walker2d", "halfcheetah")
                for lvl in ("medium", "medium-replay", "medium-expert", "expert")} <= files
        assert {f"D4RL/antmaze/{m}-v1.yaml" for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse",
                                                       "large-play", "large-diverse")} <= files
        if "adroit" in make_configs.ALGOS[algo]["groups"]:
            assert {f"D4RL/{t}/cloned-v2.yaml" for t in ("pen", "door", "relocate")} <= files


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_loads_into_dataclass(path):
    module = module_for(path)
    with open(path) as f:  # pyrallis.load decodes like --config_path (unknown keys raise) without the CLI set-up
        cfg = pyrallis.load(module.TrainConfig, f)
    raw = yaml.safe_load(path.read_text())
    fields = {f.name for f in dataclasses.fields(module.TrainConfig)}
    assert set(raw) == fields, f"{path} is not complete: missing {fields - set(raw)}"
    if path.name != "quickstart.yaml":
        assert str(path.relative_to(CONFIGS / path.relative_to(CONFIGS).parts[0])) == cfg.dataset_id + ".yaml"
    ds = cfg.dataset_id
    assert ds in data.KNOWN_REMOTE or data.parse_local_id(ds) is not None


def test_yaml_typo_and_bad_value_are_errors(tmp_path):
    import iql
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "iql" / "quickstart.yaml").read_text() + "expectle: 0.7\n")
    with pytest.raises(Exception, match="expectle"):
        pyrallis.parse(config_class=iql.TrainConfig, config_path=str(bad), args=[])
    bad.write_text((CONFIGS / "iql" / "quickstart.yaml").read_text().replace("update_block: 1000", "update_block: 300"))
    with pytest.raises(Exception, match="multiple of update_block"):
        pyrallis.parse(config_class=iql.TrainConfig, config_path=str(bad), args=[])


def test_yamls_match_the_generator():
    assert make_configs.main(["--check"]) == 0, "run: python configs/make_configs.py"
