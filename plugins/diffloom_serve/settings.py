"""What a generate request may ask for, checked field by field before anything reaches the pipeline.

A request is a JSON object with the fields of :data:`FIELDS`; every one but ``prompt`` may be left out and then
takes the model's default. Anything else (an unknown field, a wrong type, a value out of bounds) is refused with
a :class:`RequestError` that names the field and says what would be accepted, so the server answers 4xx and
never hands the pipeline something it did not plan for. No field reaches ``from_pretrained``: the model, its
code and its components are fixed when the server starts.
"""

from __future__ import annotations

import json
import math

MAX_PROMPT = 1000  # characters; CLIP reads 77 tokens anyway, this only keeps requests small
MAX_BODY = 64 * 1024  # bytes of a request body
STEPS = (1, 150)
GUIDANCE = (0.0, 30.0)
NUM_IMAGES = (1, 4)
SIZE = (64, 1024)  # widened to take in the model's own default size
SEED = (0, 2 ** 32 - 1)

# field -> what it holds, as the error messages say it
FIELDS = {
    "prompt": "text",
    "negative_prompt": "text",
    "steps": "an integer",
    "guidance": "a number",
    "scheduler": "a scheduler name",
    "seed": "an integer, or null for a random one",
    "width": "an integer",
    "height": "an integer",
    "num_images": "an integer",
}


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP code, ``field`` the field at fault (if one is)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def as_dict(self) -> dict:
        return {"error": self.message, **({"field": self.field} if self.field else {})}


def parse_body(body: bytes) -> dict:
    """The JSON object in a request body."""
    if len(body) > MAX_BODY:
        raise RequestError(413, f"the request body has {len(body)} bytes; at most {MAX_BODY} are accepted")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON ({e}); send an object such as "
                                f'{{"prompt": "a red circle"}}') from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"the request body must be a JSON object of settings, not a JSON "
                                f"{type(payload).__name__}")
    return payload


def limits(default_size: tuple[int, int], size_factor: int) -> dict:
    """The bounds the page and the checks use."""
    smallest, largest = min(SIZE[0], *default_size), max(SIZE[1], *default_size)
    return {"prompt_chars": MAX_PROMPT, "steps": list(STEPS), "guidance": list(GUIDANCE),
            "num_images": list(NUM_IMAGES), "size": [smallest, largest], "size_multiple": size_factor,
            "seed": list(SEED)}


def validate(payload: dict, defaults: dict, schedulers: list[str], bounds: dict) -> dict:
    """The complete settings of a request: every field checked, the missing ones filled from ``defaults``.

    ``seed`` stays ``None`` when the request leaves it to chance; the job draws it.
    """
    unknown = [name for name in payload if name not in FIELDS]
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}", unknown[0])
    if "prompt" not in payload:
        raise RequestError(422, "prompt is missing: say what to draw, e.g. \"a red circle\"", "prompt")
    settings = {name: payload.get(name, defaults.get(name)) for name in FIELDS}

    if settings["negative_prompt"] is None:
        settings["negative_prompt"] = ""  # null: no negative prompt
    for name in ("prompt", "negative_prompt"):
        value = settings[name]
        if not isinstance(value, str):
            raise RequestError(422, f"{name} must be {FIELDS[name]}, not {_json_type(value)}", name)
        if len(value) > MAX_PROMPT:
            raise RequestError(422, f"{name} has {len(value)} characters; at most {MAX_PROMPT} are accepted", name)

    _integer(settings, "steps", *bounds["steps"])
    _integer(settings, "num_images", *bounds["num_images"])
    low, high = bounds["size"]
    multiple = bounds["size_multiple"]
    for name in ("width", "height"):
        value = _integer(settings, name, low, high)
        if value % multiple:
            lower = max(low, value - value % multiple)
            raise RequestError(422, f"{name}={value} is not a multiple of {multiple} (the VAE's downsampling "
                                    f"factor); try {lower} or {min(high, lower + multiple)}", name)
    if settings["seed"] is not None:
        _integer(settings, "seed", *bounds["seed"])

    guidance = settings["guidance"]
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise RequestError(422, f"guidance must be {FIELDS['guidance']}, not {_json_type(guidance)}", "guidance")
    low, high = bounds["guidance"]
    if not low <= guidance <= high:
        raise RequestError(422, f"guidance={guidance} is out of bounds; give {low} to {high} (1 turns guidance "
                                f"off)", "guidance")
    settings["guidance"] = float(guidance)

    scheduler = settings["scheduler"]
    if not isinstance(scheduler, str):
        raise RequestError(422, f"scheduler must be {FIELDS['scheduler']}, not {_json_type(scheduler)}",
                           "scheduler")
    if scheduler not in schedulers:
        raise RequestError(400, f"unknown scheduler {scheduler!r}; the registered ones are "
                                f"{', '.join(schedulers)}", "scheduler")
    return settings


def _integer(settings: dict, name: str, low: int, high: int) -> int:
    value = settings[name]
    if isinstance(value, float) and value.is_integer():
        value = settings[name] = int(value)  # JSON has one number type: 20.0 is 20
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(422, f"{name} must be {FIELDS[name]}, not {_json_type(value)}", name)
    if not low <= value <= high:
        raise RequestError(422, f"{name}={value} is out of bounds; give {low} to {high}", name)
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40])}"
    return "an array" if isinstance(value, list) else "an object"
