"""Training recipes: named sets of option values, and the per-network defaults inside them.

Two recipes (``--recipe``):

* ``default`` (issue 10's recommendation, chosen on val and the robustness suite):
  ``bn_cnn``, per-image standardisation, the affine warp with zoom 0.25 plus intensity
  transforms, AdamW (learning rate 2e-3, weight decay 0.05, not on biases and batch norm),
  one epoch of linear warmup, cosine decay to 1 %, label smoothing 0.1, 12 epochs, no early
  stopping, the last epoch shipped, a 13-minute training time budget.
* ``seed``: the old recipe exactly: ``manual_cnn``, x/255, the old ImageDataGenerator
  affine ranges (zoom 0.1) and no intensity transform, Adam 1e-3 constant, plain binary
  cross-entropy, 10 epochs with early stopping (patience 3 on val AUC), the best val AUC
  shipped, no time budget.

Within the default recipe some values follow the network (``NETWORK_RECIPE``): zoom 0.25
and learning rate 2e-3 for ``bn_cnn``; zoom 0.1 and learning rate 1e-3 for the others
(the research found the stronger zoom and rate did not help ``manual_cnn``).

A value given explicitly (a command-line flag, or a keyword of :func:`train_config`) always
wins over the recipe's; every other recipe-controlled option takes the recipe's value for the
chosen network. Python::

    from pneumo_models.recipes import train_config
    config = train_config()                                  # == TrainConfig()
    config = train_config("seed", data_dir="data/xray")      # the old recipe
    config = train_config(model="manual_cnn")                # zoom 0.1, learning rate 1e-3

No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from pneumo_data.common.errors import UserError
from pneumo_data.config import AugmentConfig

RECIPES = ("default", "seed")

# Default recipe, per network (the rest of the recipe is the same for every network).
NETWORK_RECIPE = {
    "bn_cnn": {"zoom": 0.25, "learning_rate": 2e-3},
    "manual_cnn": {"zoom": 0.1, "learning_rate": 1e-3},
    "vgg16": {"zoom": 0.1, "learning_rate": 1e-3},
    "resnet50": {"zoom": 0.1, "learning_rate": 1e-3},
}

_DEFAULT = {
    "model": "bn_cnn", "preprocessing": "auto", "crop": 0.0, "dropout": None,
    **dataclasses.asdict(AugmentConfig()),
    "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 1.0, "schedule": "cosine",
    "lr_floor": 0.01, "label_smoothing": 0.1,
    "epochs": 12, "early_stopping_patience": 0, "ship": "last", "time_budget_minutes": 13.0,
}
_SEED = {
    "model": "manual_cnn", "preprocessing": "unit", "crop": 0.0, "dropout": None,
    **dataclasses.asdict(AugmentConfig.seed_recipe()),
    "optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0.0,
    "schedule": "constant", "lr_floor": 0.01, "label_smoothing": 0.0,
    "epochs": 10, "early_stopping_patience": 3, "ship": "best", "time_budget_minutes": 0.0,
}
RECIPE_LEAVES = frozenset(_DEFAULT) | {"learning_rate"}  # the options a recipe sets


def network_zoom(model: str) -> float:
    """The default recipe's zoom for ``model``."""
    return NETWORK_RECIPE.get(model, NETWORK_RECIPE["manual_cnn"])["zoom"]


def recipe_values(recipe: str, model: str | None = None) -> dict[str, Any]:
    """Every option ``recipe`` sets, for network ``model`` (default: the recipe's own)."""
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    values = dict(_DEFAULT if recipe == "default" else _SEED)
    if model is not None:
        values["model"] = model
    if recipe == "seed" and values["model"] not in ("bn_cnn", "manual_cnn"):
        values["preprocessing"] = "auto"  # the backbones take their ImageNet preprocessing
    if recipe == "default":
        if values["model"] not in NETWORK_RECIPE:
            raise UserError(f"unknown model {values['model']!r}; choose one of "
                            f"{tuple(NETWORK_RECIPE)}")
        values.update(NETWORK_RECIPE[values["model"]])
    assert set(values) == RECIPE_LEAVES, set(values) ^ RECIPE_LEAVES
    return values


def resolve(config, given: Iterable[str]):
    """``config`` with every recipe-controlled option not in ``given`` set to the value of
    ``config.recipe`` for ``config``'s network. ``given``: the names of the options the user
    set explicitly (their values in ``config`` are kept)."""
    from pneumo_data.common.config import with_leaves
    given = set(given)
    values = recipe_values(config.recipe, None if "model" not in given
                           else config.network.model)
    return with_leaves(config, **{k: v for k, v in values.items() if k not in given})


def train_config(recipe: str = "default", **options):
    """A :class:`pneumo_models.train.TrainConfig` for ``recipe``, ``options`` (leaf names, as
    the flags) overriding it: the Python equivalent of ``--recipe=RECIPE --name=value ...``."""
    from pneumo_data.common.config import with_leaves
    from pneumo_models.train import TrainConfig
    if "recipe" in options:
        raise TypeError("pass the recipe as the first argument")
    config = with_leaves(TrainConfig(), recipe=recipe, **options)
    return resolve(config, options)
