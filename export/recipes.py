"""Named recipes for the released BLIP2IDC models: base id, pinned revisions, pinned adapter files.

The adapters live in the public GitHub repository gautierevn/BLIP2IDC under
``code_release/weights/<folder>/<run name>/`` (``adapter_config.json`` + ``adapter_model.bin``).
The repository is pinned to a commit, and every adapter file to its content (:class:`~export.download.Pin`):
its sha256 where known, and the object id Git gives it in that commit's tree (read from the tree, not
computed here). The run sub-folder is found through GitHub's contents API, so a recipe names only the
folder; whatever a listing says, a file whose content does not match its pin is refused, after the
download and before each use from the cache.

``adapter_model.bin`` is stored in the commit as a plain blob (not in Git LFS, so no LFS pointer gives
its sha256); its sha256 is filled in once read from the real file (``sha256sum`` of a download whose
Git object id matched).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .download import Pin, cache_dir, check_origin, fetch, fetch_json
from .errors import DownloadError, ExportError

REPO = "gautierevn/BLIP2IDC"
#: The BLIP2IDC commit that holds the released adapters.
REPO_COMMIT = "cebc9bf2f965f48f5a6c5a57ba09937ad6c11edd"
BASE = "Salesforce/blip2-opt-2.7b"
#: Hub revision of the base: a commit once one is known to be the base BLIP2IDC was trained on;
#: until then "main", which the export resolves to a commit and records in the artifact's manifest
#: (``provenance.base.resolved``).
BASE_REVISION = "main"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.bin")
#: Where the contents API is reached; ``IDC_LITE_GITHUB_API`` overrides it (a mirror, a test server).
GITHUB_API = "https://api.github.com"


@dataclass(frozen=True)
class Recipe:
    name: str
    folder: str  # below code_release/weights/
    description: str
    #: file name -> what its content must be (every name of ADAPTER_FILES needs one)
    pins: dict[str, Pin] = field(default_factory=dict)
    base: str = BASE
    base_revision: str = BASE_REVISION
    repo: str = REPO
    commit: str = REPO_COMMIT


def _pins(config_sha256: str, config_blob: str, model_blob: str) -> dict[str, Pin]:
    """The pins of a released adapter: values read from the tree of :data:`REPO_COMMIT`."""
    return {"adapter_config.json": Pin(sha256=config_sha256, git_blob=config_blob),
            "adapter_model.bin": Pin(git_blob=model_blob)}


RECIPES = {r.name: r for r in [
    Recipe("blip2idc-syned-emu", "syned+emu_sota", "Syned + Emu Edit (LoRA r=8)", _pins(
        "78ec32b0da81efbf7eae55cd7a60f29cb1c94441bd44678886e22f80459f3218",
        "246e3d4c827cc71e1af23d573e802b238843ec17", "9025812094d79ad2bd0d3be49818995c3479b70f")),
    Recipe("blip2idc-syned", "syned_sota", "Syned synthetic pairs (LoRA r=32)", _pins(
        "d4abf7ba3c82c5f8ae68230370ad93dbd93f0ffeb63c01502a882b04f7d0ded2",
        "a80909c577609edbb49ca55889add89463cf90da", "c0e54b5d16fee15d5f260404a8ebee8b2746ed8b")),
    Recipe("blip2idc-ier", "ier", "Image Editing Request (LoRA r=16)", _pins(
        "bfdbd6c5fdb2056437b4925703ef5367b683d3486aa9bf6adaa00abc3f53bef5",
        "3905aaf14c7c614e062b2d3f5324104c1f87fcaf", "4e3ce5f8388ca57da4cf184858e07efa51c2b154")),
    Recipe("blip2idc-spot", "spot_sota", "Spot-the-Diff (LoRA r=8)", _pins(
        "78ec32b0da81efbf7eae55cd7a60f29cb1c94441bd44678886e22f80459f3218",
        "246e3d4c827cc71e1af23d573e802b238843ec17", "f1a1e1a66172238c9defa92592279d16f856833d")),
    Recipe("blip2idc-clevr-change", "clevr_sota", "CLEVR-Change (LoRA r=16)", _pins(
        "d485ae18bf18578f73e72eef86747b0734ed839830e8c82af92353dee8aa1202",
        "12b82b5001d592486ec0ecf39d137867e95a77f6", "b347ad42ed0cfd0c19b2c0f8bd8441c79d7d5f6b")),
    Recipe("blip2idc-clevr-dc", "clevr_dc", "CLEVR-DC (LoRA r=8)", _pins(
        "78ec32b0da81efbf7eae55cd7a60f29cb1c94441bd44678886e22f80459f3218",
        "246e3d4c827cc71e1af23d573e802b238843ec17", "abc02f23545d9263ff73d86f9d61b6e06841f988")),
]}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ExportError(name, f"unknown recipe; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def github_api() -> str:
    """The contents API's URL: ``$IDC_LITE_GITHUB_API`` (https, or http on this machine), else GitHub's."""
    override = os.environ.get("IDC_LITE_GITHUB_API")
    return check_origin(override, "IDC_LITE_GITHUB_API") if override else GITHUB_API


def _origins() -> tuple[str, ...]:
    """Origins accepted besides GitHub's: the override's, when one is set."""
    api = github_api()
    return () if api == GITHUB_API else (api,)


def fetch_adapter(recipe: Recipe, progress: bool | None = None) -> Path:
    """The recipe's adapter folder in the cache, every file checked against its pin (downloaded if needed)."""
    missing = [name for name in ADAPTER_FILES if name not in recipe.pins]
    if missing:
        raise ExportError(recipe.name, f"the recipe has no pin for {', '.join(missing)}; refusing an unpinned download")
    folder = f"code_release/weights/{recipe.folder}"
    target = cache_dir() / "adapters" / recipe.name / recipe.commit
    if all((target / name).is_file() and recipe.pins[name].matches(target / name) for name in ADAPTER_FILES):
        return target
    files = _find_adapter_files(recipe, folder)
    for name in ADAPTER_FILES:
        pin = recipe.pins[name]
        fetch(files[name], target / name, pin.sha256, progress, git_blob=pin.git_blob, origins=_origins())
    return target


