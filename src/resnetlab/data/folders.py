"""ImageFolder layout (torchvision semantics) over any file store: a folder or an archive.

``[wrapper/]{train,val,test}/<class>/**/<image>`` or ``[wrapper/]<class>/**/<image>``: a class is a
sub-folder, classes are sorted alphabetically, and files are kept when their extension is one of
torchvision's ``IMG_EXTENSIONS``. Single wrapper folders (``hymenoptera_data/``) are looked through.
Files that are not images (other extensions, or a header that does not decode) are skipped at index
time and reported in one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from torchvision.datasets.folder import IMG_EXTENSIONS

from resnetlab.data.images import probe_image
from resnetlab.data.stores import FileStore
from resnetlab.errors import DataError

#: Folder names recognised as splits, and the split each one means.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


@dataclass
class FolderIndex:
    """Which files belong to which split and class."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(file name in the store, class index)]
    skipped: list[str] = field(default_factory=list)  # "name (reason)" for every file left out


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def index_image_folder(
    names: Iterable[str],
    *,
    where: str,
    extensions: tuple[str, ...] = IMG_EXTENSIONS,
    empty_dirs: Iterable[str] = (),
) -> FolderIndex:
    """Index relative POSIX file names into splits and classes (see the module docstring).

    A class folder without images is an error, as in torchvision's ImageFolder (silently dropping it
    would shift the class indices between splits): an empty one (``empty_dirs``: folders with nothing
    in them) or one holding only files that are not images."""
    paths = [tuple(n.split("/")) for n in names]
    paths = [p for p in paths if not _is_hidden(p)]
    images = [p for p in paths if p[-1].lower().endswith(extensions)]
    wrapper: tuple[str, ...] = ()  # single folders around everything, looked through
    while (
        images
        and images[0][len(wrapper)].lower() not in SPLIT_ALIASES
        and all(len(p) >= len(wrapper) + 3 and p[len(wrapper)] == images[0][len(wrapper)] for p in images)
    ):
        wrapper += (images[0][len(wrapper)],)
    depth = len(wrapper)
    has_splits = any(len(p) > depth + 2 and p[depth].lower() in SPLIT_ALIASES for p in images)
    for empty in (tuple(e.split("/")) for e in empty_dirs if e not in ("", ".")):
        rest = empty[depth:] if empty[:depth] == wrapper else ()
        at_class_level = (len(rest) == 2 and rest[0].lower() in SPLIT_ALIASES) if has_splits else len(rest) == 1
        if at_class_level and not _is_hidden(empty):
            raise DataError(f"class folder {'/'.join(empty)} in {where} has no images: add images or remove it")
    by_split: dict[str, list[tuple[str, str]]] = {}
    skipped: list[str] = []
    without_images: dict[tuple[str, str], list[str]] = {}  # (split, class) -> its non-image files
    for parts in sorted(paths):
        name = "/".join(parts)
        rest = parts[depth:] if parts[:depth] == wrapper else ()
        if has_splits:
            split = SPLIT_ALIASES.get(rest[0].lower()) if len(rest) >= 3 else None
            rest = rest[1:]
        else:
            split = "train" if len(rest) >= 2 else None
        if split is None:
            skipped.append(f"{name} (outside the <split>/<class>/ layout)")
        elif not name.lower().endswith(extensions):
            skipped.append(f"{name} (not an image extension)")
            without_images.setdefault((split, rest[0]), []).append(name)
        else:
            by_split.setdefault(split, []).append((name, rest[0]))
    classes = sorted({cls for samples in by_split.values() for _, cls in samples})
    if not classes:
        raise DataError(
            f"no images found in {where}: expected [train|val|test/]<class>/<image> with an extension "
            f"in {', '.join(extensions)}"
        )
    with_images = {(split, cls) for split, samples in by_split.items() for _, cls in samples}
    for (split, cls), files in sorted(without_images.items()):
        if (split, cls) not in with_images:
            folder = "/".join(files[0].split("/")[: depth + (2 if has_splits else 1)])
            raise DataError(
                f"class folder {folder} in {where} has no images, only {len(files)} other file(s) "
                f"({', '.join(f.rsplit('/', 1)[-1] for f in files[:5])}): add images or remove it"
            )
    class_index = {c: i for i, c in enumerate(classes)}
    splits = {s: [(n, class_index[c]) for n, c in samples] for s, samples in by_split.items()}
    return FolderIndex(classes, splits, skipped)


def drop_unreadable(index: FolderIndex, store: FileStore) -> None:
    """Move files whose header does not decode (or is a bomb) from the index to ``index.skipped``."""
    for split, samples in index.splits.items():
        kept = []
        for name, target in samples:
            try:
                with store.open(name) as stream:
                    probe_image(stream, name=store.describe(name))
                kept.append((name, target))
            except DataError as err:
                index.skipped.append(f"{name} ({err})")
        index.splits[split] = kept


def warn_skipped(skipped: list[str], where: str, *, stacklevel: int = 2) -> None:
    """One warning listing the files left out of a dataset, with the reason for each."""
    if skipped:
        shown = "; ".join(skipped[:20]) + (f"; ... ({len(skipped)} in all)" if len(skipped) > 20 else "")
        warnings.warn(f"{where}: skipped {len(skipped)} files: {shown}", UserWarning, stacklevel=stacklevel + 1)
