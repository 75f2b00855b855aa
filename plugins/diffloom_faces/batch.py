"""``diffloom batch PROMPTS.jsonl --out DIR``: many images, on one process, on torchrun workers or on Ray actors.

Each non-blank line of PROMPTS.jsonl is one JSON object, an *item*::

    {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 7, "steps": 20, "guidance": 2.0,
     "size": "128x96", "scheduler": "EulerDiscreteScheduler"}

Only ``prompt`` is required. A setting an item leaves out comes from the command line (``--steps``...), then
from the model's ``diffloom_defaults.json``, then from the pipeline's own defaults; the manifest records the
values used.

Three rules make the output independent of how the work is spread:

- An item's seed is its own ``seed``, else a hash of its line number and its content; never a worker's rank.
  Each item is made alone (batch of one) with a CPU generator, and PNGs are written without metadata, so one
  worker and N workers write byte-identical files.
- An item's identity (``id``) is a hash of its line number, its content, the command-line settings and the
  model. Its image is ``DIR/<line>-<id>.png``; editing a line makes a new image next to the old one.
- Every write is atomic (a temporary file, then ``os.replace``). A worker appends one manifest row per image,
  after the image is in place, to its own shard ``manifest.rank-N.jsonl``, so workers never share a file. The
  coordinator (the only process, torchrun's rank 0, or Ray's driver) merges the shards and ``manifest.jsonl``,
  keeping one row per id and only rows whose image exists, into ``manifest.jsonl`` before the work is shared
  out and again at the end. A killed run leaves finished images and rows; running the same command again makes
  only what is missing.

Engines (``--engine``):

- ``local``: this process.
- ``torchrun``: torch.distributed, one process per GPU (NCCL) or CPU worker (gloo). Launch it under
  ``torchrun --nproc-per-node N -m diffloom batch ... --engine torchrun``, or let it start N processes itself with
  ``--workers N``. Rank 0 plans, broadcasts the unfinished items, and each rank takes every N-th of them. On
  several nodes, DIR must be on a file system they share.
- ``ray``: Ray actors, each holding one pipeline (one GPU each on a cluster with GPUs, else one CPU). ``ray.init``
  joins the cluster named by ``RAY_ADDRESS``, or starts a local one. Actors send finished PNG bytes back to the
  driver, which writes them, so the workers need no shared file system.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from diffloom.cli import UsageError

from .generate import parse_size
from .models import (DEFAULTS_FILE, DTYPES, close_names, default_device, load_pipeline, model_source, one_line,
                     sampling_defaults, scheduler_class)

ENGINES = ("local", "torchrun", "ray")
# The keys an item may have, and the JSON types each accepts.
ITEM_KEYS = {"prompt": (str,), "negative_prompt": (str,), "seed": (int,), "steps": (int,),
             "guidance": (int, float), "size": (str, int), "scheduler": (str,)}
# Item keys that are settings: also given on the command line as --steps, --guidance, --size, --scheduler.
SETTING_KEYS = ("steps", "guidance", "size", "scheduler")
SIZE_MULTIPLE = 8  # the latent grid of Stable Diffusion's VAE
MANIFEST = "manifest.jsonl"
SHARD_GLOB = "manifest.rank-*.jsonl"
TEMP_NAME = re.compile(r"\..+\.\d+\.tmp")  # what atomic_write names its temporary files


def batch_command(parser):
    parser.add_argument("prompts", metavar="PROMPTS.jsonl",
                        help="one JSON object per line: {\"prompt\": ..., optional \"negative_prompt\", \"seed\", "
                             "\"steps\", \"guidance\", \"size\", \"scheduler\"}")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the images and manifest.jsonl")
    parser.add_argument("--model", metavar="FOLDER_OR_HUB_ID",
                        help="pipeline folder (diffusers layout) or Hub repo id; default: the shipped shapes-128")
    parser.add_argument("--steps", type=int, metavar="N", help="denoising steps of items that give none")
    parser.add_argument("--guidance", type=float, metavar="SCALE", help="guidance scale of items that give none")
    parser.add_argument("--size", metavar="WxH", help="image size of items that give none (multiples of 8)")
    parser.add_argument("--scheduler", metavar="NAME", help="scheduler of items that give none")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this process; torchrun: torch.distributed processes; ray: Ray actors")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="torchrun: start N processes (default: one per GPU; needed on a machine without "
                             "one), or leave it out when launched under torchrun; ray: N actors (default: one "
                             "per GPU of the cluster, else one per CPU)")
    parser.add_argument("--device", help="torch device of the local engine (default: cuda if available, else mps, "
                                         "else cpu); torchrun and ray workers use their own GPU, or the CPU")
    parser.add_argument("--dtype", choices=DTYPES, help="default: float16 on a GPU, float32 on the CPU")
    return run


def run(args) -> int:
    job = Job.from_args(args)
    if args.engine == "local":
        if args.workers is not None:
            raise UsageError("--workers: the local engine is this one process; use --engine torchrun or ray")
        return run_local(job, args.device)
    if args.device is not None:
        raise UsageError(f"--device: the {args.engine} engine puts each worker on its own GPU, or on the CPU "
                         f"when there is none; leave --device out")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: give at least 1")
    if args.engine == "torchrun":
        return run_torchrun(job, args.workers)
    return run_ray(job, args.workers)


# -- the job: items, settings, identities ----------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    line: int  # 1-based line number in PROMPTS.jsonl
    id: str
    prompt: str
    negative_prompt: str | None
    seed: int
    settings: dict  # the item's own settings, over the command line's; keys of SETTING_KEYS

    @property
    def file(self) -> str:
        return f"{self.line:06d}-{self.id[:12]}.png"


@dataclass
class Job:
    """What to make and where: everything a worker needs, plain and picklable."""
    out: str
    source: str
    items: list
    dtype: str | None

    @classmethod
    def from_args(cls, args) -> "Job":
        defaults = {}
        if args.steps is not None:
            defaults["steps"] = check_setting("--steps", "steps", args.steps)
        if args.guidance is not None:
            defaults["guidance"] = args.guidance
        if args.size is not None:
            defaults["size"] = check_setting("--size", "size", args.size)
        if args.scheduler is not None:
            defaults["scheduler"] = check_setting("--scheduler", "scheduler", args.scheduler)
        source = model_source(args.model)
        out = Path(args.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a folder (it is created if missing)")
        items = read_items(Path(args.prompts).expanduser(), defaults, source)
        return cls(str(out), source, items, args.dtype)


def read_items(path: Path, defaults: dict, source: str) -> list[Item]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give a JSON-lines file, one {{\"prompt\": ...}} per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read it: {one_line(e)}") from None
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            items.append(parse_item(line, number, path, defaults, source))
    if not items:
        raise UsageError(f"{path} has no items; write one JSON object per line, e.g. {{\"prompt\": \"a red circle\"}}")
    return items


def parse_item(line: str, number: int, path: Path, defaults: dict, source: str) -> Item:
    where = f"{path}, line {number}"
    try:
        data = json.loads(line)
    except ValueError as e:
        raise UsageError(f"{where}: not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a JSON object like {{\"prompt\": \"a red circle\"}}, "
                         f"got a {type(data).__name__}")
    for key, value in data.items():
        if key not in ITEM_KEYS:
            close = close_names(key, list(ITEM_KEYS))
            hint = f"did you mean {', '.join(close)}?" if close else f"the keys are {', '.join(ITEM_KEYS)}"
            raise UsageError(f"{where}: unknown setting {key!r}; {hint}")
        if not isinstance(value, ITEM_KEYS[key]) or isinstance(value, bool):
            kinds = " or ".join({str: "a string", int: "an integer", float: "a number"}[t] for t in ITEM_KEYS[key])
            raise UsageError(f"{where}: {key} must be {kinds}, not {json.dumps(value)}")
    if not data.get("prompt", "").strip():
        raise UsageError(f"{where}: no \"prompt\"; every item needs one, e.g. {{\"prompt\": \"a red circle\"}}")
    settings = dict(defaults)
    for key in SETTING_KEYS:
        if key in data:
            settings[key] = check_setting(f"{where}: {key}", key, data[key])
    seed = data.get("seed")
    if seed is None:
        seed = derived_seed(number, data)
    elif not 0 <= seed < 2 ** 64:
        raise UsageError(f"{where}: seed {seed} is out of range; give an integer from 0 to 2**64 - 1")
    identity = {"line": number, "item": data, "command_line": defaults, "model": source}
    return Item(line=number, id=digest(identity), prompt=data["prompt"], negative_prompt=data.get("negative_prompt"),
                seed=seed, settings=settings)


def check_setting(label: str, key: str, value):
    """A setting's value in its stored form: steps an int >= 1, size a (width, height) list, scheduler a
    registered scheduler's name."""
    if key == "steps" and value < 1:
        raise UsageError(f"{label} {value}: give at least 1 step")
    if key == "size":
        try:
            width, height = parse_size(value) if isinstance(value, str) else (value, value)
        except UsageError:
            raise UsageError(f"{label} {value}: write WIDTHxHEIGHT (e.g. 128x96) or one number for a square") from None
        if width < 1 or height < 1 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
            raise UsageError(f"{label} {value}: width and height must be positive multiples of {SIZE_MULTIPLE}")
        return [width, height]
    if key == "scheduler":
        scheduler_class(value, label=label)  # a typo fails now, not in a worker
    return value


