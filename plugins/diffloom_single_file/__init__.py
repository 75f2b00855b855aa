"""Single-file checkpoints (the original Stable Diffusion layout): ``from_single_file`` on pipelines and models,
``pipe.save_single_file``, and the ``diffloom convert`` command. This module stays light: it names things only."""

from diffloom import hookimpl


@hookimpl
def register_adapters(register):
    # The core's from_single_file classmethods and the save_single_file method delegate here.
    register("single_file", f"{__name__}.loader:SingleFile", methods=["save_single_file"],
             class_methods=["from_single_file"])


@hookimpl
def register_commands(register):
    register("convert", f"{__name__}.cli:convert_command",
             help="convert between a single-file checkpoint and a diffusers folder (either direction)")
