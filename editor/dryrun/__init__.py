"""``skill-editor run RECIPE --dry-run``: validate a recipe and print the plan — no weights, no
network, nothing written. ``estimate`` checks and counts (data schemas, sizes, memory); ``render``
prints what it found."""

from editor.dryrun.estimate import KNOWN_DATASETS, DryRun, estimate, model_shape, parameter_count
from editor.dryrun.render import human_bytes, render


def dry_run(recipe_path, *, model: str | None = None) -> str:
    """The printed plan of ``recipe_path`` (``model``: overrides the recipe's ``model:``, e.g. a local
    directory holding only the config.json of the Hub model)."""
    return render(estimate(recipe_path, model=model))


__all__ = ["KNOWN_DATASETS", "DryRun", "dry_run", "estimate", "human_bytes", "model_shape", "parameter_count", "render"]
