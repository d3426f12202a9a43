import dataclasses

import pytest
from absl import flags

from pneumo_data.common.config import (
    config_from_dict,
    config_from_flags,
    config_to_dict,
    config_to_flagfile,
    define_flags,
    group,
    leaves,
    option,
    with_leaves,
)
from pneumo_models.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = option(0.1, "A rate.")
    name: str | None = option(None, "A name.")


@dataclasses.dataclass(frozen=True)
class Outer:
    epochs: int = option(3, "Epochs.")
    mode: str = option("a", "Mode.", choices=("a", "b"))
    sizes: tuple = option((1, 2), "Sizes.")
    inner: Inner = group(Inner)


@dataclasses.dataclass(frozen=True)
class Clash:
    rate: int = option(1, "Clashes with Inner.rate.")
    inner: Inner = group(Inner)


def test_nested_config_flags_are_flat_and_round_trip(tmp_path):
    values = flags.FlagValues()
    define_flags(Outer, values)
    assert {"epochs", "mode", "sizes", "rate", "name"} <= set(values)
    values(["job", "--epochs=5", "--rate=0.5", "--mode=b", "--sizes=3,4"])
    config = config_from_flags(Outer, values)
    assert config == Outer(epochs=5, mode="b", sizes=("3", "4"), inner=Inner(rate=0.5))
    flagfile = tmp_path / "run.flags"
    flagfile.write_text(config_to_flagfile(config))
    again = flags.FlagValues()
    define_flags(Outer, again)
    again(["job", f"--flagfile={flagfile}"])
    assert config_from_flags(Outer, again) == config
    assert config_from_dict(Outer, config_to_dict(config)) == config
    # strict: a record missing a leaf (an older version's) is refused, not filled
    assert config_from_dict(Outer, config_to_dict(config), strict=True) == config
    partial = config_to_dict(config)
    del partial["inner"]["rate"]
    assert config_from_dict(Outer, partial) == Outer(epochs=5, mode="b", sizes=("3", "4"))
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['rate'\]"):
        config_from_dict(Outer, partial, strict=True)


def test_leaf_names_must_be_unique_across_the_tree():
    with pytest.raises(TypeError, match="same flag name"):
        define_flags(Clash, flags.FlagValues())


def test_with_leaves_sets_fields_wherever_they_sit():
    config = with_leaves(TrainConfig(), epochs=2, batch_size=8, model="vgg16", rotation_deg=0.0)
    assert (config.epochs, config.pipeline.batch_size, config.network.model,
            config.pipeline.augmentation.rotation_deg) == (2, 8, "vgg16", 0.0)
    assert leaves(config)["batch_size"] == 8
    with pytest.raises(TypeError, match="no leaf"):
        with_leaves(TrainConfig(), batchsize=8)
    with pytest.raises(ValueError, match="no field"):
        config_from_dict(TrainConfig, {"epoch": 1})


def test_train_config_flags_cover_every_leaf_once():
    values = flags.FlagValues()
    define_flags(TrainConfig, values)
    names = set(leaves(TrainConfig()))
    assert names <= set(values)
    assert {"batch_size", "model", "learning_rate", "rotation_deg", "deterministic"} <= names


@dataclasses.dataclass(frozen=True)
class WithPreset:
    preset: str = option("small", "Preset.", choices=("small", "large"))
    epochs: int = option(3, "Epochs.")
    inner: Inner = group(Inner)

    @classmethod
    def resolve_given(cls, config, given):
        values = {"small": {"epochs": 3, "rate": 0.1}, "large": {"epochs": 30, "rate": 0.5}}
        return with_leaves(config, **{k: v for k, v in values[config.preset].items()
                                      if k not in given})


def test_resolve_given_sees_which_flags_were_given(tmp_path):
    def parse(*argv):
        values = flags.FlagValues()
        define_flags(WithPreset, values)
        values(["job", *argv])
        return config_from_flags(WithPreset, values)

    assert parse() == WithPreset()
    assert parse("--preset=large") == WithPreset("large", 30, Inner(rate=0.5))
    assert parse("--preset=large", "--epochs=3") == WithPreset("large", 3, Inner(rate=0.5))
    # a value equal to the default still counts as given
    assert parse("--preset=large", "--rate=0.1").inner.rate == 0.1
    # flags from a --flagfile count as given, so a written flagfile reproduces its config
    config = WithPreset("large", 7, Inner(rate=0.25))
    flagfile = tmp_path / "run.flags"
    flagfile.write_text(config_to_flagfile(config))
    assert parse(f"--flagfile={flagfile}") == config
