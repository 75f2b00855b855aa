"""The main job on the command line: ``diffloom generate``, ``diffloom info`` and ``diffloom batch``.

This module stays light (``diffloom --help`` must not import torch): it names the commands, whose modules are
imported when one is run. The commands use only diffloom's public API, as a user's script would:
``DiffusionPipeline.from_pretrained``, the registry, and the registered hook classes.

With no ``--model``, both use the model shipped inside this package (``shipped/shapes-128``): a small Stable
Diffusion pipeline trained here on coloured shapes (see training/train_shapes.py), so the first command works
without any download.
"""

from diffloom import hookimpl


@hookimpl
def register_commands(register):
    register("generate", f"{__name__}.generate:generate_command",
             help="make an image from a prompt (default model: the shipped shapes-128)")
    register("info", f"{__name__}.info:info_command",
             help="a pipeline's components: classes, parameter counts, dtypes")
    register("batch", f"{__name__}.batch:batch_command", help="many prompts from a JSON-lines file, resumable, "
             "on this process, torchrun workers or Ray actors")
