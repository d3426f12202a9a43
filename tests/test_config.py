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
