"""A denoising-loop hook: counts the steps every pipeline call runs, per pipeline class.

Loop hooks receive the pipeline, the per-call state and (for step hooks) the step; see
``diffloom.hookspecs`` for every execution point and what each may change.
"""

from collections import Counter

from diffloom import hookimpl

steps_run = Counter()


@hookimpl
def on_step_end(pipe, call, step):
    steps_run[type(pipe).__name__] += 1
