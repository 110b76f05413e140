"""Install the idc-lite Krita plug-in: this folder's plug-in and idc-lite's one-file client, copied as is.

    python examples/krita-plugin/install.py                 # into Krita's default pykrita folder
    python examples/krita-plugin/install.py --target DIR    # anywhere else

Then, in Krita: Settings > Configure Krita > Python Plugin Manager > enable "idc-lite: what changed?",
restart Krita, and start the service (`idc-lite serve`) before using Tools > Scripts.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN = "idc_lite_caption"


def default_target() -> Path:
    """Krita's pykrita folder for this user (Linux, macOS, Windows)."""
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "krita" / "pykrita"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "krita" / "pykrita"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "krita" / "pykrita"


def client_source() -> Path:
    """idc-lite's client: from the installed package, else from this source checkout."""
    try:
        import idc_lite.serve.client as client
    except ImportError:
        return HERE.parent.parent / "idc_lite" / "serve" / "client.py"
    return Path(client.__file__)


def install(target: Path) -> Path:
    """Copy the plug-in and the client into ``target``; return the plug-in's folder there."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / f"{PLUGIN}.desktop", target / f"{PLUGIN}.desktop")
    destination = target / PLUGIN
    shutil.copytree(HERE / PLUGIN, destination, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(client_source(), destination / "idc_lite_client.py")
    return destination


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=None, help="the pykrita folder (default: Krita's own)")
    args = parser.parse_args()
    print(f"installed in {install(args.target or default_target())}")
