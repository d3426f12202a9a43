"""Recipes: --recipe fills the options the user left alone, explicit options win."""

from __future__ import annotations

import pytest
from absl import flags

from pneumo_data.common.config import config_from_flags, define_flags
from pneumo_data.common.errors import UserError
from pneumo_data.config import AugmentConfig
from pneumo_models import recipes
from pneumo_models.train import TrainConfig, train_config


def parse(*argv):
    values = flags.FlagValues()
    define_flags(TrainConfig, values)
    values(["train", *argv])
    return config_from_flags(TrainConfig, values)


def test_default_recipe_is_the_config_defaults():
    assert parse() == TrainConfig() == train_config()
    c = TrainConfig()
    assert c.network.model == "bn_cnn" and c.optimizer.optimizer == "adamw"
    assert c.ship == "last" and c.epochs == 12 and c.early_stopping_patience == 0


def test_seed_recipe_is_the_seed_exactly():
    c = parse("--recipe=seed")
    assert c.network.model == "manual_cnn" and c.network.resolved_preprocessing == "unit"
    assert c.pipeline.augmentation == AugmentConfig.seed_recipe()
    o = c.optimizer
    assert (o.optimizer, o.learning_rate, o.weight_decay, o.schedule, o.warmup_epochs,
            o.label_smoothing) == ("adam", 1e-3, 0.0, "constant", 0.0, 0.0)
    assert (c.epochs, c.early_stopping_patience, c.ship, c.time_budget_minutes) == \
        (10, 3, "best", 0.0)
    assert c == train_config("seed")


def test_explicit_options_win_and_the_network_picks_its_recipe_values():
    c = parse("--recipe=seed", "--epochs=4", "--zoom=0.2")
    assert c.epochs == 4 and c.pipeline.augmentation.zoom == 0.2
    assert c.network.model == "manual_cnn"
    m = parse("--model=manual_cnn")  # default recipe, the seed network
    assert m.pipeline.augmentation.zoom == 0.1 and m.optimizer.learning_rate == 1e-3
    assert m.optimizer.optimizer == "adamw" and m.ship == "last"
    assert parse("--model=manual_cnn", "--learning_rate=5e-3").optimizer.learning_rate == 5e-3
    # the same in Python
    assert train_config(model="manual_cnn") == m


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(UserError, match="unknown recipe"):
        recipes.recipe_values("fast", {})
    with pytest.raises(flags.IllegalFlagValueError):
        parse("--recipe=fast")


def test_seed_recipe_with_a_backbone_keeps_its_imagenet_preprocessing():
    c = parse("--recipe=seed", "--model=vgg16")
    assert c.network.resolved_preprocessing == "caffe"
    c.validate()
