"""The manifest: the contract between ingest and everything after it.

``OUT/manifest.json`` is written last, atomically (temporary name, then
rename), so its presence means every shard it lists was complete when it was
written. Readers load it with :func:`load_manifest` and can check shards
against their recorded sizes and sha256 with :meth:`Manifest.verify`.

``preprocess`` records how the files became the stored images (the settings of
stage (a) of :mod:`pneumo_data.preprocess`, with the definition's version);
:meth:`Manifest.preprocess` reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pneumo_data.common.errors import UserError
from pneumo_data.common.files import file_sha256, write_text
from pneumo_data.preprocess.spec import PreprocessSpec
from pneumo_data.records import ENCODINGS

MANIFEST_NAME = "manifest.json"
FORMAT = "pneumo-manifest"
FORMAT_VERSION = 1


class ManifestError(UserError):
    """A data_dir without a usable manifest, or a split/class it does not have."""


class ShardIntegrityError(UserError):
    """A shard is missing, truncated or fails its checksum."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A loaded manifest; ``data`` is the parsed JSON."""

    data_dir: Path
    data: dict[str, Any]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.data["classes"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.data["shards"])

    @property
    def image_size(self) -> int:
        return int(self.data["image"]["size"])

    @property
    def encoding(self) -> str:
        return self.data["image"]["encoding"]

    @property
    def preprocess(self) -> PreprocessSpec:
        """The :class:`~pneumo_data.preprocess.PreprocessSpec` the stored images were made with."""
        return PreprocessSpec.from_dict(self.data["preprocess"])

    def require_split(self, split: str) -> None:
        if split not in self.data["shards"]:
            raise ManifestError(
                f"{self.data_dir}: no split {split!r} in the manifest "
                f"(it has {', '.join(self.splits) or 'none'})")

    def shard_entries(self, split: str, label: str) -> list[dict[str, Any]]:
        self.require_split(split)
        by_class = self.data["shards"][split]
        if label not in by_class:
            raise ManifestError(f"{self.data_dir}: split {split!r} has no class {label!r}")
        return list(by_class[label])

    def shard_paths(self, split: str, label: str) -> list[str]:
        return [str(self.data_dir / e["file"]) for e in self.shard_entries(split, label)]

    def count(self, split: str, label: str | None = None) -> int:
        self.require_split(split)
        counts = self.data["counts"][split]
        if label is None:
            return int(sum(counts.values()))
        return int(counts.get(label, 0))

    def split_digests(self) -> dict[str, str]:
        """Per split, the sha256 of which images it holds (each written file's path, content
        hash and label): equal digests mean the same images in the same split. A run records
        them, so a data folder re-prepared afterwards (a patient moved from train to test) is
        noticed by every job that reads the run's data again."""
        rows: dict[str, list] = {split: [] for split in self.splits}
        for row in self.data["files"]:
            if row.get("status") == "written" and row.get("split") in rows:
                rows[row["split"]].append([row["path"], row["sha256"], row["label"]])
        return {split: hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()
                for split, items in rows.items()}

    def verify(self, splits: tuple[str, ...] | None = None, checksums: bool = True) -> None:
        """Raises ShardIntegrityError naming the first bad shard.

        Checks that every shard of ``splits`` (default: all) exists with its
        recorded size and, with ``checksums``, its recorded sha256.
        """
        for split in splits or self.splits:
            for label in self.data["shards"][split]:
                for entry in self.shard_entries(split, label):
                    verify_shard(self.data_dir / entry["file"], entry, checksums)


def shard_entry(path: Path, records: int) -> dict[str, Any]:
    """The manifest's entry for a finished shard file holding ``records`` records."""
    return {"file": path.name, "records": records, "bytes": path.stat().st_size,
            "sha256": file_sha256(path)}


def verify_shard(path: Path, entry: dict[str, Any], checksum: bool = True) -> None:
    if not path.exists():
        raise ShardIntegrityError(f"shard {path} listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardIntegrityError(
            f"shard {path} has {size} bytes, the manifest says {entry['bytes']} "
            f"(truncated or modified)")
    if checksum and file_sha256(path) != entry["sha256"]:
        raise ShardIntegrityError(f"shard {path} fails its sha256 checksum (corrupted or modified)")