def derived_seed(number: int, data: dict) -> int:
    """A 32-bit seed from the line number and the item's content, the same on every machine and worker."""
    return int.from_bytes(hashlib.sha256(f"{number}\n{canonical(data)}".encode()).digest()[:4], "big")


def digest(value) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# -- the output folder: images, shards, the merged manifest ---------------------------------------------------------


def atomic_write(path: Path, data: bytes):
    """Write ``path`` so that it is either absent or complete, whatever happens to this process."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, path)


def png_bytes(image) -> bytes:
    """The image as PNG, with no metadata (no time, no text chunks): the same pixels give the same bytes."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_rows(path: Path) -> list[dict]:
    """A manifest file's rows; an unterminated last line (a worker killed while appending) is ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]  # after the last newline: "" or a torn row
    rows = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise UsageError(f"{path}, line {number}: not a manifest row ({one_line(e)}); repair or delete "
                             f"that line, and its image is made again") from None
    if torn.strip():
        print(f"batch: ignoring an unfinished last row of {path}", file=sys.stderr)
    return rows


def consolidate(out: Path) -> dict[str, dict]:
    """Merge ``manifest.jsonl`` and the shards into ``manifest.jsonl``: one row per id, only rows whose image
    exists, in line order. Only one process (the coordinator) calls it, while no worker writes."""
    shards = sorted(out.glob(SHARD_GLOB))
    rows = {}
    for path in [out / MANIFEST, *shards]:
        for row in read_rows(path):
            if row["id"] not in rows and (out / row["file"]).is_file():
                rows[row["id"]] = row
    ordered = sorted(rows.values(), key=lambda r: (r["line"], r["id"]))
    if ordered or (out / MANIFEST).exists():
        atomic_write(out / MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered).encode())
    for path in shards:  # after the merged file is in place: a crash before this only leaves duplicates
        path.unlink()
    for temp in out.glob(".*.tmp"):
        if TEMP_NAME.fullmatch(temp.name):  # left by a killed worker
            temp.unlink()
    return rows


def prepare(job: Job) -> list[Item]:
    """Create the output folder, consolidate its manifest, and return the items still to make."""
    out = Path(job.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it: {one_line(e)}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out}: cannot write into it")
    done = consolidate(out)
    return [item for item in job.items if item.id not in done]


class ShardWriter:
    """One worker's manifest shard. A row is appended with one write, after its image is in place."""

    def __init__(self, out: Path, rank: int):
        self.out = out
        self.path = out / f"manifest.rank-{rank}.jsonl"

    def add(self, item: Item, png: bytes, row: dict):
        atomic_write(self.out / item.file, png)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode())
        finally:
            os.close(fd)


