r"""TFDS builder for the Kermany et al. chest X-ray folder, built with pneumo's ingest rules.

::

    tfds build chest_xray_pneumonia/256 --imports=pneumo_data.tfds.chest_xray_pneumonia \
        --manual_dir=~/Downloads/chest_xray
    tfds build chest_xray_pneumonia/256 --imports=pneumo_data.tfds.chest_xray_pneumonia \
        --manual_dir=... --beam_pipeline_options="runner=FnApiRunner,direct_num_workers=2,\
    direct_running_mode=multi_processing"

Planning is pneumo's (:func:`pneumo_data.plan.make_plan`: find, hash,
patient-grouped split, leakage check), so every file lands in the split
``prepare`` gives it for the same options and seed. Each example comes from
prepare's own "planned file -> record" step (:func:`pneumo_data.shard_writer.encode_record`:
read, check the hash, decode, encode), so the stored image bytes are prepare's.
TFDS then writes, shuffles and shards the examples its own way (its file names,
its record order).

With Beam options in the download config (``tfds build --beam_pipeline_options``
or ``DownloadConfig(beam_options=...)``), ``_generate_examples`` returns a Beam
``PTransform`` and TFDS runs decoding and writing on that pipeline.

After TFDS has written the splits, the builder writes pneumo's
``manifest.json`` into the same folder (still TFDS's ``incomplete`` folder, so it
appears with everything else): every shard with its records, size and sha256
(read back from the written files), and every source file's row (written, or
skipped with the reason), so ``pneumo_data.train_dataset`` and ``eval_dataset``
read the TFDS folder as they read a prepared one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import tensorflow as tf
import tensorflow_datasets as tfds

from pneumo_data import __version__, records_tf, sources
from pneumo_data import manifest as manifest_lib
from pneumo_data.common.config import with_leaves
from pneumo_data.common.errors import UserError
from pneumo_data.common.files import file_sha256
from pneumo_data.plan import make_plan, source_fingerprint
from pneumo_data.prepare import PrepareConfig, manifest_data
from pneumo_data.preprocess import DEFAULT_MAX_PIXELS
from pneumo_data.preprocess.dicom import looks_like_dicom
from pneumo_data.shard_writer import encode_record
from pneumo_data.tfds import metadata

log = logging.getLogger("pneumo.tfds.builder")


class ManualDirError(UserError):
    """The manual dir does not hold the chest X-ray folder."""


@dataclasses.dataclass(eq=False)
class ChestXrayConfig(tfds.core.BuilderConfig):
    """Options of one stored version; the names match ``PrepareConfig``'s fields."""

    image_size: int = 256
    resize: str = "stretch"
    encoding: str = "raw"  # raw, png or jpeg: the bytes prepare stores, unchanged
    jpeg_quality: int = 95
    resplit: str = "official"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    patient_id_regex: str = sources.DEFAULT_PATIENT_ID_REGEX
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast_jpeg: bool = True
    allow_leakage: bool = False

    def prepare_config(self, source_dir):
        """The equivalent ``PrepareConfig`` (same split, same decode, same stored bytes)."""
        leaves = {f.name: getattr(self, f.name) for f in dataclasses.fields(ChestXrayConfig)
                  if f.name not in _TFDS_FIELDS}
        config = with_leaves(PrepareConfig(), output_dir="(tfds)", source_dir=str(source_dir),
                             progress=False, **leaves)
        config.validate()
        return config


_TFDS_FIELDS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}


