"""``diffloom serve``: a local web UI with live step previews, a stop button and a gallery, plus a JSON API.

This entry module stays light (``diffloom plugins`` must import neither torch nor the web stack): it names the
command, whose module is imported when it runs. The server needs the optional extra ``diffloom[serve]``
(Starlette and uvicorn).
"""

from diffloom import hookimpl


@hookimpl
def register_commands(register):
    register("serve", f"{__name__}.command:serve_command",
             help="a local web UI with live previews, stop and a gallery, and a JSON API (needs diffloom[serve])")
