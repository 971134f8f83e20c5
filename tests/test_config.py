"""The config tree: dotted overrides, validation errors that name the field, round trips."""

from __future__ import annotations

import pytest

from dualssl.config import Config, ConfigError


def test_dotted_overrides_are_parsed_to_field_types():
    cfg = Config().with_overrides(["loss.tau=0.2", "data.spacing=2,2,3", "model.widths=8,16,32,64",
                                   "eval.tta_flips=true", "optim.epochs=3"])
    assert cfg.loss.tau == 0.2
    assert cfg.data.spacing == (2.0, 2.0, 3.0)
    assert cfg.model.widths == (8, 16, 32, 64)
    assert cfg.eval.tta_flips is True
    assert cfg.optim.epochs == 3
    cfg.validate()


@pytest.mark.parametrize("override, field", [
    ("loss.tau=0", "loss.tau"),
    ("loss.tau=-0.1", "loss.tau"),
    ("loss.corruption_ratio=1.5", "loss.corruption_ratio"),
    ("loss.corruption_ratio=-0.1", "loss.corruption_ratio"),
    ("loss.lambda_con=-1", "loss.lambda_con"),
    ("loss.lambda_rec=-0.5", "loss.lambda_rec"),
    ("data.patch_size=30,32,32", "data.patch_size"),
    ("model.widths=8,16,32", "model.widths"),
    ("optim.amp=fp8", "optim.amp"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config().with_overrides([override]).validate()


def test_unknown_fields_and_bad_types_are_clear_errors():
    with pytest.raises(ConfigError, match="loss.temperature: unknown field"):
        Config().set("loss.temperature", 0.1)
    with pytest.raises(ConfigError, match="optim.epochs: cannot read"):
        Config().set("optim.epochs", "many")
    with pytest.raises(ConfigError, match="expected key=value"):
        Config().with_overrides(["loss.tau"])


def test_round_trip_through_yaml_and_flat_names(tmp_path):
    cfg = Config().with_overrides({"loss.lambda_con": 0.3, "data.source_sites": "a,b"})
    cfg.save(tmp_path / "c.yaml")
    back = Config.load(tmp_path / "c.yaml")
    assert back == cfg
    assert back.hash() == cfg.hash()
    flat = cfg.flat()
    assert flat["loss.lambda_con"] == 0.3 and flat["data.source_sites"] == ["a", "b"]
    assert Config().hash() != cfg.hash()


def test_zero_lambdas_switch_branches_off():
    cfg = Config().with_overrides(["loss.lambda_con=0", "loss.lambda_rec=0"]).validate()
    assert not cfg.loss.contrastive_on and not cfg.loss.restoration_on
