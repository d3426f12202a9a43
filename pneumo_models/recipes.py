"""Training recipes: named sets of option values, and the per-network values inside them.

Two recipes (``--recipe``):

* ``default``: the config dataclasses' own defaults (``TrainConfig()`` is the default recipe
  for ``bn_cnn``; issue 10's recommendation, chosen on val and the robustness suite): ``bn_cnn``,
  per-image standardisation, the affine warp with zoom 0.25 plus intensity transforms, AdamW
  (learning rate 2e-3, weight decay 0.05, not on biases and batch norm), one epoch of linear
  warmup, cosine decay to 1 %, label smoothing 0.1, 12 epochs, no early stopping, the last
  epoch shipped, a 13-minute training time budget. The defaults live in the dataclasses only;
  this module lists what changes with the network (:data:`NETWORK_RECIPE`).
* ``seed``: the old recipe exactly (:data:`SEED`): ``manual_cnn``, x/255, the old
  ImageDataGenerator affine ranges (zoom 0.1) and no intensity transform, Adam 1e-3 constant,
  plain binary cross-entropy, 10 epochs with early stopping (patience 3 on val AUC), the best
  val AUC shipped, no time budget.

A value given explicitly (a command-line flag, or a keyword of
:func:`pneumo_models.train.train_config`) always wins over the recipe's; every other
recipe-controlled option (:data:`RECIPE_LEAVES`) takes the recipe's value for the chosen
network. Python::

    from pneumo_models.train import train_config
    config = train_config()                                  # == TrainConfig()
    config = train_config("seed", data_dir="data/xray")      # the old recipe
    config = train_config(model="manual_cnn")                # zoom 0.1, learning rate 1e-3

No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from pneumo_data.common.config import leaves, with_leaves
from pneumo_data.common.errors import UserError
from pneumo_data.config import AugmentConfig
from pneumo_models.config import MODELS

RECIPES = ("default", "seed")

# The options a recipe sets (every other option keeps its own default).
RECIPE_LEAVES = frozenset({
    "model", "preprocessing", "crop", "dropout",
    *(f.name for f in dataclasses.fields(AugmentConfig)),
    "optimizer", "learning_rate", "weight_decay", "warmup_epochs", "schedule", "lr_floor",
    "label_smoothing",
    "epochs", "early_stopping_patience", "ship", "bn_stats_images", "time_budget_minutes",
})

# The default recipe for networks other than bn_cnn (the research found the stronger zoom and
# learning rate did not help manual_cnn; the backbones keep the old ranges).
NETWORK_RECIPE = {
    "bn_cnn": {},
    "manual_cnn": {"zoom": 0.1, "learning_rate": 1e-3},
    "vgg16": {"zoom": 0.1, "learning_rate": 1e-3},
    "resnet50": {"zoom": 0.1, "learning_rate": 1e-3},
}
assert set(NETWORK_RECIPE) == set(MODELS)

SEED = {
    "model": "manual_cnn", "preprocessing": "unit", "crop": 0.0, "dropout": None,
    **dataclasses.asdict(AugmentConfig.seed_recipe()),
    "optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0.0,
    "schedule": "constant", "lr_floor": 0.01, "label_smoothing": 0.0,
    "epochs": 10, "early_stopping_patience": 3, "ship": "best", "bn_stats_images": 0,
    "time_budget_minutes": 0.0,
}
assert set(SEED) == RECIPE_LEAVES


def network_zoom(model: str) -> float:
    """The default recipe's zoom for ``model``."""
    return NETWORK_RECIPE.get(model, {}).get("zoom", AugmentConfig().zoom)


def recipe_values(recipe: str, defaults: dict[str, Any], model: str | None = None
                  ) -> dict[str, Any]:
    """Every option ``recipe`` sets, for network ``model`` (default: the recipe's own).

    ``defaults``: the leaves of the default config (``leaves(TrainConfig())``); the default
    recipe is these.
    """
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    values = {k: defaults[k] for k in RECIPE_LEAVES} if recipe == "default" else dict(SEED)
    if model is not None:
        values["model"] = model
    if recipe == "seed" and values["model"] not in ("bn_cnn", "manual_cnn"):
        values["preprocessing"] = "auto"  # the backbones take their ImageNet preprocessing
    if recipe == "default":
        if values["model"] not in NETWORK_RECIPE:
            raise UserError(f"unknown model {values['model']!r}; choose one of "
                            f"{tuple(NETWORK_RECIPE)}")
        values.update(NETWORK_RECIPE[values["model"]])
    return values


def resolve(config, given: Iterable[str]):
    """``config`` with every recipe-controlled option not in ``given`` set to the value of
    ``config.recipe`` for ``config``'s network. ``given``: the names of the options the user
    set explicitly (their values in ``config`` are kept)."""
    given = set(given)
    values = recipe_values(config.recipe, leaves(type(config)()),
                           None if "model" not in given else config.network.model)
    return with_leaves(config, **{k: v for k, v in values.items() if k not in given})
