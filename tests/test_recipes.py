"""sweeps/recipes.py: the recipes as pure objects, and as the `recipe` config group."""

import pytest

from sweeps.recipes import RECIPES, FixedRecipe, PolarLawRecipe, polar_batch_size, polar_lr
from tests.fixtures import job_config as compose


def test_fixed_recipe_is_the_same_for_every_size_unless_width_scaled():
    fixed = FixedRecipe(lr=2e-3, batch_size=16)
    assert fixed.batch_and_lr(10_000, 16, 1e6) == fixed.batch_and_lr(10**9, 2048, 1e9) == (16, 2e-3)
    scaled = FixedRecipe(lr=2e-3, batch_size=16, lr_width_ref=16)
    assert scaled.batch_and_lr(10_000, 16, 1e6) == (16, pytest.approx(2e-3))
    assert scaled.batch_and_lr(10_000, 64, 1e6) == (16, pytest.approx(5e-4))


def test_polar_law_follows_the_fitted_laws():
    law = PolarLawRecipe(backbone_tokens=2e12)
    batch, lr = law.batch_and_lr(5e8, 1024, 1e10)
    assert lr == pytest.approx(polar_lr(5e8, 2e12, 1e10)) and batch == round(polar_batch_size(5e8, 1e10))
    more_tokens = law.batch_and_lr(5e8, 1024, 1e11)
    assert more_tokens[0] > batch and more_tokens[1] > lr            # both grow with the RM's tokens
    assert PolarLawRecipe(backbone_tokens=8e12).batch_and_lr(5e8, 1024, 1e10)[1] < lr   # and LR falls with Dp


def test_bad_recipe_values_are_named():
    for kwargs, message in (({"lr": 0.0}, "recipe.lr must be > 0, got 0.0"),
                            ({"batch_size": -2}, "recipe.batch_size must be > 0, got -2"),
                            ({"lr_width_ref": -1}, "recipe.lr_width_ref must be >= 0")):
        with pytest.raises(ValueError, match=message):
            FixedRecipe(**kwargs)


def test_recipes_are_a_config_group():
    job = compose()
    assert type(job.recipe) is FixedRecipe and job.recipe == FixedRecipe(lr=3e-3, batch_size=32)
    law = compose("recipe=polar_law", "recipe.backbone_tokens=2.5e12").recipe
    assert law == PolarLawRecipe(backbone_tokens=2.5e12)
    assert compose("+experiment=cpu_ladder").recipe == FixedRecipe(lr=2e-3, batch_size=32, lr_width_ref=16)
    assert compose("+experiment=polar_paper").recipe == PolarLawRecipe(backbone_tokens=2e12)
    assert set(RECIPES) == {"fixed", "polar_law"}
    with pytest.raises(Exception, match="Could not override 'recipe.lr'"):       # polar_law has no lr
        compose("recipe=polar_law", "recipe.backbone_tokens=2e12", "recipe.lr=1e-3")
    with pytest.raises(Exception, match="recipe=polar_law needs recipe.backbone_tokens > 0"):
        compose("recipe=polar_law")


def test_the_run_key_holds_the_recipe():
    from dataclasses import replace

    from sweeps.jobs import run_key

    job = compose("budget.tokens=1e6")
    keys = {run_key(job), run_key(replace(job, recipe=FixedRecipe(lr=1e-3, batch_size=32))),
            run_key(replace(job, recipe=FixedRecipe(lr=3e-3, batch_size=16))),
            run_key(replace(job, recipe=FixedRecipe(lr=3e-3, batch_size=32, lr_width_ref=16))),
            run_key(replace(job, recipe=PolarLawRecipe(backbone_tokens=2e12))),
            run_key(replace(job, recipe=PolarLawRecipe(backbone_tokens=4e12)))}
    assert len(keys) == 6
    assert run_key(compose("budget.tokens=1e6")) == run_key(job)
