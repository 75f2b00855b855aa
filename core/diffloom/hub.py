"""Finding files: a local folder, or a Hub repo through huggingface_hub (its cache, offline mode, revisions)."""

from __future__ import annotations

import os
from pathlib import Path


class LoadError(OSError):
    """A model folder, file or Hub repo that cannot be read."""


HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")


def split_hub_kwargs(kwargs: dict) -> dict:
    """Remove and return the keyword arguments meant for huggingface_hub."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and not os.path.isabs(name)


def resolve_file(path_or_repo, filename: str, subfolder: str | None = None, *, revision=None, cache_dir=None,
                 local_files_only=False, token=None, force_download=False, proxies=None) -> Path:
    """The local path of ``filename`` (inside ``subfolder``) of a folder or Hub repo."""
    path_or_repo = os.fspath(path_or_repo)
    if os.path.isdir(path_or_repo):
        path = Path(path_or_repo, subfolder or "", filename)
        if not path.is_file():
            raise LoadError(f"{path} does not exist")
        return path
    if not _looks_like_repo_id(path_or_repo):
        raise LoadError(f"{path_or_repo} is not a folder, and not a Hub repo id (owner/name) either")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(path_or_repo, filename, subfolder=subfolder or None, revision=revision,
                                    cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                                    force_download=force_download))
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: catch it first
        raise LoadError(f"{path_or_repo} is not a local folder and {filename} is not in the Hub cache "
                        f"({'offline mode' if _offline() or local_files_only else e})") from None
    except EntryNotFoundError:
        where = f"{subfolder}/{filename}" if subfolder else filename
        raise LoadError(f"Hub repo {path_or_repo} has no file {where}") from None
    except RepositoryNotFoundError:
        raise LoadError(f"{path_or_repo} is not a local folder and no Hub repo of that name exists") from None


def file_exists(path_or_repo, filename: str, subfolder: str | None = None, **hub_kwargs) -> bool:
    try:
        resolve_file(path_or_repo, filename, subfolder, **hub_kwargs)
        return True
    except LoadError:
        return False


def resolve_folder(path_or_repo, allow_patterns=None, *, revision=None, cache_dir=None, local_files_only=False,
                   token=None, force_download=False, proxies=None) -> Path:
    """A local folder for a folder or Hub repo; for a repo, only files matching ``allow_patterns`` are fetched."""
    path_or_repo = os.fspath(path_or_repo)
    if os.path.isdir(path_or_repo):
        return Path(path_or_repo)
    if not _looks_like_repo_id(path_or_repo):
        raise LoadError(f"{path_or_repo} is not a folder, and not a Hub repo id (owner/name) either")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(path_or_repo, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only or _offline(), token=token,
                                      allow_patterns=allow_patterns, force_download=force_download))
    except RepositoryNotFoundError:
        raise LoadError(f"{path_or_repo} is not a local folder and no Hub repo of that name exists") from None
    except LocalEntryNotFoundError:
        raise LoadError(f"{path_or_repo} is not a local folder and is not in the Hub cache (offline mode)") from None


def list_folder(path_or_repo, **hub_kwargs) -> list[str]:
    """Relative file names (posix) of a folder or of a Hub repo's snapshot, for picking weight files."""
    path_or_repo = os.fspath(path_or_repo)
    if os.path.isdir(path_or_repo):
        root = Path(path_or_repo)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    from huggingface_hub import list_repo_files

    if _offline() or hub_kwargs.get("local_files_only"):
        folder = resolve_folder(path_or_repo, **hub_kwargs)
        return list_folder(folder)
    return list_repo_files(path_or_repo, revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