class Builder(tfds.core.GeneratorBasedBuilder):
    """Kermany et al. (2018) pediatric chest X-rays, normal vs pneumonia, per split x class."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "pneumo's patient-grouped split and decode; splits per class."}
    BUILDER_CONFIGS = [
        ChestXrayConfig(name="224", image_size=224,
                        description="224x224 grayscale, stored raw (the common backbone size)"),
        ChestXrayConfig(name="256", image_size=256,
                        description="256x256 grayscale, stored raw (pneumo's default)"),
    ]
    DEFAULT_CONFIG_NAME = "256"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the chest X-ray images of Kermany et al. (2018), either
      * from Kaggle, dataset "paultimothymooney/chest-xray-pneumonia"
        (https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia;
        `kaggle datasets download -d paultimothymooney/chest-xray-pneumonia`), or
      * from Mendeley Data v2, doi:10.17632/rscbjbr9sj.2
        (https://data.mendeley.com/datasets/rscbjbr9sj/2: the chest X-ray archive, not
        the OCT images).
    Unzip it and pass the unzipped folder as the manual dir
    (`tfds build ... --manual_dir=FOLDER`, or
    `DownloadConfig(manual_dir=FOLDER)`; the default is
    `~/tensorflow_datasets/downloads/manual/`). The folder must hold
    `train|val|test/NORMAL|PNEUMONIA/<images>`, directly or under `chest_xray/`
    (the Kaggle archive nests it, sometimes twice). A folder with only
    `NORMAL/` and `PNEUMONIA/` works too: everything is then split by patient.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        image = {"size": config.image_size, "channels": 1, "encoding": config.encoding,
                 "resize": config.resize}
        return self.dataset_info_from_configs(
            features=metadata.feature_dict(image, sources.CLASSES),
            supervised_keys=("image", "label"),
            homepage=metadata.HOMEPAGE,
        )

    # ------------------------------------------------------------ generation

    def _download_and_prepare(self, dl_manager, download_config):
        self._pneumo_beam = (download_config.beam_options is not None
                             or download_config.beam_runner is not None)
        self._pneumo_started = time.perf_counter()
        super()._download_and_prepare(dl_manager, download_config)
        if download_config.max_examples_per_split is not None:
            log.warning("max_examples_per_split is set: not writing pneumo's manifest.json "
                        "(the folder holds a sample, not the dataset)")
            return
        self._write_pneumo_manifest()

    def _split_generators(self, dl_manager):
        manual_dir = Path(dl_manager.manual_dir).resolve()
        config = self.builder_config.prepare_config(manual_dir)
        try:
            scan = sources.scan(config.source_dir, config.source, config.patient_id_regex)
            present = {f.label for f in scan.files if f.skip_reason is None}
            if len(present) < 2:
                raise ManualDirError(f"{manual_dir}: only class {sorted(present)} has files; "
                                     f"both NORMAL and PNEUMONIA folders with images are needed")
        except (UserError, OSError) as error:
            raise ManualDirError(f"{error}\n\nManual download instructions:\n"
                                 f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
        # A LeakageError (a patient in the official test split and in train) passes as is.
        plan = make_plan(scan, config, os.cpu_count() or 1, _no_progress, log)
        self._pneumo_plan = (config, scan, source_fingerprint(scan), plan)
        return {metadata.tfds_split_name(g.split, g.label): self._generate_examples(g.entries,
                                                                                     config)
                for g in plan.groups if g.entries}

    def _generate_examples(self, entries, config):
        if getattr(self, "_pneumo_beam", False):
            import apache_beam as beam
            return beam.Create(list(entries)) | beam.FlatMap(_examples_of, config=config)
        return (example for entry in entries for example in _examples_of(entry, config))

    # ------------------------------------------------------------ pneumo's manifest

    def _write_pneumo_manifest(self) -> None:
        config, scan, fingerprint, plan = self._pneumo_plan
        shard_table: dict = {}
        counts: dict = {}
        written: dict[str, str] = {}  # relpath -> shard file
        for g in plan.groups:
            entries = shard_table.setdefault(g.split, {}).setdefault(g.label, [])
            counts.setdefault(g.split, {})[g.label] = 0
            info = self.info.splits.get(metadata.tfds_split_name(g.split, g.label))
            for path in sorted(info.filepaths) if info is not None else []:
                relpaths = [r.numpy().decode() for r in tf.data.TFRecordDataset(str(path)).map(
                    lambda x: records_tf.parse(x, names=("source_path",))[
                        "source_path"])]
                entries.append({"file": Path(path).name, "records": len(relpaths),
                                "bytes": os.path.getsize(path), "sha256": file_sha256(path)})
                counts[g.split][g.label] += len(relpaths)
                written.update((relpath, Path(path).name) for relpath in relpaths)
        for g in plan.groups:
            for entry in g.entries:
                if entry.source.relpath in written:
                    if self._pneumo_beam and entry.dicom is None and _looks_like_dicom(entry):
                        encode_record(entry, config)  # the header info a Beam worker read
                    entry.status, entry.shard = "written", written[entry.source.relpath]
                else:  # not written: run the step again for the reason
                    reason = encode_record(entry, config)[0]
                    entry.skip(reason or "not written by the TFDS build")
        data = manifest_data(config, scan, fingerprint, plan, shard_table, counts,
                             time.perf_counter() - self._pneumo_started, __version__)
        data["options"].pop("shard_mb", None)  # TFDS chose the shards
        data["tfds"] = {"name": self.name, "config": self.builder_config.name,
                        "version": str(self.version)}
        manifest_lib.write_manifest(Path(self.data_dir), data)


def _no_progress(iterable, total, desc):
    return iterable


def _looks_like_dicom(entry) -> bool:
    """DICOM by content, as prepare's decode decides (:func:`pneumo_data.preprocess.decode`)."""
    with open(entry.source.path, "rb") as handle:
        head = handle.read(256)
    return looks_like_dicom(head)


def _examples_of(entry, config):
    """``[(key, example)]`` for a planned entry, ``[]`` when it does not decode.

    The example holds exactly what prepare's record for the entry holds.
    """
    reason, record = encode_record(entry, config)
    if reason:
        logging.getLogger("pneumo.tfds.builder").warning("skipping %s: %s",
                                                         entry.source.relpath, reason)
        return []
    return [(entry.source.relpath, records_tf.values(record))]
