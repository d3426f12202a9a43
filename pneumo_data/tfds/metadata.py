"""TFDS metadata next to prepare's shards: every prepared folder is a TFDS dataset.

::

    # prepare writes it (and rewrites it when missing or stale); by hand, e.g. for a
    # folder prepared by an older pneumo:
    from pneumo_data.tfds import metadata
    metadata.write_tfds_metadata("data/xray")

    builder = tfds.builder_from_directory("data/xray")
    builder.info.splits.keys()      # train-normal, train-pneumonia, val-normal, ...
    train = builder.as_dataset(split=metadata.split_spec("train"))   # both classes
    pneumonia = builder.as_dataset(split="train-pneumonia")           # one class

What is written (``dataset_info.json``, ``features.json``,
``label.labels.txt``, ``metadata.json``) is derived from ``manifest.json``,
which stays the contract: :func:`check_tfds_metadata` compares the two and
raises :class:`TfdsMetadataError` when they disagree (a re-prepared folder
with stale TFDS files, a hand-edited manifest). No record is rewritten, so
the manifest's shard sha256s stay valid. The files are written through the
folder's :class:`~pneumo_data.common.outputs.OutputDir` (prepare's ledger
lists them; each is written under a partial name and renamed), after the
shards and before ``manifest.json``, which still marks a complete output.

TFDS names a split's files with a template; prepare's names
``train-pneumonia-00000-of-00002.tfrecord`` match ``{SPLIT}-{SHARD_X_OF_Y}.
{FILEFORMAT}`` with the split ``train-pneumonia``. So every split x class is
its own TFDS split (what the rebalanced stream reads class by class) and a
whole split is TFDS split arithmetic, ``train-normal+train-pneumonia``
(:func:`split_spec`). A split x class without images has no files and is left
out of the TFDS splits.

Features (the records' keys are unchanged):

============= ============================================ =====================
key           TFDS feature                                 decoded
============= ============================================ =====================
image         :class:`~pneumo_data.tfds.features.RawImage`  uint8 [S, S, 1]
              (raw) or ``Image(encoding_format=png|jpeg)``
label         ``ClassLabel(names=manifest classes)``       int64
subtype       ``Text``                                     string
patient_id    ``Text``                                     string
source_path   ``Text``                                     string
source_sha256 ``Text``                                     string
============= ============================================ =====================
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters, naming

from pneumo_data import manifest as manifest_lib
from pneumo_data.common.errors import UserError
from pneumo_data.common.outputs import OutputDir
from pneumo_data.records import FEATURES
from pneumo_data.sources import CLASSES
from pneumo_data.tfds.features import RawImage

# TensorFlow Datasets is imported absolutely (this package is itself named ``tfds``).

__all__ = ["TfdsMetadataError", "write_tfds_metadata", "check_tfds_metadata",
           "ensure_tfds_metadata", "load_builder", "split_spec", "tfds_split_name",
           "dataset_info", "source_reference", "METADATA_FILES", "KERMANY_CITATION"]

log = logging.getLogger("pneumo.tfds")

DATASET_NAME = "pneumo_prepared"
DATASET_VERSION = "1.0.0"
FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
# The files TFDS's DatasetInfo.write_to_directory writes for our features.
METADATA_FILES = ("dataset_info.json", "features.json", "label.labels.txt", "metadata.json")

HOMEPAGE = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
# One copy of the citation: the builder's CITATIONS.bib (TFDS reads it from there too).
KERMANY_CITATION = (Path(__file__).resolve().parent / "chest_xray_pneumonia"
                    / "CITATIONS.bib").read_text()

KERMANY_DESCRIPTION = """\
Chest X-ray images (anterior-posterior) of pediatric patients aged one to five years from
Guangzhou Women and Children's Medical Center, labelled normal or pneumonia (bacterial or
viral) by Kermany et al. (2018); distributed as Mendeley Data v2 (CC BY 4.0) and as the
Kaggle "chest-xray-pneumonia" folder. The citation below is that dataset's: if these
images come from another source, cite that source instead."""

# The public collections pneumo's presets read (pneumo_data.sources.presets): a folder
# prepared from one of them names and cites it. Any other source (a CSV-labelled export)
# gets no citation, and its description says to cite where the images came from.
_REFERENCES = {
    "rsna": ("""\