def count_new_rows(out: Path) -> int:
    """Rows in the shards: after ``consolidate`` removed them, the images made since."""
    total = 0
    for path in out.glob(SHARD_GLOB):
        try:
            total += path.read_bytes().count(b"\n")
        except FileNotFoundError:
            pass
    return total


# -- making one item --------------------------------------------------------------------------------------------


class Painter:
    """One pipeline and the rules that turn an item into a call.

    On the CPU it computes with one thread unless OMP_NUM_THREADS says otherwise: torch's CPU kernels round
    differently with different thread counts, and a fixed count per worker keeps the images identical however
    many workers share the job (torchrun and Ray give their CPU workers one thread each too). Use more workers
    to use more cores.
    """

    def __init__(self, source: str, device: str, dtype: str | None):
        import inspect

        import torch

        if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
        self.pipe = load_pipeline(source, dtype or ("float32" if device == "cpu" else "float16"), device)
        self.pipe.set_progress_bar_config(disable=True)
        stored = sampling_defaults(source)
        call_defaults = inspect.signature(self.pipe.__call__).parameters
        height, width = self.pipe.default_height_width(None, None)
        self.defaults = {
            "steps": stored.get("num_inference_steps", call_defaults["num_inference_steps"].default),
            "guidance": stored.get("guidance_scale", call_defaults["guidance_scale"].default),
            "size": [width, height],
            "scheduler": stored.get("scheduler", type(self.pipe.scheduler).__name__),
        }
        if "scheduler" in stored:
            scheduler_class(stored["scheduler"], label=f"{DEFAULTS_FILE} of {source}: scheduler")
        self.scheduler_config = self.pipe.scheduler.config
        self.schedulers = {type(self.pipe.scheduler).__name__: self.pipe.scheduler}

    def paint(self, item: Item) -> tuple[bytes, dict]:
        """The item's PNG and its manifest row."""
        import torch

        settings = {**self.defaults, **item.settings}
        name = settings["scheduler"]
        if name not in self.schedulers:
            self.schedulers[name] = scheduler_class(name).from_config(self.scheduler_config)
        self.pipe.scheduler = self.schedulers[name]
        started = time.perf_counter()
        width, height = settings["size"]
        image = self.pipe(prompt=item.prompt, negative_prompt=item.negative_prompt, width=width, height=height,
                          num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                          generator=torch.Generator("cpu").manual_seed(item.seed)).images[0]
        png = png_bytes(image)
        row = {"line": item.line, "id": item.id, "file": item.file, "prompt": item.prompt,
               "negative_prompt": item.negative_prompt, "seed": item.seed, "settings": settings,
               "timing": {"seconds": round(time.perf_counter() - started, 4),
                          "finished": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}}
        return png, row


