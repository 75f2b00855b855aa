"""Built-in hook classes: live previews and a step budget. They fire only where a user attaches them
(``hooks=[...]`` or ``pipe.hooks``), so this entry module registers names, not hook implementations."""

from diffloom import hookimpl


@hookimpl
def register_callbacks(register):
    register("LatentPreview", "diffloom_hooks.previews:LatentPreview")
    register("StepBudget", "diffloom_hooks.budget:StepBudget")