@article{shih2019augmenting,
  author  = {Shih, George and Wu, Carol C. and Halabi, Safwan S. and others},
  title   = {Augmenting the National Institutes of Health Chest Radiograph Dataset with
             Expert Annotations of Possible Pneumonia},
  journal = {Radiology: Artificial Intelligence},
  volume  = {1},
  number  = {1},
  pages   = {e180041},
  year    = {2019},
  doi     = {10.1148/ryai.2019180041},
}""", "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge",
             "RSNA Pneumonia Detection Challenge images (a subset of NIH ChestX-ray14 with "
             "radiologists' pneumonia annotations)."),
    "nih": ("""\
@inproceedings{wang2017chestxray8,
  author    = {Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and
               Bagheri, Mohammadhadi and Summers, Ronald M.},
  title     = {{ChestX-ray8}: Hospital-scale Chest X-ray Database and Benchmarks on
               Weakly-Supervised Classification and Localization of Common Thorax Diseases},
  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2017},
  doi       = {10.1109/CVPR.2017.369},
}""", "https://nihcc.app.box.com/v/ChestXray-NIHCC", "NIH ChestX-ray14 images."),
    "chexpert": ("""\
@inproceedings{irvin2019chexpert,
  author    = {Irvin, Jeremy and Rajpurkar, Pranav and Ko, Michael and others},
  title     = {{CheXpert}: A Large Chest Radiograph Dataset with Uncertainty Labels and
               Expert Comparison},
  booktitle = {AAAI Conference on Artificial Intelligence},
  year      = {2019},
  doi       = {10.1609/aaai.v33i01.3301590},
}""", "https://stanfordmlgroup.github.io/competitions/chexpert/", "CheXpert images."),
}


def source_reference(data: Mapping[str, Any]) -> tuple[str, str, str]:
    """(citation, homepage, description paragraph) for the source a manifest was prepared from.

    Kaggle-layout folders (and manifests older than presets) cite Kermany et al.; the
    rsna, nih and chexpert presets their collections; anything else nothing.
    """
    source = data.get("source", {})
    preset = source.get("preset") or "kaggle"
    if preset == "kaggle":
        return KERMANY_CITATION, HOMEPAGE, KERMANY_DESCRIPTION
    if preset in _REFERENCES:
        citation, homepage, what = _REFERENCES[preset]
        return citation, homepage, (f"{what} The citation below is that collection's: if "
                                    f"these images come from elsewhere, cite that source.")
    name = source.get("dataset_name") or "the source folder"
    return "", "", (f"Images from {name} (a {preset} source). pneumo does not know where they "
                    f"come from: cite that source.")


class TfdsMetadataError(UserError):
    """The TFDS metadata of a prepared folder is missing or disagrees with its manifest."""


def tfds_split_name(split: str, label: str) -> str:
    """The TFDS split of one split x class: its shard files' name prefix."""
    return f"{split}-{label}"


def _as_manifest(data_dir, manifest) -> manifest_lib.Manifest:
    if manifest is None:
        return manifest_lib.load_manifest(data_dir)
    if isinstance(manifest, manifest_lib.Manifest):
        return manifest
    return manifest_lib.Manifest(data_dir=Path(data_dir), data=dict(manifest))


def _class_splits(m: manifest_lib.Manifest) -> list[tuple[str, str, list[dict]]]:
    """(split, label, shard entries) for every split x class with records, manifest order."""
    result = []
    for split in m.splits:
        for label in m.classes:
            entries = m.data["shards"][split].get(label, [])
            if sum(e["records"] for e in entries) > 0:
                result.append((split, label, entries))
    return result


