"""Model configs (open_clip JSON format) and the default bundle location."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "bundles" / "default"
