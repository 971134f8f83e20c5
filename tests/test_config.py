"""The config tree: dotted overrides, validation errors that name the field, round trips."""

from __future__ import annotations

import numpy as np
import pytest

from dualssl.config import VALIDATION_METRICS, Config, ConfigError


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


def test_branch_switches_follow_the_lambdas():
    off = Config().with_overrides(["loss.lambda_con=0", "loss.lambda_rec=0"]).validate()
    assert (off.loss.lambda_con, off.loss.lambda_rec) == (0.0, 0.0)
    assert (off.loss.contrastive_on, off.loss.restoration_on) == (False, False)
    on = Config().with_overrides(["loss.lambda_con=0.001", "loss.lambda_rec=0"]).validate()
    assert (on.loss.contrastive_on, on.loss.restoration_on) == (True, False)


@pytest.mark.parametrize("value", ["1.5", 1.5, "2.7", True, "three", "nan", float("inf"), [3]])
def test_int_fields_refuse_what_is_not_a_whole_number(value):
    # The old parser read "1.5" as int(float("1.5")) == 1 and True as 1.
    with pytest.raises(ConfigError, match=r"optim\.epochs: .*whole number"):
        Config().set("optim.epochs", value)


@pytest.mark.parametrize("value, expected", [(3, 3), ("3", 3), (" 12 ", 12), (4.0, 4), ("4.0", 4), ("1e2", 100),
                                             (np.int64(7), 7)])
def test_int_fields_read_whole_numbers(value, expected):
    cfg = Config()
    cfg.set("optim.epochs", value)
    assert cfg.optim.epochs == expected and type(cfg.optim.epochs) is int


@pytest.mark.parametrize("value", [2, -1, 1.0, 0.0, "2", "maybe", None])
def test_bool_fields_refuse_other_values(value):
    # The old parser gave bool(2) is True and bool(1.0) is True.
    with pytest.raises(ConfigError, match=r"eval\.tta_flips: cannot read .* as a boolean"):
        Config().set("eval.tta_flips", value)


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False), ("yes", True),
                                             ("Off", False), ("1", True), ("false", False), (np.bool_(True), True)])
def test_bool_fields_read_booleans(value, expected):
    cfg = Config()
    cfg.set("eval.tta_flips", value)
    assert cfg.eval.tta_flips is expected


def test_float_fields_refuse_booleans_and_non_finite_numbers():
    for value in (True, "nan", float("inf"), "fast"):
        with pytest.raises(ConfigError, match=r"optim\.lr: "):
            Config().set("optim.lr", value)
    cfg = Config()
    cfg.set("optim.lr", "3e-4")
    assert cfg.optim.lr == 3e-4


def test_text_fields_refuse_numbers_and_lists_strip_spaces():
    with pytest.raises(ConfigError, match=r"data\.root: expected text"):
        Config().set("data.root", 5)
    cfg = Config().with_overrides(["data.source_sites=a, b ,c"])
    assert cfg.data.source_sites == ["a", "b", "c"]


@pytest.mark.parametrize("field, bad, allowed", [
    ("optim.amp", "fp8", "auto, bf16, fp16, off"),
    ("loss.rec_loss", "huber", "l1, mse"),
    ("data.domain_aug", "mixup", "none, bigaug, randconv, gin"),
    ("eval.selection_metric", "val_loss", "val_dice, val_dice_patch"),
    ("eval.cheap_metric", "mean_unseen_dice", "val_dice, val_dice_patch"),
])
def test_choice_fields_list_the_allowed_values(field, bad, allowed):
    with pytest.raises(ConfigError, match=f"{field.replace('.', '[.]')}: '{bad}' is not allowed; choose one of {allowed}"):
        Config().set(field, bad)
    # plain assignment skips set(); validate() still refuses it
    cfg = Config()
    section, key = field.split(".")
    setattr(getattr(cfg, section), key, bad)
    with pytest.raises(ConfigError, match=f"{field.replace('.', '[.]')}: '{bad}'"):
        cfg.validate()


def test_yaml_booleans_for_choice_fields_say_to_quote(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  amp: off\n")  # YAML 1.1 reads unquoted off as false
    with pytest.raises(ConfigError, match="optim.amp: False is not allowed.*quote"):
        Config.load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("optim:\n  amp: 'off'\n")
    assert Config.load(tmp_path / "d.yaml").optim.amp == "off"


def test_selection_metrics_are_the_ones_the_trainer_reports():
    assert VALIDATION_METRICS == ("val_dice", "val_dice_patch")
    assert Config().eval.selection_metric in VALIDATION_METRICS and Config().eval.cheap_metric in VALIDATION_METRICS


def test_more_classes_than_the_merged_labels_are_refused():
    cfg = Config().with_overrides(["model.num_classes=3"])
    cfg.model.validate()  # the architecture alone can build 3 outputs ...
    with pytest.raises(ConfigError, match=r"model\.num_classes: 3 classes .*merges every label.*num_classes=2"):
        cfg.validate()  # ... but a run cannot train them on {0, 1} labels
    with pytest.raises(ConfigError, match=r"model\.num_classes"):
        Config().with_overrides(["model.num_classes=1"]).validate()