def split_spec(split: str, data_dir=None, manifest=None) -> str:
    """TFDS split string for a whole split: ``train-normal+train-pneumonia``.

    Args:
      split: a split of the manifest (``train``, ``val``, ``test``).
      data_dir, manifest: the prepared folder (or its loaded manifest). Without
        either, both classes are named (``normal``, ``pneumonia``).
    """
    if data_dir is None and manifest is None:
        return "+".join(tfds_split_name(split, label) for label in CLASSES)
    m = _as_manifest(data_dir, manifest)
    m.require_split(split)
    names = [tfds_split_name(s, label) for s, label, _ in _class_splits(m) if s == split]
    if not names:
        raise manifest_lib.ManifestError(f"{m.data_dir}: split {split!r} holds no images")
    return "+".join(names)


def manifest_digest(data: Mapping[str, Any]) -> str:
    """sha256 of what the TFDS metadata is derived from (classes, image, shards).

    Timestamps and timings are left out, so two preparations with identical
    shards have the same digest.
    """
    core = {key: data[key] for key in ("classes", "image", "shards")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def image_feature(image: Mapping[str, Any]):
    """The TFDS feature that decodes the stored image bytes without rewriting them."""
    size, channels = int(image["size"]), int(image.get("channels", 1))
    shape = (size, size, channels)
    encoding = image["encoding"]
    doc = f"{size}x{size} grayscale, stored {encoding}, resized by {image.get('resize', '?')}"
    if encoding == "raw":
        return RawImage(shape=shape, doc=doc)
    if encoding in ("png", "jpeg"):
        return tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format=encoding, doc=doc)
    raise TfdsMetadataError(f"no TFDS image feature for stored encoding {encoding!r}")


def feature_dict(image: Mapping[str, Any], classes):
    """The ``FeaturesDict`` of pneumo's records, derived from
    :data:`pneumo_data.records.FEATURES` (see the module table).

    Args:
      image: the manifest's ``image`` entry (size, channels, encoding, resize).
      classes: class names in label order.
    """
    connectors = {
        "image": lambda f: image_feature(image),
        "label": lambda f: tfds.features.ClassLabel(names=list(classes)),
        "text": lambda f: tfds.features.Text(doc=f.doc),
    }
    return tfds.features.FeaturesDict({f.name: connectors[f.kind](f) for f in FEATURES})


def features(m: manifest_lib.Manifest):
    """The ``FeaturesDict`` matching a prepared folder's records."""
    return feature_dict(m.data["image"], m.classes)


def _description(m: manifest_lib.Manifest, source_paragraph: str) -> str:
    data = m.data
    lines = [
        f"A folder prepared by pneumo {data.get('library_version', '?')} "
        f"(manifest {manifest_lib.MANIFEST_NAME} is the contract; this metadata is derived "
        f"from it).",
        f"Images: {m.image_size}x{m.image_size} grayscale uint8, stored "
        f"{m.encoding}, resize={data['image'].get('resize')}. Split mode: "
        f"{data.get('source', {}).get('split_mode')}, seed "
        f"{data.get('options', {}).get('seed')}; patient-grouped (patient id and identical "
        f"content never cross splits).",
        "Every split x class is a TFDS split (train-normal, train-pneumonia, ...); a whole "
        "split is their sum, e.g. split='" + "+".join(
            tfds_split_name("train", label) for label in m.classes) + "'.",
        "Counts: " + "; ".join(
            f"{split} " + ", ".join(f"{label} {n}" for label, n in by_class.items())
            for split, by_class in data["counts"].items()) + ".",
    ]
    return "\n".join(lines) + "\n\n" + source_paragraph


