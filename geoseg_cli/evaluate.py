"""Score a predicted class map against reference labels, streamed by strips of rows."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg_cli.classes import PRESETS, ClassInfo, ClassTable, load_classes
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.faults import read_errors
from geoseg_cli.image_inputs import warn_unscored_labels
from geoseg_cli.labels import RasterLabels, VectorLabels
from geoseg_cli.labels import resolve_classes as infer_label_classes
from geoseg_cli.matching import MATCH_METHODS, matched_metrics
from geoseg_cli.metrics import ConfusionMatrix, Metrics, boundary_mask
from geoseg_cli.progress import progress
from geoseg_cli.raster import describe_grid, nodata_value, open_raster, same_grid
from geoseg_cli.vector import is_vector_path

log = logging.getLogger(__name__)

#: Pixels per strip when no block size is given (a few arrays of this many int64 values).
BLOCK_PIXELS = 1 << 20
#: The fix named when reference labels fall outside the classes.
_CLASSES_HINT = (
    "give --classes with every class, or set --ignore-index to the label value that marks "
    "unlabelled pixels"
)


def evaluate(
    pred_path: str | os.PathLike,
    label_path: str | os.PathLike,
    *,
    classes: ClassTable | Sequence[str] | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    boundary_erosion: int = 0,
    exclude_from_mean: Sequence[str | int] = (),
    present_only: bool = False,
    block_rows: int | None = None,
    class_field: str | None = None,
    class_value: int | None = None,
    match: str | None = None,
) -> Metrics:
    """Confusion matrix and scores of a class map (band 1) against reference labels.

    Memory is O(width × block rows), independent of the raster height. With boundary erosion
    R, each strip is read with R extra rows above and below so that pixels near strip borders
    are eroded exactly as in a whole-raster computation. Reference labels are read as ``geoseg
    tile`` reads them: a raster of class ids, or, with a class table, of raw values or RGB
    colours that it maps to class ids (e.g. the ISPRS colour-coded ground truth with the
    ``isprs`` preset), or vector polygons rasterised strip by strip on the prediction's grid.

    Args:
        pred_path: Predicted class map (e.g. the output of ``geoseg predict``). Its nodata
            pixels count as "no prediction" (errors of their reference class).
        label_path: Reference labels: a raster on the same grid holding class ids in band
            1, or, with a class table, raw values or RGB colours (bands 1-3) that it maps
            to class ids (its nodata and ``ignore_index`` pixels are not scored); or vector
            polygons, rasterised on the prediction's grid as ``geoseg tile`` rasterises
            them (pixels no polygon covers are class "background", else not scored).
        classes: A class table (names, ignore index, and how label values or colours map
            to class ids, as ``geoseg tile`` maps them; every value or colour in the labels
            must be in it), or class names whose number fixes K. Default:
            ``num_classes``, else the names ``geoseg predict`` stored in the prediction's
            tags, else K grows to the largest class id present in labels or prediction.
            For polygons without a table the classes are inferred as ``geoseg tile``
            infers them.
        num_classes: Number of classes when no names are given.
        ignore_index: Label value that is not scored (never a class id), or None; a class
            table's own replaces it.
        boundary_erosion: Radius R in pixels: reference pixels within R px of another
            class are not scored (ISPRS "eroded boundaries"); 0 scores every pixel.
        exclude_from_mean: Class names or indexes left out of mF1 and mIoU (e.g. clutter).
        present_only: Also leave out of the means every class absent from the reference
            (no scored label pixel), e.g. when a scene lacks some of the model's classes.
        block_rows: Rows per strip read at a time (default: about a million pixels).
        class_field: Polygon attribute holding the class (number or class name).
        class_value: Class value of every polygon (default 1 without ``class_field``).
        match: ``"hungarian"``: the prediction is a cluster map (e.g. of ``geoseg
            cluster``); each cluster is matched to at most one class before scoring
            (:mod:`geoseg_cli.matching`; unmatched clusters count as errors). The classes
            then come from ``classes``/``num_classes`` or the labels, never from the
            prediction's tags (which name its clusters).

    Returns:
        The scores (:meth:`Metrics.to_dict` for JSON); with ``match`` a
        :class:`~geoseg_cli.matching.MatchedMetrics` that also holds each cluster's class.

    Raises:
        InputError: Unreadable files, grids that differ, a non-integer class map, or label
            values, colours or polygon classes outside the classes.
        UsageError: Inconsistent class options, RGB labels without a class table, or a
            negative erosion radius.
    """
    polygons = None
    if is_vector_path(label_path):
        polygons = VectorLabels(str(label_path), class_field, class_value)
    elif class_field is not None or class_value is not None:
        raise UsageError("--class-field/--class-value apply to vector labels only")
    table = classes if isinstance(classes, ClassTable) else None
    if polygons is not None and table is None:
        table = infer_label_classes([polygons], None, ignore_index)
    if table is not None:
        classes, ignore_index = table.names, table.ignore_index
    if boundary_erosion < 0:
        raise UsageError(f"--boundary-erosion must be ≥ 0, got {boundary_erosion}")
    if match is not None and match not in MATCH_METHODS:
        raise UsageError(f"--match {match}: use one of {', '.join(MATCH_METHODS)}")
    if classes is not None:
        if num_classes is not None and num_classes != len(classes):
            raise UsageError(f"{len(classes)} class names but num_classes={num_classes}")
        num_classes = len(classes)
    if ignore_index is not None and num_classes is not None and 0 <= ignore_index < num_classes:
        raise UsageError(
            f"ignore index {ignore_index} is a class id (0..{num_classes - 1}); "
            "choose a value outside the classes, e.g. 255"
        )
    with open_raster(pred_path) as pred_src:
        if pred_src.count > 1:
            raise InputError(
                f"{pred_src.name} has {pred_src.count} bands, not a class map (one band of "
                "class ids, as geoseg predict writes; is it the image, or a "
                "_probabilities.tif?); give the prediction"
            )
        _check_class_map(pred_src)
        clusters = _tagged_classes(pred_src) if match else None
        if classes is None and num_classes is None and not match:
            classes = _tagged_classes(pred_src)
            num_classes = None if classes is None else len(classes)
        # clusters may outnumber the classes: count every id, match afterwards
        matrix = ConfusionMatrix(None if match else num_classes, ignore_index)
        with _label_reader(label_path, pred_src, table, polygons) as read_labels:
            try:
                dropped = _accumulate(matrix, pred_src, read_labels, boundary_erosion, block_rows)
            except ValueError as exc:
                raise InputError(f"{label_path}: {exc}; {_CLASSES_HINT}") from exc
        if table is None and polygons is None:  # a table's labels were checked as tile does
            with open_raster(label_path) as src:
                nodata = nodata_value(src)
            nodata_pixels, ignored = dropped
            pixels = pred_src.width * pred_src.height
            ignore = -1 if ignore_index is None else ignore_index
            warn_unscored_labels(str(label_path), pixels, nodata_pixels, nodata, ignored, ignore)
    names = list(classes) if classes is not None else None
    if present_only:
        absent = np.flatnonzero(matrix.counts.sum(axis=1) == 0).tolist()
        if absent:
            log.info(
                "classes absent from %s, left out of the means: %s",
                label_path,
                ", ".join(names[i] if names else str(i) for i in absent),
            )
        exclude_from_mean = [*exclude_from_mean, *absent]
    if match:
        if num_classes is None:  # the classes the labels hold
            num_classes = int(np.nonzero(matrix.counts.sum(axis=1))[0].max(initial=0)) + 1
        excluded = _class_indexes(exclude_from_mean, names, num_classes)
        try:
            metrics = matched_metrics(
                matrix.counts,
                num_classes,
                names,
                clusters,
                excluded,
                ignore_index,
                boundary_erosion,
            )
        except ValueError as exc:
            raise InputError(f"{label_path}: {exc}; {_CLASSES_HINT}") from exc
    else:
        excluded = _class_indexes(exclude_from_mean, names, matrix.num_classes)
        metrics = matrix.metrics(names, excluded, boundary_erosion)
    if metrics.pixels == 0:
        log.warning("%s: no labelled pixel was scored", label_path)
    return metrics


#: Reads rows ``(first row, count)`` of the reference labels as int64 class ids (negative or
#: the ignore index where a pixel is not scored).
LabelRows = Callable[[int, int], np.ndarray]


@contextlib.contextmanager
def _label_reader(
    path: str | os.PathLike,
    pred: rasterio.DatasetReader,
    table: ClassTable | None,
    polygons: VectorLabels | None,
) -> Iterator[LabelRows]:
    """Yield a reader of reference label rows on the grid of ``pred``.

    Band 1 of a label raster as class ids, or, through ``table``, label raster values or colours
    or polygons mapped to class ids (after checking that the table knows every one of them).
    """
    with contextlib.ExitStack() as stack:
        if polygons is None:
            src = stack.enter_context(open_raster(path))
            _check_grids(pred, src)
            _check_class_map(src, labels=True)
            if table is None:
                if src.count >= 3:
                    raise UsageError(
                        f"{src.name} has {src.count} bands (RGB colour labels?): pass --classes "
                        "with the class colours (a classes file, a preset such as isprs, or "
                        "the checkpoint)"
                    )
                yield lambda row, rows: _read_ids(src, row, rows)
                return
        source = polygons or RasterLabels(str(path))
        source.validate(table)
        read = stack.enter_context(source.reader(table, pred))
        yield lambda row, rows: read(Window(0, row, pred.width, rows)).astype(np.int64)


def _accumulate(
    matrix: ConfusionMatrix,
    pred_src: rasterio.DatasetReader,
    read_labels: LabelRows,
    radius: int,
    block_rows: int | None,
) -> tuple[int, int]:
    """Add every strip of rows to ``matrix``.

    Labels are read with ``radius`` rows of context above and below for the boundary erosion.

    Returns:
        The label pixels left unscored as nodata (negative ids) and as the ignore index,
        where the prediction has data.
    """
    nodata = ignored = 0
    height, width = pred_src.height, pred_src.width
    block_rows = block_rows or max(1, BLOCK_PIXELS // width)
    for row in progress(range(0, height, block_rows), desc="evaluate", unit="strip"):
        rows = min(block_rows, height - row)
        pred = _read_ids(pred_src, row, rows)
        top = max(row - radius, 0)
        bottom = min(row + rows + radius, height)
        labels = read_labels(top, bottom - top)
        mask = None
        if radius:
            halo = np.pad(
                labels,
                ((top - (row - radius), row + rows + radius - bottom), (0, 0)),
                constant_values=-1,
            )
            mask = ~boundary_mask(halo, radius, matrix.ignore_index)[radius : radius + rows]
        labels = labels[row - top : row - top + rows]
        matrix.update(pred, labels, mask)
        predicted = pred >= 0  # prediction nodata is image nodata: unlabelled as expected
        nodata += int(np.count_nonzero((labels < 0) & predicted))
        if matrix.ignore_index is not None:
            ignored += int(np.count_nonzero((labels == matrix.ignore_index) & predicted))
    return nodata, ignored


def _tagged_classes(src: rasterio.DatasetReader) -> list[str] | None:
    """Class names from the ``CLASSES`` tag that ``geoseg predict`` writes, if present."""
    try:
        tagged = json.loads(src.tags().get("CLASSES", "null"))
        names = [str(tagged[str(i)]) for i in range(len(tagged))] if tagged else None
    except (ValueError, TypeError, KeyError):
        return None
    if names:
        log.info("classes from %s: %s", src.name, ", ".join(names))
    return names


def resolve_classes(spec: str, ignore_index: int | None = None) -> ClassTable | list[str] | int:
    """Interpret a ``--classes`` value.

    Args:
        spec: A class count (``6``), comma-separated names (``road,building,tree``), a
            checkpoint (``best.pt``), a ``stats.json`` of ``geoseg tile``, a classes file
            (TOML/JSON) or a preset name (``isprs``).
        ignore_index: Replaces the ignore index a checkpoint, stats.json or classes file
            defines.

    Returns:
        A class table for a checkpoint, stats.json, classes file or preset (labels may then
        hold the raw values or colours it maps; a checkpoint's or stats.json's classes are
        their positions and their colours), else the names or the count.

    Raises:
        InputError: An unreadable or malformed file.
    """
    if spec.isdigit():
        return int(spec)
    path = Path(spec)
    if path.suffix.lower() == ".pt":
        from geoseg_cli.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        return _positional_table(ckpt.classes, ckpt.ignore_index, ignore_index, spec)
    if path.is_file() and path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(doc, dict) and "bands" in doc:  # stats.json of geoseg tile
            from geoseg_cli.chips import load_stats

            stats = load_stats(path)
            return _positional_table(stats.classes, stats.ignore_index, ignore_index, spec)
    if path.is_file() or spec in PRESETS:
        return load_classes(spec, ignore_index)
    names = [name.strip() for name in spec.split(",")]
    if len(names) < 2 or not all(names):
        raise UsageError(
            f"--classes {spec}: no such classes file; give a count, comma-separated names, "
            f"a classes file, a checkpoint or a preset ({', '.join(PRESETS)})"
        )
    return names


def _positional_table(
    classes: Sequence[ClassInfo], ignore_index: int, override: int | None, source: str
) -> ClassTable:
    """The class table of a checkpoint or stats.json: class ``i`` is label value ``i``."""
    return ClassTable(
        [ClassInfo(c.name, c.color) for c in classes],
        ignore_index if override is None else override,
        source=source,
    )


def _read_ids(src: rasterio.DatasetReader, row: int, rows: int) -> np.ndarray:
    """Band 1 rows as int64, -1 where nodata or not finite (no class, no prediction).

    Raises:
        InputError: The file fails to read, or a float band holds fractions.
    """
    with read_errors(src):
        raw = src.read(1, window=Window(0, row, src.width, rows))
    nodata = nodata_value(src)
    invalid = raw == nodata if nodata is not None else np.zeros(raw.shape, bool)
    if raw.dtype.kind == "f":
        invalid |= ~np.isfinite(raw)
        raw = np.where(invalid, -1, raw)
        if not np.array_equal(raw, np.round(raw)):
            raise InputError(
                f"{src.name}: class ids must be whole numbers; found fractions (is this an "
                "image rather than a label raster?)"
            )
    values = raw.astype(np.int64)
    values[invalid] = -1
    return values


def _check_class_map(src: rasterio.DatasetReader, labels: bool = False) -> None:
    """Refuse a band 1 that cannot hold class ids (integers; for labels, also floats)."""
    kind = np.dtype(src.dtypes[0]).kind
    if kind in "iu" or (labels and kind == "f"):
        return
    raise InputError(
        f"{src.name}: band 1 is {src.dtypes[0]}, not a class map; "
        "give integer class ids (e.g. the uint8 output of geoseg predict)"
    )


def _check_grids(pred: rasterio.DatasetReader, labels: rasterio.DatasetReader) -> None:
    if not same_grid(pred, labels):
        raise InputError(
            f"{pred.name} ({describe_grid(pred)}) and {labels.name} ({describe_grid(labels)}) "
            "are not on the same grid; predict on the labels' image, or resample the "
            "prediction onto the label grid (gdalwarp -r near with the labels' -te/-tr/-t_srs)"
        )


def _class_indexes(
    wanted: Sequence[str | int], names: Sequence[str] | None, num_classes: int
) -> list[int]:
    """Map class names (or integer ids, also as digit strings) to indexes."""
    indexes = []
    for item in wanted:
        if names is not None and item in names:
            indexes.append(list(names).index(item))
        elif str(item).isdigit() and int(item) < num_classes:
            indexes.append(int(item))
        else:
            valid = ", ".join(names) if names is not None else f"0..{num_classes - 1}"
            raise UsageError(f"--exclude-from-mean {item}: no such class; valid: {valid}")
    return indexes
