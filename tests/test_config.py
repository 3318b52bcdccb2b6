"""Typed configs: YAML + overrides, one-line errors naming the field, stable hashes."""

import pytest
from pydantic import ValidationError

from prism_ray.config import BaseConfig, ConfigError, build_config, load_config, parse_overrides
from prism_ray.data.config import DataConfig
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.models.config import ModelConfig


class JobConfig(BaseConfig):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    inversion: InversionConfig = InversionConfig()
    edit: EditConfig = EditConfig()


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  manifest: memory://m.parquet\ninversion:\n  num_inner_steps: 5\n")
    cfg = load_config(JobConfig, path, ["inversion.guidance_scale=3", "edit.reweight=null", "model.path=/x"])
    assert cfg.inversion.num_inner_steps == 5
    assert cfg.inversion.guidance_scale == 3.0
    assert cfg.edit.reweight is None
    assert cfg.model.path == "/x"
    # Reference defaults (docs/method.md §15) are the defaults.
    assert cfg.inversion.num_inference_steps == 50 and cfg.inversion.learning_rate == 1e-2
    assert cfg.edit.cross_replace_steps == 0.8 and cfg.edit.self_replace_steps == 0.5


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["data.manifest=a.csv", "inversion.bogus=1"], "inversion.bogus"),  # unknown key
        (["data.manifest=a.csv", "inversion.num_inner_steps=ten"], "inversion.num_inner_steps"),  # type
        (["data.manifest=a.csv", "edit.cross_replace_steps=1.5"], "edit.cross_replace_steps"),  # range
        (["data.manifest=a.csv", "model.dtype=float64"], "model.dtype"),  # not one of the choices
        ([], "data"),  # required section missing
    ],
)
def test_errors_are_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        build_config(JobConfig, {}, overrides)
    message = str(err.value)
    assert "\n" not in message
    assert f"'{field}'" in message


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(JobConfig, tmp_path / "nope.yaml")


def test_hash_is_stable_and_sensitive():
    a = build_config(JobConfig, {"data": {"manifest": "m.csv"}})
    b = build_config(JobConfig, {"data": {"manifest": "m.csv"}, "inversion": {"num_inner_steps": 10}})
    c = build_config(JobConfig, {"data": {"manifest": "m.csv"}}, ["inversion.num_inner_steps=9"])
    assert a.config_hash() == b.config_hash()  # same values, whether written or defaulted
    assert a.config_hash() != c.config_hash()
    assert len(a.config_hash()) == 16
    # Round trip through YAML keeps the hash: configs are serialisable.
    import yaml

    again = build_config(JobConfig, yaml.safe_load(a.to_yaml()))
    assert again == a and again.config_hash() == a.config_hash()


def test_configs_are_frozen():
    cfg = build_config(JobConfig, {"data": {"manifest": "m.csv"}})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.inversion.num_inner_steps = 3


def test_list_items_are_overridden_by_index_and_yaml_errors_name_the_line(tmp_path):
    from prism_ray.config import apply_overrides

    tree = {"subgroups": [{"name": "a", "quota": 1}, {"name": "b", "quota": 2}], "model": {"path": "x", "dtype": "f"}}
    out = apply_overrides(tree, ["subgroups.1.quota=5", "model={path: y}"])
    assert out["subgroups"][1] == {"name": "b", "quota": 5} and out["model"] == {"path": "y", "dtype": "f"}
    assert tree["subgroups"][1]["quota"] == 2  # the input is not changed
    with pytest.raises(ConfigError, match=r"'subgroups.5': index 5 out of range \(2 items\)"):
        apply_overrides(tree, ["subgroups.5.quota=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' line 3, column 2: not valid YAML") as err:
        load_config(BaseConfig, bad)
    assert "\n" not in str(err.value)


def test_settings_added_later_leave_results_ids_unchanged_while_unset():
    """Results ids hash the method settings; a setting added after results were written enters only when
    it is set (or, for the DDPM noise seed, only where it acts), so finished work keeps its ids."""
    from prism_ray.engine.settings import EditConfig, InversionConfig

    assert "edit_guidance" not in EditConfig().identity() and "per_intervention" not in EditConfig().identity()
    assert EditConfig(edit_guidance=0.0).identity()["edit_guidance"] == 0.0  # set, even to a falsy value
    assert EditConfig(per_intervention={"Cardiomegaly": {"reweight": 3.0}}).identity()["per_intervention"]
    assert "noise_seed" not in InversionConfig().identity()
    assert InversionConfig(method="ddpm", noise_seed=3).identity()["noise_seed"] == 3
    assert InversionConfig(method="ddpm").identity() != InversionConfig(method="ddpm", noise_seed=1).identity()


def test_every_missing_field_is_named_and_an_unknown_key_gets_the_nearest_one():
    """Issue 28.17: a bare `prism-ray augment` names both missing fields; typos get a suggestion."""
    from prism_ray.pipelines.augment import AugmentConfig

    with pytest.raises(ConfigError) as err:
        build_config(AugmentConfig, {})
    assert str(err.value) == "config fields 'subgroups', 'output': Field required"
    data = {"outptu": "x", "subgroups": [{"name": "a", "quotaa": 3}], "data": {"manifest": "m"},
            "compute": {"batch_sise": 3}, "xyzzy": 1}
    with pytest.raises(ConfigError) as err:
        build_config(AugmentConfig, data)
    message = str(err.value)
    assert "\n" not in message
    for field, close in [("outptu", "output"), ("subgroups.0.quotaa", "quota"), ("compute.batch_sise", "batch_size")]:
        assert f"config field '{field}': unknown key, did you mean '{close}'?" in message
    assert "config field 'xyzzy': unknown key" in message and "'xyzzy': unknown key," not in message
    assert "config field 'output': Field required" in message