def dataset_info(data_dir, manifest=None, *, description: str | None = None,
                 citation: str | None = None, homepage: str | None = None):
    """The ``tfds.core.DatasetInfo`` of a prepared folder, with its split infos set.

    Args:
      data_dir: the prepared folder.
      manifest: its manifest (a ``Manifest`` or the manifest dict); default:
        ``data_dir/manifest.json``.
      description: replaces the generated description.
      citation, homepage: of the source dataset (default: from the manifest's source,
        :func:`source_reference`).
    """
    m = _as_manifest(data_dir, manifest)
    data_dir = Path(data_dir)
    known_citation, known_homepage, source_paragraph = source_reference(m.data)
    template = naming.ShardedFileTemplate(data_dir=data_dir, template=FILENAME_TEMPLATE,
                                          dataset_name=DATASET_NAME, filetype_suffix="tfrecord")
    split_infos = [
        tfds.core.SplitInfo(name=tfds_split_name(split, label),
                            shard_lengths=[int(e["records"]) for e in entries],
                            num_bytes=sum(int(e["bytes"]) for e in entries),
                            filename_template=template.replace(split=tfds_split_name(split, label)))
        for split, label, entries in _class_splits(m)]
    if not split_infos:
        raise TfdsMetadataError(f"{data_dir}: the manifest lists no records")
    # The module TFDS reads such folders with (builder_from_directory), so that reading
    # back does not log "fields info.[module_name] differ on disk and in the code".
    identity = tfds.core.DatasetIdentity(name=DATASET_NAME,
                                         version=tfds.core.Version(DATASET_VERSION),
                                         data_dir=os.fspath(data_dir),
                                         module_name="tensorflow_datasets.core.read_only_builder")
    combined = {split: "+".join(tfds_split_name(s, label) for s, label, _ in _class_splits(m)
                                if s == split) for split in m.splits}
    info = tfds.core.DatasetInfo(
        builder=identity,
        description=description or _description(m, source_paragraph),
        features=features(m),
        supervised_keys=("image", "label"),
        homepage=known_homepage if homepage is None else homepage,
        citation=known_citation if citation is None else citation,
        metadata=tfds.core.MetadataDict(
            pneumo_manifest_digest=manifest_digest(m.data),
            classes=list(m.classes),
            splits={split: spec for split, spec in combined.items() if spec}),
    )
    info.set_file_format(file_adapters.FileFormat.TFRECORD)
    info.set_splits(tfds.core.SplitDict(split_infos))
    return info


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS logs every metadata load at INFO through absl; prepare's output stays quiet."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(old)


def write_tfds_metadata(out, manifest=None, *, check: bool = True,
                        **info_kwargs) -> list[Path]:
    """Writes TFDS metadata for a prepared folder; returns the files written.

    TFDS renders the files into a temporary folder; each is then written into the
    prepared folder through its ledger, under a partial name, and renamed, so none is
    ever half-written and ``--overwrite`` removes them with the shards. prepare calls
    this after the shards and before the manifest (passing the manifest dict it is
    about to write): the manifest, written last, still marks a complete output.

    Args:
      out: the prepared folder's open :class:`~pneumo_data.common.outputs.OutputDir`
        (inside prepare), or the folder's path (it is then opened as prepare's output
        for the time of the write: locked, and refused if prepare did not write it).
      manifest: the manifest (``Manifest`` or dict); default: read from the folder.
      check: afterwards, load the folder with ``tfds.builder_from_directory``
        and compare with the manifest (:func:`check_tfds_metadata`).
      **info_kwargs: ``description``, ``citation``, ``homepage`` (see
        :func:`dataset_info`).
    """
    if not isinstance(out, OutputDir):
        with OutputDir(out, job="prepare") as opened:
            return write_tfds_metadata(opened, manifest, check=check, **info_kwargs)
    data_dir = out.path
    m = _as_manifest(data_dir, manifest)
    m.verify(checksums=False)  # the shards TFDS will read exist with their sizes
    info = dataset_info(data_dir, m, **info_kwargs)
    with tempfile.TemporaryDirectory(prefix="pneumo-tfds-metadata-") as staging:
        info.write_to_directory(staging)
        rendered = sorted(Path(staging).iterdir())
        unexpected = [p.name for p in rendered if p.name not in METADATA_FILES]
        if unexpected:
            raise RuntimeError(f"TFDS wrote unexpected metadata files {unexpected}; "
                               f"add them to METADATA_FILES")
        # dataset_info.json last: it is the file TFDS looks for first.
        rendered.sort(key=lambda p: p.name == "dataset_info.json")
        written = [out.write_text(p.name, p.read_text()) for p in rendered]
    if check:
        check_tfds_metadata(data_dir, m)
    return sorted(written)