def _check_schema(path: Path, data: Any) -> None:
    """Raises ManifestError naming the first key a reader needs that is missing or malformed."""
    def bad(what: str):
        raise ManifestError(f"{path} is damaged or not written by this version of pneumo: {what}. "
                            f"Prepare the data again (python -m pneumo_data.prepare)")
    if not isinstance(data, dict):
        bad(f"expected a JSON object, found a JSON {type(data).__name__}")
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest "
            f"(format={data.get('format')!r}, version={data.get('format_version')!r})")
    for key, kind in (("classes", list), ("counts", dict), ("shards", dict), ("image", dict),
                      ("files", list), ("options", dict), ("source", dict),
                      ("preprocess", dict)):
        if not isinstance(data.get(key), kind):
            bad(f"key {key!r} is missing or not a JSON {kind.__name__}")
    image = data["image"]
    if not (isinstance(image.get("size"), int) and image["size"] > 0):
        bad("image.size is missing or not a positive integer")
    if image.get("encoding") not in ENCODINGS:
        bad(f"image.encoding {image.get('encoding')!r} is not raw, jpeg or png")
    try:
        spec = PreprocessSpec.from_dict(data["preprocess"])
    except UserError as error:
        bad(f"preprocess: {error}")
    if spec.stored_size != image["size"]:
        bad(f"preprocess.stored_size {spec.stored_size} is not image.size {image['size']}")
    for split, by_class in data["shards"].items():
        if not isinstance(by_class, dict) or not isinstance(data["counts"].get(split), dict):
            bad(f"split {split!r} has no shard table or no counts")
        for label, entries in by_class.items():
            if not isinstance(entries, list):
                bad(f"shards of {split}/{label} are not a list")
            for entry in entries:
                if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                        and isinstance(entry.get("records"), int)
                        and isinstance(entry.get("bytes"), int)
                        and isinstance(entry.get("sha256"), str)):
                    bad(f"a shard entry of {split}/{label} lacks file, records, bytes or sha256")
                if Path(entry["file"]).name != entry["file"]:
                    bad(f"shard file name {entry['file']!r} is not a plain file name")


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise ManifestError(f"data_dir {data_dir} does not exist or is not a folder")
    if not path.exists():
        if _holds_images(data_dir):
            real = data_dir.resolve()
            prepared = real.with_name(real.name + "-prepared") if real.name else "<new folder>"
            raise ManifestError(
                f"{data_dir} holds images, not a prepared dataset (no {MANIFEST_NAME}). Train "
                f"on it with --source_dir={data_dir} (prepared into MODEL_DIR/data on the "
                f"way), or prepare it once: python -m pneumo_data.prepare "
                f"--source_dir={data_dir} --output_dir={prepared}")
        raise ManifestError(
            f"{data_dir} has no {MANIFEST_NAME}: it is not a prepared dataset (or its "
            f"preparation did not finish). Run: python -m pneumo_data.prepare "
            f"--source_dir=<images> --output_dir={data_dir}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from None
    _check_schema(path, data)
    return Manifest(data_dir=data_dir, data=data)


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


def _holds_images(folder: Path, depth: int = 3) -> bool:
    """True when image files (or NORMAL/PNEUMONIA folders) sit within ``depth`` levels."""
    for root, dirs, names in os.walk(folder):
        level = len(Path(root).relative_to(folder).parts)
        if any(d.upper() in ("NORMAL", "PNEUMONIA") for d in dirs) or \
                any(n.lower().endswith(_IMAGE_SUFFIXES) for n in names):
            return True
        if level >= depth - 1:
            dirs[:] = []
    return False


def write_manifest(out, data: dict[str, Any]) -> Path:
    """Writes the manifest into OutputDir ``out`` atomically (partial file, fsync, rename).

    ``out`` may also be a folder path, for a writer that owns the folder another way (the
    TFDS builder writes into the folder TFDS created for it).
    """
    if isinstance(out, (str, os.PathLike)):
        _check_schema(Path(out) / MANIFEST_NAME, data)
        return write_text(Path(out) / MANIFEST_NAME, json.dumps(data, indent=1) + "\n")
    _check_schema(out.path / MANIFEST_NAME, data)
    return out.write_text(MANIFEST_NAME, json.dumps(data, indent=1) + "\n")
