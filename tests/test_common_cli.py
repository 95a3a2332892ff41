"""The command-line and config contract every algorithm script shares (one parametrised test instead of seven
copies): --resume parses in any position, a mistyped option or an invalid common field is an error naming it,
and an unknown dataset id fails before anything trains, with a suggestion."""
import pytest

import aca
import cal_ql
import data
import iql
import o2ppo
import o2sac
import o2td3
import pex

MODULES = [iql, cal_ql, o2sac, o2td3, o2ppo, aca, pex]


@pytest.fixture(params=MODULES, ids=lambda m: m.__name__)
def module(request):
    return request.param


def test_resume_flag_parses_in_any_position(module):
    assert module.parse_config(["--resume", "--seed", "3"]).resume is True
    cfg = module.parse_config(["--seed", "3", "--resume"])
    assert cfg.resume is True and cfg.seed == 3
    cfg = module.parse_config(["--overwrite", "--seed", "3"])
    assert cfg.overwrite is True and cfg.resume is False


def test_run_dir_checks_come_before_the_data(module, tmp_path, monkeypatch):
    """A previous run in run_dir is refused without --resume / --overwrite, before the dataset is touched."""
    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the run-directory checks")
    monkeypatch.setattr(data, "load_dataset", no_data)
    (tmp_path / "eval.jsonl").write_text('{"phase": "offline"}\n')
    cfg = module.TrainConfig(run_dir=str(tmp_path), wandb_mode="disabled")
    with pytest.raises(module.RunError, match="holds a previous run; add --resume"):
        module.train(cfg)


def test_help_shows_each_fields_inline_comment(module, capsys):
    """--help describes a field by its inline comment, also the first field under a section-header comment."""
    import inspect
    import re
    with pytest.raises(SystemExit):
        module.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    source = inspect.getsource(module.TrainConfig).splitlines()
    checked = 0
    for above, line in zip(source, source[1:]):
        field = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if field and above.strip().startswith("#"):  # the field right below a section header
            words = " ".join(field.group(2).split()[:4])
            assert f"--{field.group(1)} " in text and words in text, (field.group(1), words)
            checked += 1
    assert checked > 0


def test_mistyped_option_is_an_error(module, capsys):
    with pytest.raises(SystemExit):  # pyrallis/argparse: an unknown option stops with a usage message
        module.parse_config(["--seeed", "3"])
    assert "seeed" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, match", [
    ("wandb_mode", "of", "wandb_mode must be online|offline|disabled"),
    ("num_seeds", 0, "num_seeds must be > 0"),
    ("precision", "fp16", "precision must be one of float32|bf16"),
])
def test_invalid_common_fields_name_themselves(module, field, value, match):
    with pytest.raises(ValueError, match=match):
        module.TrainConfig(**{field: value})


def test_unknown_dataset_fails_with_a_suggestion(module, tmp_path):
    cfg = module.TrainConfig(dataset_id="o2o/hoper/medium-v0", run_dir=str(tmp_path / "run"), wandb_mode="disabled")
    with pytest.raises(data.DatasetError, match="unknown local dataset id 'o2o/hoper/medium-v0'; did you mean o2o/hopper/medium-v0"):
        module.train(cfg)
