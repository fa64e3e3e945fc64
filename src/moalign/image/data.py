"""Image–caption data: hub datasets and local folders in `datasets`' imagefolder convention.

A local folder holds the images and a `metadata.jsonl` beside them, one `{"file_name": ..., "text": ...}`
per image. Every image is opened once before training, so an unreadable file, a missing caption or mixed
sizes stop the run before any work, in one line that names the file or row.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from PIL import Image, UnidentifiedImageError

from moalign.errors import MoalignError, first_line

METADATA = "metadata.jsonl"


def _check_folder(folder: Path, caption_column: str) -> None:
    """The metadata names existing, readable images and gives each a caption (the errors imagefolder
    would raise late, or not at all)."""
    metadata = folder / METADATA
    if not metadata.exists():
        raise MoalignError(
            f"{folder} has no {METADATA}: write one {{'file_name': ..., '{caption_column}': ...}} per image"
        )
    for number, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise MoalignError(f"{metadata}:{number} is not valid JSON ({error.msg})") from None
        name = row.get("file_name")
        if not isinstance(name, str) or not (folder / name).is_file():
            raise MoalignError(f"{metadata}:{number}: file_name {name!r} is not a file in {folder}")
        caption = row.get(caption_column)
        if not isinstance(caption, str) or not caption.strip():
            raise MoalignError(f"{metadata}:{number}: {name} has no caption (a non-empty '{caption_column}')")
        try:
            with Image.open(folder / name) as image:
                image.load()
        except (UnidentifiedImageError, OSError) as error:
            raise MoalignError(f"{folder / name} is not a readable image ({first_line(error)})") from None


def load_images(
    source: str,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    max_samples: int | None = None,
    resolution: int | None = None,
) -> datasets.Dataset:
    """An image–caption dataset with columns `image` (PIL) and `caption`, checked row by row.

    Without `resolution` every image must have the same size (the batch is one tensor); with it, images
    are resized and cropped to it later, as diffusers' training scripts do.
    """
    folder = Path(source)
    try:
        if folder.is_dir():
            _check_folder(folder, caption_column)
            dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)
        else:
            dataset = datasets.load_dataset(source, split=split)
    # OSError: a missing file, or a hub id that is neither reachable nor cached (ConnectionError offline)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise MoalignError(f"cannot load image dataset {source} ({first_line(error)})") from None
    for column, option in ((image_column, "image_column"), (caption_column, "caption_column")):
        if column not in dataset.column_names:
            raise MoalignError(
                f"{source} has no column {column!r} (set {option}); it has {', '.join(dataset.column_names)}"
            )
    if max_samples:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    dataset = dataset.select_columns([image_column, caption_column])
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if caption_column != "caption":
        dataset = dataset.rename_column(caption_column, "caption")
    sizes: dict[tuple[int, int], int] = {}
    for index, caption in enumerate(dataset["caption"]):
        if not isinstance(caption, str) or not caption.strip():
            raise MoalignError(f"{source}: row {index} has no caption (column {caption_column!r})")
    for index in range(len(dataset)):
        try:
            image = dataset[index]["image"]
        except (UnidentifiedImageError, OSError) as error:
            raise MoalignError(f"{source}: row {index} is not a readable image ({first_line(error)})") from None
        sizes.setdefault(image.size, index)
    if len(sizes) > 1 and resolution is None:
        (first, i), (second, j) = list(sizes.items())[:2]
        raise MoalignError(
            f"{source}: images have mixed sizes ({first[0]}x{first[1]} at row {i}, {second[0]}x{second[1]} at row "
            f"{j}); set resolution: N to resize and crop them to N×N"
        )
    if len(dataset) == 0:
        raise MoalignError(f"{source} has no rows")
    return dataset