# -- progress ---------------------------------------------------------------------------------------------------


class Progress:
    """Items done, images per second and time left for the whole job, on stderr."""

    def __init__(self, total: int, stream=None, every_s: float = 1.0):
        self.total = total
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.started = time.perf_counter()
        self.shown_at = -float("inf")
        self.shown_done = None
        self.done = 0

    def update(self, done: int):
        self.done = done
        now = time.perf_counter()
        if done in (0, self.shown_done) or (done < self.total and now - self.shown_at < self.every_s):
            return
        self.shown_done, self.shown_at = done, now
        self.stream.write(self.line(now) + ("\r" if self.stream.isatty() and done < self.total else "\n"))
        self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = "?" if left is None else f"{int(left // 60)}:{int(left % 60):02d}"
        return f"batch: {self.done}/{self.total} images, {rate:.2f} images/s, ETA {eta}"


def announce(job: Job, todo: list[Item], workers: int, engine: str):
    finished = len(job.items) - len(todo)
    print(f"batch: {len(job.items)} items, {finished} already done, {len(todo)} to make "
          f"({engine}, {workers} worker{'s' if workers != 1 else ''})", file=sys.stderr)


# -- engines ----------------------------------------------------------------------------------------------------


def run_local(job: Job, device: str | None) -> int:
    todo = prepare(job)
    announce(job, todo, 1, "local")
    if todo:
        painter = Painter(job.source, device or default_device(), job.dtype)
        writer = ShardWriter(Path(job.out), 0)
        progress = Progress(len(todo))
        for done, item in enumerate(todo, start=1):
            writer.add(item, *painter.paint(item))
            progress.update(done)
    consolidate(Path(job.out))
    print(Path(job.out) / MANIFEST)
    return 0


