"""``diffloom generate PROMPT``: text to image, with the shipped model unless ``--model`` names another.

Settings not given on the command line come from the model's ``diffloom_defaults.json`` (steps, guidance,
scheduler), then from the pipeline's own defaults. The first Ctrl-C asks the pipeline to stop after the step it
is running (through a step-end hook that sets the call's interrupt flag); the image is then decoded from the
latents reached so far and written as usual. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import math
import re
import secrets
import signal
import sys
import threading
from pathlib import Path

from diffloom import hookimpl
from diffloom.cli import UsageError

from .models import (DEFAULTS_FILE, DTYPES, default_device, load_pipeline, model_source, one_line, sampling_defaults,
                     scheduler_class, writable_parent)


def generate_command(parser):
    parser.add_argument("prompt", help="what to draw, e.g. \"a red circle on a white background\"")
    parser.add_argument("-o", "--output", metavar="PATH",
                        help="image file to write (.png, .jpg, .webp...), or a folder; default: a name made "
                             "from the prompt and the seed, in the current folder")
    parser.add_argument("--model", metavar="FOLDER_OR_HUB_ID",
                        help="pipeline folder (diffusers layout) or Hub repo id; default: the shipped shapes-128")
    parser.add_argument("--negative", metavar="PROMPT", help="negative prompt: what to steer away from")
    parser.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the model's)")
    parser.add_argument("--scheduler", metavar="NAME",
                        help="sampler, any registered scheduler (see `diffloom schedulers`), built from the "
                             "model's scheduler config")
    parser.add_argument("--guidance", type=float, metavar="SCALE",
                        help="classifier-free guidance scale; 1 turns guidance off (default: the model's)")
    parser.add_argument("--seed", type=int, help="random seed (printed when chosen for you)")
    parser.add_argument("--size", metavar="WxH", help="image size, WIDTHxHEIGHT or N for a square; multiples of 8")
    parser.add_argument("--num-images", type=int, default=1, metavar="N",
                        help="images to make (seeds SEED, SEED+1...), saved as one grid")
    parser.add_argument("--lora", metavar="PATH[:SCALE]", help="LoRA weights to apply, with an optional strength")
    parser.add_argument("--preview-dir", metavar="FOLDER", help="write a latent preview of every step here")
    parser.add_argument("--device", help="torch device (default: cuda if available, else mps, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: float16 on a GPU, float32 on the CPU")
    return run


def run(args) -> int:
    import torch

    from diffloom import make_image_grid

    size = parse_size(args.size) if args.size else None
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: give at least 1 step")
    if args.num_images < 1:
        raise UsageError(f"--num-images {args.num_images}: give at least 1")
    lora = parse_lora(args.lora) if args.lora else None
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and not output.is_dir():
        check_image_suffix(output)

    source = model_source(args.model)
    chosen_scheduler = scheduler_class(args.scheduler) if args.scheduler else None  # a typo fails before loading
    device = args.device or default_device()
    dtype = args.dtype or ("float32" if device == "cpu" else "float16")
    pipe = load_pipeline(source, dtype, device)
    defaults = sampling_defaults(source)
    if chosen_scheduler is None and "scheduler" in defaults:
        chosen_scheduler = scheduler_class(defaults["scheduler"], label=f"{DEFAULTS_FILE} of {source}: scheduler")
    if chosen_scheduler is not None and type(pipe.scheduler) is not chosen_scheduler:
        pipe.scheduler = chosen_scheduler.from_config(pipe.scheduler.config)

    call = {"prompt": args.prompt, "num_images_per_prompt": args.num_images}
    steps = args.steps or defaults.get("num_inference_steps")
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance_scale")
    if steps is not None:
        call["num_inference_steps"] = steps
    if guidance is not None:
        call["guidance_scale"] = guidance
    if args.negative is not None:
        call["negative_prompt"] = args.negative
    if size is not None:
        factor = getattr(pipe, "vae_scale_factor", 8)
        width, height = size
        if width % factor or height % factor:
            raise UsageError(f"--size {args.size}: width and height must be multiples of {factor} "
                             f"(try {round_to(width, factor)}x{round_to(height, factor)})")
        call["width"], call["height"] = width, height
    if lora is not None:
        apply_lora(pipe, *lora)
        call["cross_attention_kwargs"] = {"scale": lora[1]}

    seed = args.seed
    if seed is None:
        seed = secrets.randbelow(2 ** 32)
        print(f"seed {seed} (chosen at random; pass --seed {seed} to make this image again)", file=sys.stderr)
    # One CPU generator per image: image k of a batch is the image of seed+k alone, on any device.
    call["generator"] = [torch.Generator("cpu").manual_seed(seed + k) for k in range(args.num_images)]

    stop = StopAfterStep()
    hooks = [stop]
    if args.preview_dir:
        from diffloom.registry import registry

        hooks.append(registry.get("callback", "LatentPreview")(args.preview_dir))
    with stop.on_ctrl_c():
        images = pipe(**call, hooks=hooks).images

    image = images[0] if len(images) == 1 else make_image_grid(images, *grid_shape(len(images)))
    path = output_path(output, args.prompt, seed)
    writable_parent(path, "-o")
    image.save(path)
    if stop.stopped_after is not None:
        total = steps if steps is not None else "all"
        print(f"interrupted after step {stop.stopped_after} of {total}; wrote the image so far", file=sys.stderr)
    print(path)
    return 130 if stop.stopped_after is not None else 0


class StopAfterStep:
    """Step-end hook: once ``request()`` was called, set the running call's interrupt flag, so the pipeline
    finishes the step it is in, skips the rest and decodes what it has."""

    def __init__(self):
        self.requested = False
        self.stopped_after = None

    def request(self):
        self.requested = True

    @hookimpl
    def on_step_end(self, pipe, call, step):
        if self.requested and not call.interrupt:
            call.interrupt = True
            self.stopped_after = step.index + 1

    def on_ctrl_c(self):
        """A context in which the first Ctrl-C calls ``request()`` and a second one aborts."""
        return _CtrlC(self)


class _CtrlC:
    def __init__(self, stop: StopAfterStep):
        self.stop = stop
        self.previous = None

    def handle(self, signum, frame):
        if self.stop.requested:
            raise KeyboardInterrupt
        self.stop.request()
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# -- parsing -------------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480); '512' -> (512, 512)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", text)
    if not match:
        raise UsageError(f"--size {text}: write WIDTHxHEIGHT (e.g. 128x96) or one number for a square")
    width = int(match[1])
    height = int(match[2]) if match[2] else width
    if width == 0 or height == 0:
        raise UsageError(f"--size {text}: width and height must be positive")
    return width, height


def round_to(value: int, factor: int) -> int:
    return max(factor, round(value / factor) * factor)


def parse_lora(text: str) -> tuple[str, float]:
    """'path' or 'path:0.8' (a Windows drive letter's colon is left alone)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", scale):
        return path, float(scale)
    return text, 1.0


def apply_lora(pipe, path: str, scale: float):
    try:
        load = pipe.load_lora_weights
    except AttributeError:
        raise UsageError(f"--lora: {type(pipe).__name__} cannot load LoRA weights (it has no load_lora_weights); "
                         f"install or enable a LoRA adapter plugin (see `diffloom plugins`)") from None
    try:
        load(path)
    except (OSError, LookupError, ValueError) as e:
        raise UsageError(f"--lora {path}: {one_line(e)}") from None


def check_image_suffix(path: Path):
    from PIL import Image

    Image.init()
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise UsageError(f"-o {path}: cannot tell the image format from {path.suffix or 'a missing suffix'!r}; "
                         f"end the name with .png, .jpg or .webp")


def output_path(output: Path | None, prompt: str, seed: int) -> Path:
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:60].rstrip("-") or "image"
    name = f"{slug}-{seed}.png"
    if output is None:
        return Path(name)
    return output / name if output.is_dir() else output


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the squarest grid that holds exactly n images."""
    cols = next(c for c in range(math.ceil(math.sqrt(n)), n + 1) if n % c == 0)
    return n // cols, cols
