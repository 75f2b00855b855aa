"""The outputs folder: finished images with their settings inside, listed back as the gallery.

Each PNG carries two text chunks: ``diffloom``, JSON with the request's settings and where the image sits in
its batch (read back by the gallery; the page's "use these settings" fills its form from it), and
``parameters``, the same in the plain-text form other Stable Diffusion tools read.

The server hands out only files it wrote: a name must have the shape of :func:`image_name`, stay inside the
folder and carry the ``diffloom`` chunk; anything else is refused without touching other paths.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

METADATA_KEY = "diffloom"
_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{12}-\d\.png")


class RefusedName(LookupError):
    """A requested file name the server will not serve: ``status`` is 400 (a name it never makes) or 404."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def image_name(stamp: str, job_id: str, index: int) -> str:
    """``20261125-071500-1a2b3c4d5e6f-0.png``: the time the job finished, the job, the image's place in it.
    Sorting names sorts by time."""
    return f"{stamp}-{job_id[:12]}-{index}.png"


def parameters_text(metadata: dict) -> str:
    """The A1111-style ``parameters`` text of one image."""
    s = metadata["settings"]
    lines = [s["prompt"]]
    if s["negative_prompt"]:
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    lines.append(f"Steps: {s['steps']}, Sampler: {s['scheduler']}, CFG scale: {s['guidance']}, "
                 f"Seed: {metadata['image_seed']}, Size: {s['width']}x{s['height']}, Model: {metadata['model']}")
    return "\n".join(lines)


def save_image(image, folder: Path, name: str, metadata: dict) -> Path:
    """Write ``image`` as ``folder/name`` with its metadata; a reader never sees a half-written file."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata))
    info.add_text("parameters", parameters_text(metadata))
    path = folder / name
    partial = folder / f".{name}.partial"
    image.save(partial, format="PNG", pnginfo=info)
    os.replace(partial, path)
    return path


def read_metadata(path: Path) -> dict | None:
    """The ``diffloom`` metadata of a PNG, or ``None`` when it has none (or is no PNG)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(METADATA_KEY)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if text is None:
        return None
    try:
        metadata = json.loads(text)
    except ValueError:
        return None
    return metadata if isinstance(metadata, dict) and isinstance(metadata.get("settings"), dict) else None


def output_file(folder: Path, name: str) -> Path:
    """The path of an image the server wrote, from a name a request gave."""
    if not _NAME.fullmatch(name):
        raise RefusedName(400, f"{name!r} is not the name of an image this server writes (they look like "
                              f"20261125-071500-1a2b3c4d5e6f-0.png)")
    path = folder / name
    # The pattern admits no separator or dot-dot; resolving catches a link that points elsewhere.
    if path.resolve().parent != folder.resolve() or not path.is_file() or read_metadata(path) is None:
        raise RefusedName(404, f"no image {name!r} in the outputs folder")
    return path


def list_outputs(folder: Path) -> list[dict]:
    """Every image the server wrote into ``folder``, newest first, with its metadata."""
    items = []
    for path in sorted(folder.glob("*.png"), reverse=True):
        if not _NAME.fullmatch(path.name) or path.resolve().parent != folder.resolve():
            continue
        metadata = read_metadata(path)
        if metadata is not None:
            items.append({"name": path.name, "url": f"/outputs/{path.name}", **metadata})
    return items