def run_torchrun(job: Job, workers: int | None) -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: this process is a worker
        if workers is not None:
            raise UsageError("--workers: under torchrun, the number of workers is torchrun's --nproc-per-node; "
                             "leave --workers out")
        return torchrun_worker(job)
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if workers is None:
        workers = torch.cuda.device_count()
        if workers == 0:
            raise UsageError("--engine torchrun: there is no GPU here; give --workers N for N CPU processes")
    if not prepare(job):  # also checks that the folder can be written, before processes start
        announce(job, [], workers, "torchrun")
        print(Path(job.out) / MANIFEST)
        return 0
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"diffloom-batch-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, torchrun_worker)(job)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(e.failures.items()))
        print(f"diffloom batch: worker {failures} failed; the finished images are kept: run the same command "
              f"again to make the rest", file=sys.stderr)
        return 1
    print(Path(job.out) / MANIFEST)
    return 0


def torchrun_worker(job: Job) -> int:
    """One torch.distributed process: rank 0 plans and reports progress; every rank makes its share."""
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device, backend = f"cuda:{local_rank}", "nccl"
        torch.cuda.set_device(local_rank)
    else:
        device, backend = "cpu", "gloo"
    dist.init_process_group(backend, device_id=torch.device(device) if backend == "nccl" else None)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        out = Path(job.out)
        plan = [None]
        if rank == 0:
            try:
                todo = prepare(job)
                plan = [[item.line for item in todo]]
                announce(job, todo, world, "torchrun")
            except UsageError as e:
                plan = [str(e)]
        dist.broadcast_object_list(plan, src=0)
        if isinstance(plan[0], str):
            if rank == 0:
                raise UsageError(plan[0])
            return 2
        by_line = {item.line: item for item in job.items}
        mine = [by_line[line] for line in plan[0][rank::world]]
        painter = Painter(job.source, device, job.dtype) if mine else None
        dist.barrier()  # every pipeline is loaded: the clock starts
        watcher = ProgressWatcher(out, len(plan[0])) if rank == 0 and plan[0] else None
        writer = ShardWriter(out, rank)
        for item in mine:
            writer.add(item, *painter.paint(item))
        dist.barrier()
        if watcher is not None:
            watcher.stop()
        if rank == 0:
            consolidate(out)
        return 0
    finally:
        dist.destroy_process_group()


class ProgressWatcher:
    """Rank 0's view of the whole job: a thread that counts the rows every worker appended to its shard."""

    def __init__(self, out: Path, total: int):
        self.out = out
        self.progress = Progress(total)
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        while not self.finished.wait(0.5):
            self.progress.update(min(count_new_rows(self.out), self.progress.total))

    def stop(self):
        self.finished.set()
        self.thread.join()
        self.progress.update(self.progress.total)


def run_ray(job: Job, workers: int | None) -> int:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'diffloom[ray]'") from None
    todo = prepare(job)
    ray.init(logging_level="WARNING")
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if workers is None:
            workers = gpus or int(resources.get("CPU", 1))
        announce(job, todo, workers, "ray")
        if todo:
            actor = ray_painter_class().options(**({"num_gpus": 1} if gpus else {"num_cpus": 1}))
            painters = [actor.remote(job.source, job.dtype) for _ in range(min(workers, len(todo)))]
            ray.get([p.ready.remote() for p in painters])  # load every pipeline before the clock starts
            writer = ShardWriter(Path(job.out), 0)
            progress = Progress(len(todo))
            pool = ActorPool(painters)
            results = pool.map_unordered(lambda painter, item: painter.paint.remote(item), todo)
            by_id = {item.id: item for item in todo}
            for done, (png, row) in enumerate(results, start=1):
                writer.add(by_id[row["id"]], png, row)
                progress.update(done)
    finally:
        ray.shutdown()
    consolidate(Path(job.out))
    print(Path(job.out) / MANIFEST)
    return 0


class _RayPainter:
    """A Ray actor around a :class:`Painter` on the actor's GPU, or on the CPU."""

    def __init__(self, source: str, dtype: str | None):
        import ray
        import torch

        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.painter = Painter(source, device, dtype)

    def ready(self) -> bool:
        return True

    def paint(self, item: Item) -> tuple[bytes, dict]:
        return self.painter.paint(item)


@functools.cache
def ray_painter_class():
    """The Ray actor class, made on first use so that importing this module never imports Ray. A worker that
    dies is restarted once and its unfinished call retried, by Ray."""
    import ray

    return ray.remote(max_restarts=1, max_task_retries=1)(_RayPainter)