def ensure_tfds_metadata(out: OutputDir, manifest) -> bool:
    """Rewrites the TFDS metadata of prepared folder ``out`` when it is missing or stale.

    Returns True when it was (re)written. prepare calls it on its up-to-date path, so
    folders prepared before pneumo wrote TFDS metadata get it on the next run. Reads
    no records: about a second (most of it importing TensorFlow Datasets).
    """
    try:
        check_tfds_metadata(out.path, manifest)
        return False
    except TfdsMetadataError as error:
        log.info("writing TFDS metadata: %s", error)
    write_tfds_metadata(out, manifest)
    return True


def check_tfds_metadata(data_dir, manifest=None) -> None:
    """Raises :class:`TfdsMetadataError` unless the TFDS metadata matches the manifest.

    Compares what TFDS will use to read the folder: split names, each split's
    shard files and lengths, the image feature (shape, stored encoding), the
    label names, and the digest of the manifest recorded at writing time.
    """
    m = _as_manifest(data_dir, manifest)
    data_dir = Path(data_dir)
    if not (data_dir / "dataset_info.json").exists():
        raise TfdsMetadataError(
            f"{data_dir} has no TFDS metadata (dataset_info.json); re-run prepare on it "
            f"(an up-to-date folder only gets its metadata written) or call "
            f"pneumo_data.tfds.metadata.write_tfds_metadata({str(data_dir)!r})")
    try:
        with _quiet_tfds():
            builder = tfds.builder_from_directory(os.fspath(data_dir))
    except Exception as error:  # TFDS raises many kinds on unreadable metadata
        raise TfdsMetadataError(f"{data_dir}: TFDS cannot load its metadata: {error}") from None
    problems = []
    expected = {tfds_split_name(s, label): entries for s, label, entries in _class_splits(m)}
    got = dict(builder.info.splits)
    if sorted(got) != sorted(expected):
        problems.append(f"TFDS splits {sorted(got)} but the manifest has {sorted(expected)}")
    for name in sorted(set(got) & set(expected)):
        info, entries = got[name], expected[name]
        lengths = [int(e["records"]) for e in entries]
        if list(info.shard_lengths) != lengths:
            problems.append(f"split {name}: TFDS shard lengths {list(info.shard_lengths)}, "
                            f"manifest {lengths}")
        files = sorted(p.name for p in info.filepaths)
        if files != sorted(e["file"] for e in entries):
            problems.append(f"split {name}: TFDS reads {files}, the manifest lists "
                            f"{sorted(e['file'] for e in entries)}")
    feature = builder.info.features["image"]
    want = image_feature(m.data["image"])
    if (type(feature) is not type(want) or tuple(feature.shape) != tuple(want.shape)
            or getattr(feature, "encoding_format", None) != getattr(want, "encoding_format", None)):
        problems.append(f"image feature {type(feature).__name__}{tuple(feature.shape)} "
                        f"(encoding {getattr(feature, 'encoding_format', None)}) does not decode "
                        f"{m.encoding} images of size {m.image_size}")
    names = list(builder.info.features["label"].names)
    if names != list(m.classes):
        problems.append(f"label names {names}, manifest classes {list(m.classes)}")
    digest = dict(builder.info.metadata or {}).get("pneumo_manifest_digest")
    if digest != manifest_digest(m.data):
        problems.append("the manifest changed after the TFDS metadata was written "
                        "(recorded digest differs)")
    if problems:
        raise TfdsMetadataError(
            f"{data_dir}: TFDS metadata does not match {manifest_lib.MANIFEST_NAME}: "
            + "; ".join(problems) + ". Re-run prepare on it (an up-to-date folder only gets "
            "its metadata rewritten), or call write_tfds_metadata")


def load_builder(data_dir):
    """``tfds.builder_from_directory(data_dir)`` after checking it against the manifest."""
    check_tfds_metadata(data_dir)
    return tfds.builder_from_directory(os.fspath(data_dir))
