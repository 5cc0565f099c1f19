"""Reading a domain folder: the labelled images `add-task` learns from and `eval` scores.

Layout: `<dir>/<class name>/<image>` or, when split folders exist,
`<dir>/<split>/<class name>/<image>`. Class names are the folder names (spaces allowed),
in sorted order; images are found by content as `discover` finds them. An optional
`<dir>/meta.json` may give the domain's `name` and its prompt `templates` (UTF-8, a byte-order
mark is accepted). Given a split folder itself (`<dir>/train`), the domain is still named after
`<dir>` (or `<dir>/meta.json`).

Class names: a folder name must be valid UTF-8 (refused before any work otherwise). Two class
names are the same class when their `class_key` is equal: Unicode NFC normalisation and case
folding, so `Cat`/`cat` and NFC/NFD `café` are one class. Such twins are refused inside one
domain and across learned tasks; zero-shot labels that match a learned class (or an earlier
label) are merged into it.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from edgeclip.discover import discover_images, display_path
from edgeclip.errors import DomainError, UsageError
from edgeclip.manifest import DEFAULT_TEMPLATES

SPLIT_NAMES = ("train", "val", "valid", "test")
TEST_SPLITS = ("test", "val", "valid")  # where eval looks for a domain's test images, in this order
# The fewest readable images add-task learns from: one per class, and three in the task, since
# the DDAS gate fits on most of them and holds a fifth (at least one) out to calibrate its threshold.
MIN_IMAGES_PER_CLASS = 1
MIN_TASK_IMAGES = 3
MINIMUM_TEXT = (f"add-task needs at least {MIN_IMAGES_PER_CLASS} readable image per class "
                f"and {MIN_TASK_IMAGES} in the task")


@dataclass(frozen=True)
class Domain:
    """`samples[i] = (image path, index into classes)`, ordered by class then path."""

    name: str
    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))

    def prompts(self, class_index: int) -> list[str]:
        """The prompt texts of one class, one per template."""
        return [t.replace("{}", self.classes[class_index]) for t in self.templates]


def class_key(name: str) -> str:
    """The identity of a class name: NFC-normalised and case-folded (``Cat``, ``cat`` and ``CAT``,
    or ``café`` in NFC and NFD, are one class)."""
    return unicodedata.normalize("NFC", name).casefold()


def _read_meta(root: Path) -> dict:
    path = root / "meta.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DomainError(f"cannot read {display_path(path)}: {err}") from err
    if not isinstance(meta, dict):
        raise DomainError(f"{display_path(path)} must hold a JSON object")
    templates = meta.get("templates")
    if templates is not None:
        check_templates(templates, f"{display_path(path)}: 'templates'")
    if "name" in meta and (not isinstance(meta["name"], str) or not meta["name"].strip()):
        raise DomainError(f"{display_path(path)}: 'name' must be a non-empty string")
    return meta


def _class_root(root: Path, split: str) -> Path:
    if (root / split).is_dir():
        return root / split
    present = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    if present:
        raise DomainError(f"{display_path(root)} has no '{split}' folder (it has {', '.join(present)})")
    return root


def eval_split(directory: Path | str) -> tuple[str, str | None]:
    """The split eval scores a domain on: ``test``, else ``val`` or ``valid`` (datasets ship either), with a
    note saying so; ``("test", None)`` when none is there (``read_domain`` then says what is missing)."""
    root = Path(directory)
    for split in TEST_SPLITS:
        if (root / split).is_dir():
            note = None if split == "test" else (f"{display_path(root)} has no test/ folder: its {split}/ folder is "
                                                 "used as the test split")
            return split, note
    return "test", None


def _layout_hint(root: Path, limit: int = 400) -> str:
    """' (did you mean ...?)': the nearest folder below ``root`` laid out as a domain (two or more class
    folders holding files; a split folder's parent is named); '' when none is found within ``limit`` folders."""
    queue, seen = [root], 0
    while queue and seen < limit:
        folder = queue.pop(0)
        seen += 1
        try:
            subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        if folder != root:
            with_files = 0
            for sub in subs[:50]:
                try:
                    if any(f.is_file() for f in sub.iterdir()):
                        with_files += 1
                except OSError:
                    pass
            if with_files >= 2:
                target = folder.parent if folder.name in SPLIT_NAMES else folder
                return (f"; {display_path(target)} looks like a domain folder ({display_path(folder)} has "
                        f"{len(subs)} class folders): did you mean that?")
        if len(folder.relative_to(root).parts) < 3:
            queue.extend(subs)
    return ""


def read_domain(directory: Path | str, split: str = "train") -> Domain:
    """Read the domain at `directory`; raise DomainError when it cannot be learned from:
    missing, fewer than two classes, or a class folder without images."""
    root = Path(directory)
    if not root.is_dir():
        raise DomainError(f"domain folder {display_path(root)} does not exist or is not a folder")
    meta = _read_meta(root)
    class_root = _class_root(root, split)
    try:
        classes = sorted(p.name for p in class_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise DomainError(f"cannot list {display_path(class_root)}: {err.strerror or err}") from err
    undecodable = [name for name in classes if not _is_utf8(name)]
    if undecodable:
        raise DomainError(
            f"class folder names must be UTF-8 text; rename {', '.join(display_path(class_root / n) for n in undecodable[:3])}"
        )
    check_class_names(classes, f"{display_path(class_root)}: class folders")
    if len(classes) < 2:
        raise DomainError(
            f"{display_path(class_root)} has {len(classes)} class folder(s); a domain needs at least 2 "
            f"(one sub-folder of images per class){_layout_hint(class_root)}"
        )
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        images = discover_images([class_root / name]).images
        if not images:
            raise DomainError(f"class folder {display_path(class_root / name)} holds no images")
        samples += [(p, label) for p in images]
    name = meta.get("name")
    if not name and class_root == root and root.resolve().name in SPLIT_NAMES:
        # `add-task DIR/train`: the split folder itself; the domain is DIR (and DIR/meta.json)
        parent = root.resolve().parent
        meta = {**_read_meta(parent), **meta}
        name = meta.get("name") or parent.name
    return Domain(
        name=name or root.resolve().name,
        root=root,
        classes=classes,
        samples=samples,
        templates=list(meta.get("templates") or DEFAULT_TEMPLATES),
    )


def require_enough_images(domain: Domain, readable: dict[int, int], unreadable: dict[int, int]) -> None:
    """Refuse (DomainError) a domain whose readable images fall below `MIN_IMAGES_PER_CLASS` in a
    class or `MIN_TASK_IMAGES` in all; `readable`/`unreadable`: image counts by class index."""
    short = [i for i in range(len(domain.classes)) if readable.get(i, 0) < MIN_IMAGES_PER_CLASS]
    if short:
        shown = ", ".join(
            f"'{domain.classes[i]}' ({readable.get(i, 0)} readable, {unreadable.get(i, 0)} unreadable)" for i in short[:5]
        )
        raise DomainError(f"too few readable images in {display_path(domain.root)}: {shown}; {MINIMUM_TEXT}")
    total = sum(readable.values())
    if total < MIN_TASK_IMAGES:
        raise DomainError(
            f"only {total} readable image(s) in {display_path(domain.root)} "
            f"({sum(unreadable.values())} unreadable); {MINIMUM_TEXT}"
        )


ZERO_SHOT_ROUTE_NAME = "zero-shot"  # what classify reports as the route of an image that fits no task


def check_templates(templates: object, where: str = "templates") -> None:
    """Refuse (DomainError) prompt templates that are not a non-empty list of strings each holding
    ``{}`` (where the class name goes), as a domain's meta.json must give them."""
    if (not isinstance(templates, (list, tuple)) or not templates
            or not all(isinstance(t, str) and "{}" in t for t in templates)):
        raise DomainError(f"{where} must be a non-empty list of strings containing {{}}, got {templates!r:.200}")


def check_class_names(classes: Sequence[str], where: str = "class names") -> None:
    """Refuse (DomainError) class names that are empty, not UTF-8 text, span several lines (a line
    break would end up inside the CLIP prompt), hold a '/' or NUL (a class is a folder of a domain:
    what cannot name a folder cannot name a class, whichever way it is learned), or name one class
    twice under the `class_key` rule (case folding, Unicode NFC). Other control characters are
    allowed; every output shows them escaped. ``where`` starts the message."""
    bad = [name for name in classes if not _is_one_line_text(name)]
    if bad:
        raise DomainError(f"{where}: {', '.join(repr(n) for n in bad[:3])} must be non-empty UTF-8 text "
                          "on one line")
    bad = [name for name in classes if not _is_folder_name(name)]
    if bad:
        raise DomainError(f"{where}: {', '.join(repr(n) for n in bad[:3])} must not hold '/' or NUL "
                          "(a class is a folder name)")
    twins: dict[str, list[str]] = {}
    for name in classes:
        twins.setdefault(class_key(name), []).append(name)
    clashes = [names for names in twins.values() if len(names) > 1]
    if clashes:
        shown = "; ".join(" / ".join(f"'{n}'" for n in names) for names in clashes[:3])
        raise DomainError(f"{where} that differ only in case or Unicode form name one class: {shown}; merge or rename them")


def check_task_name(name: str) -> None:
    """Refuse (DomainError) a task name that is empty, not UTF-8 text, spans several lines, holds '/'
    or NUL, or is
    "zero-shot" (which classify reports as the route of images that fit no task)."""
    if not _is_one_line_text(name):
        raise DomainError(f"task name {name!r} must be non-empty UTF-8 text on one line; pass --name")
    if not _is_folder_name(name):
        raise DomainError(f"task name {name!r} must not hold '/' or NUL (it could not name a domain folder); "
                          "pass --name")
    if class_key(name) == class_key(ZERO_SHOT_ROUTE_NAME):
        raise DomainError(f"'{name}' is what classify reports for images of no task; choose another task name")


def _is_one_line_text(name: object) -> bool:
    return (isinstance(name, str) and bool(name.strip()) and _is_utf8(name)
            and len(name.splitlines()) == 1 and not name.endswith(("\n", "\r")))


def _is_folder_name(name: str) -> bool:
    return "/" not in name and "\0" not in name


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # surrogateescape'd bytes that are not UTF-8
        return False
    return True


def _shuffle_key(seed: int, path: Path, root: Path) -> bytes:
    """A per-file random order that depends only on the seed and the file's path in the
    domain, so a few-shot draw is the same on every machine and numpy version."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = path
    return hashlib.sha256(f"{seed}\0{rel.as_posix()}".encode("utf-8", "surrogateescape")).digest()


def few_shot(domain: Domain, shots: int, seed: int = 0) -> Domain:
    """The same domain with at most `shots` images per class, picked deterministically by
    `seed` (a class with fewer keeps all of its images). Raises UsageError when `shots` < 1."""
    if shots < 1:
        raise UsageError(f"shots must be at least 1, not {shots}")
    by_class: dict[int, list[Path]] = {}
    for path, label in domain.samples:
        by_class.setdefault(label, []).append(path)
    picked: list[tuple[Path, int]] = []
    for label in sorted(by_class):
        chosen = sorted(by_class[label], key=lambda p: _shuffle_key(seed, p, domain.root))[:shots]
        picked += [(p, label) for p in sorted(chosen)]
    return replace(domain, samples=picked)
