"""prepare's writing step (its TensorFlow half): planned files -> records -> shard files.

:func:`encode_record` is the one "planned file -> record bytes" step: the threaded
:func:`write_shards` here, the Beam writer (:mod:`pneumo_data.beam_writer`) and the TFDS builder
all call it, so their records are identical. Decoding is :func:`pneumo_data.preprocess.decode`
with the stage (a) settings of the prepare config; records follow
:mod:`pneumo_data.records`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib

from pneumo_data import records_tf
from pneumo_data.preprocess import DecodeError, decode
from pneumo_data.records import encode_image, shard_name


def _decode_one(entry, config):
    """(skip reason, None) or (None, encoded image) for one planned entry."""
    try:
        data = entry.source.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            return "source file changed while preparing", None
        decoded = decode(data, config.preprocess_spec())
        entry.dicom = decoded.dicom
        return None, encode_image(decoded.pixels, config.encoding, config.jpeg_quality)
    except DecodeError as error:
        return str(error), None
    except OSError as error:
        return f"unreadable: {error.strerror or error}", None


def encode_record(entry, config) -> tuple[str | None, bytes | None]:
    """(skip reason, None) or (None, serialized record) for one planned entry of a
    :class:`~pneumo_data.plan.Plan` under prepare config ``config``."""
    reason, encoded = _decode_one(entry, config)
    if reason:
        return reason, None
    s = entry.source
    return None, records_tf.serialize({
        "image": encoded, "label": s.label_index, "subtype": s.subtype,
        "patient_id": s.patient_id, "source_path": s.relpath, "source_sha256": entry.sha256})


def write_shards(plan, out, config, workers: int, bar=None) -> tuple[dict, dict]:
    """Decodes in ``workers`` threads, writes the plan's shards in order into OutputDir
    ``out``; returns (shard table, counts) for the manifest. ``bar``: a progress bar
    (``update(n)``) or None."""
    shard_table: dict[str, dict[str, list]] = {}
    counts: dict[str, dict[str, int]] = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        stream = ((e, pool.submit(encode_record, e, config)) for g in plan.groups
                  for e in g.entries)
        # Keep a bounded window of decodes in flight, consume in order.
        window: collections.deque = collections.deque()
        for group in plan.groups:
            entries_list = shard_table.setdefault(group.split, {}).setdefault(group.label, [])
            written, index, writer = 0, 0, None
            for position in range(len(group.entries)):
                while len(window) < 4 * workers + 1:
                    nxt = next(stream, None)
                    if nxt is None:
                        break
                    window.append(nxt)
                entry, future = window.popleft()
                reason, record = future.result()
                if bar is not None:
                    bar.update(1)
                target = group.shard_index(position)
                if writer is None or target != index:
                    if writer is not None:
                        entries_list.append(writer.close())
                    index = target
                    writer = records_tf.ShardWriter(
                        out, shard_name(group.split, group.label, index, group.shards))
                if reason:
                    entry.skip(reason)
                    continue
                writer.write(record)
                entry.status, entry.shard = "written", writer.final_path.name
                written += 1
            if writer is not None:
                entries_list.append(writer.close())
            counts.setdefault(group.split, {})[group.label] = written
    return shard_table, counts