def _find_adapter_files(recipe: Recipe, folder: str) -> dict[str, str]:
    """Download URLs of the adapter files in ``folder`` or its one run sub-folder."""
    listing = _list(recipe, folder)
    urls = _file_urls(recipe, listing)
    if all(name in urls for name in ADAPTER_FILES):
        return urls
    for entry in listing:
        if entry.get("type") == "dir" and isinstance(entry.get("path"), str):
            urls = _file_urls(recipe, _list(recipe, entry["path"]))
            if all(name in urls for name in ADAPTER_FILES):
                return urls
    raise DownloadError(f"{recipe.repo}/{folder}@{recipe.commit[:10]}", f"no {' and '.join(ADAPTER_FILES)} found there")


def _file_urls(recipe: Recipe, listing: list) -> dict[str, str]:
    """Name -> download URL of the adapter files a listing holds; a listed Git object id must match the pin."""
    urls = {}
    for entry in listing:
        if not isinstance(entry, dict) or entry.get("type") != "file" or entry.get("name") not in ADAPTER_FILES:
            continue
        pin = recipe.pins[entry["name"]]
        if pin.git_blob is not None and entry.get("sha") not in (None, pin.git_blob):
            raise DownloadError(entry.get("download_url") or entry["name"],
                                f"the listing gives Git object {entry.get('sha')}, the recipe pins {pin.git_blob}")
        if isinstance(entry.get("download_url"), str):
            urls[entry["name"]] = entry["download_url"]
    return urls


def _list(recipe: Recipe, path: str) -> list[dict]:
    from urllib.parse import quote

    url = f"{github_api()}/repos/{recipe.repo}/contents/{quote(path)}?ref={recipe.commit}"
    listing = fetch_json(url, origins=_origins())
    if not isinstance(listing, list):
        raise DownloadError(url, "not a folder listing")
    return listing
