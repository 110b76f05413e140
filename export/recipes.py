"""Named recipes for the released BLIP2IDC models: base id, pinned revisions, adapter location.

The adapters live in the public GitHub repository gautierevn/BLIP2IDC under
``code_release/weights/<folder>/<run name>/`` (``adapter_config.json`` + ``adapter_model.bin``).
The repository is pinned to a commit; the run sub-folder is found through GitHub's contents API,
so a recipe names only the folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .download import cache_dir, fetch, fetch_json
from .errors import DownloadError, ExportError

REPO = "gautierevn/BLIP2IDC"
#: The BLIP2IDC commit that holds the released adapters.
REPO_COMMIT = "cebc9bf2f965f48f5a6c5a57ba09937ad6c11edd"
BASE = "Salesforce/blip2-opt-2.7b"
#: Hub revision of the base. "main" is resolved to its commit when downloaded, and the commit is
#: recorded in the artifact's manifest.
BASE_REVISION = "main"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.bin")


@dataclass(frozen=True)
class Recipe:
    name: str
    folder: str  # below code_release/weights/
    description: str
    base: str = BASE
    base_revision: str = BASE_REVISION
    repo: str = REPO
    commit: str = REPO_COMMIT


RECIPES = {r.name: r for r in [
    Recipe("blip2idc-syned-emu", "syned+emu_sota", "Syned + Emu Edit (LoRA r=8)"),
    Recipe("blip2idc-syned", "syned_sota", "Syned synthetic pairs (LoRA r=32)"),
    Recipe("blip2idc-ier", "ier", "Image Editing Request (LoRA r=16)"),
    Recipe("blip2idc-spot", "spot_sota", "Spot-the-Diff (LoRA r=8)"),
    Recipe("blip2idc-clevr-change", "clevr_sota", "CLEVR-Change (LoRA r=16)"),
    Recipe("blip2idc-clevr-dc", "clevr_dc", "CLEVR-DC (LoRA r=8)"),
]}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ExportError(name, f"unknown recipe; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def github_api() -> str:
    return os.environ.get("IDC_LITE_GITHUB_API", "https://api.github.com").rstrip("/")


def fetch_adapter(recipe: Recipe, progress: bool | None = None) -> Path:
    """Download a recipe's adapter into the cache (once) and return its folder."""
    folder = f"code_release/weights/{recipe.folder}"
    target = cache_dir() / "adapters" / recipe.name / recipe.commit
    if all((target / name).is_file() for name in ADAPTER_FILES):
        return target
    files = _find_adapter_files(recipe, folder)
    for name in ADAPTER_FILES:
        fetch(files[name], target / name, progress=progress)
    return target


def _find_adapter_files(recipe: Recipe, folder: str) -> dict[str, str]:
    """Download URLs of the adapter files in ``folder`` or its one run sub-folder."""
    listing = _list(recipe, folder)
    urls = {e["name"]: e["download_url"] for e in listing if e.get("type") == "file"}
    if all(name in urls for name in ADAPTER_FILES):
        return urls
    for entry in listing:
        if entry.get("type") == "dir":
            urls = {e["name"]: e["download_url"] for e in _list(recipe, entry["path"]) if e.get("type") == "file"}
            if all(name in urls for name in ADAPTER_FILES):
                return urls
    raise DownloadError(f"{recipe.repo}/{folder}@{recipe.commit[:10]}", f"no {' and '.join(ADAPTER_FILES)} found there")


def _list(recipe: Recipe, path: str) -> list[dict]:
    from urllib.parse import quote

    url = f"{github_api()}/repos/{recipe.repo}/contents/{quote(path)}?ref={recipe.commit}"
    listing = fetch_json(url)
    if not isinstance(listing, list):
        raise DownloadError(url, "not a folder listing")
    return listing
