"""The files predict writes: their names, checks, GeoTIFF writers, tags and COG conversion."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from geoseg_cli import __version__
from geoseg_cli.checkpoint import ModelInfo
from geoseg_cli.errors import OutputError, UsageError
from geoseg_cli.faults import gdal_write_errors
from geoseg_cli.inference.plan import Plan
from geoseg_cli.raster import check_creation_options, check_output, output_profile
from geoseg_cli.vector import check_writable

#: Suffix of default output names: ``scene.tif`` → ``scene_pred.tif``.
OUTPUT_SUFFIX = "_pred"
#: File name endings of the class map (and so of the probabilities) written.
GEOTIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Outputs:
    """The files one prediction writes.

    Attributes:
        classes: The class map.
        probabilities: The per-class probabilities, or None.
        vector: The class polygons, or None.
    """

    classes: Path
    probabilities: Path | None = None
    vector: Path | None = None

    def all(self) -> list[Path]:
        """Every file, the class map first."""
        return [p for p in (self.classes, self.probabilities, self.vector) if p is not None]


def class_dtype(num_classes: int) -> tuple[str, int]:
    """Output type and nodata of the class map: uint8/255, or uint16/65535 above 255 classes."""
    return ("uint8", 255) if num_classes <= 255 else ("uint16", 65535)


def probabilities_path(output: Path) -> Path:
    """Where ``--probabilities`` writes: ``<output stem>_probabilities.tif`` beside it."""
    return output.with_name(f"{output.stem}_probabilities{output.suffix or '.tif'}")


def output_paths(
    inputs: Sequence[str], output: str | os.PathLike | None, suffix: str = ".tif"
) -> list[Path]:
    """Class-map path of each input.

    ``<stem>_pred.tif`` in the current folder by default, in ``output`` when it is a folder,
    or ``output`` itself for a single input.

    Raises:
        UsageError: Several inputs with a file output, or two inputs with the same name.
        OutputError: An output folder that does not exist.
    """
    names = [f"{PurePosixPath(str(i).split('?')[0]).stem}{OUTPUT_SUFFIX}{suffix}" for i in inputs]
    if output is None:
        paths = [Path.cwd() / n for n in names]
    elif Path(output).is_dir() or str(output).endswith(("/", os.sep)):
        if not Path(output).is_dir():
            raise OutputError(f"output folder {output} does not exist; create it first")
        paths = [Path(output) / n for n in names]
    elif len(inputs) > 1:
        raise UsageError(f"{len(inputs)} inputs need -o to be an existing folder, not {output}")
    else:
        paths = [Path(output)]
    if len(set(paths)) != len(paths):
        raise UsageError("two inputs have the same file name; predict them into separate folders")
    return paths


def vector_paths(vector: str | os.PathLike | None, outputs: Sequence[Path]) -> list[Path | None]:
    """Polygon file of each class map.

    ``vector`` itself for one output, or ``<output stem>.geojson`` inside ``vector`` when it
    is a folder.
    """
    if vector is None:
        return [None] * len(outputs)
    if Path(vector).is_dir() or str(vector).endswith(("/", os.sep)):
        if not Path(vector).is_dir():
            raise OutputError(f"vector folder {vector} does not exist; create it first")
        return [Path(vector) / f"{o.stem}.geojson" for o in outputs]
    if len(outputs) > 1:
        raise UsageError(f"{len(outputs)} inputs need --vector to be an existing folder")
    return [Path(vector)]


def check_outputs(
    output: Path,
    probabilities: bool,
    vector: Path | None,
    cog: bool,
    creation_options: dict[str, str],
    overwrite: bool,
    sources: Sequence[str | os.PathLike] = (),
) -> Outputs:
    """Check the class map and the extra outputs before any work.

    Raises:
        UsageError: An output not named .tif/.tiff, creation options GDAL rejects, a vector
            format geoseg cannot write, or an output that is an input.
        OutputError: An output exists (without ``overwrite``) or its folder is missing.
    """
    if output.suffix.lower() not in GEOTIFF_SUFFIXES:
        raise UsageError(
            f"{output}: predictions are GeoTIFFs; name the output .tif or .tiff "
            "(or give an existing folder)"
        )
    outputs = Outputs(output, probabilities_path(output) if probabilities else None, vector)
    check_creation_options(creation_options, "COG" if cog else "GTiff")
    if vector is not None:
        check_writable(vector)
    inputs = {Path(p).resolve() for p in sources if Path(p).exists()}
    for path in outputs.all():
        if path.resolve() in inputs:
            raise UsageError(f"{path} is an input raster; write the prediction elsewhere (-o)")
        check_output(path, overwrite)
    return outputs


def output_tags(info: ModelInfo, model_hash: str, plan: Plan, engine: str) -> dict[str, str]:
    """The GeoTIFF tags of a prediction: model, classes, window, stride, TTA, engine."""
    return {
        "GEOSEG_VERSION": __version__,
        "MODEL": f"{info.model.variant}/{info.model.backbone}",
        "MODEL_HASH": model_hash,
        "CLASSES": json.dumps({str(i): c.name for i, c in enumerate(info.classes)}),
        "WINDOW": str(plan.grid.window),
        "STRIDE": str(plan.grid.stride),
        "TTA": plan.tta or "none",
        "ENGINE": engine,
    }


class RowWriter:
    """Collects finished rows and writes them a block row at a time (each tile written once).

    Args:
        dst: The open output dataset.
        with_mask: Also write a valid-data mask (outputs without a nodata value).
    """

    def __init__(self, dst: rasterio.io.DatasetWriter, with_mask: bool) -> None:
        self.dst = dst
        self.rows = dst.block_shapes[0][0]
        self.buffer = np.zeros((dst.count, self.rows, dst.width), dtype=dst.dtypes[0])
        self.valid = np.zeros((self.rows, dst.width), dtype=np.uint8) if with_mask else None
        self.top = 0
        self.filled = 0

    def write(self, data: np.ndarray, valid: np.ndarray) -> None:
        """Append rows (``count×n×width``) and their valid mask (``n×width``)."""
        done = 0
        while done < data.shape[1]:
            n = min(data.shape[1] - done, self.rows - self.filled)
            self.buffer[:, self.filled : self.filled + n] = data[:, done : done + n]
            if self.valid is not None:
                self.valid[self.filled : self.filled + n] = np.where(valid[done : done + n], 255, 0)
            self.filled += n
            done += n
            if self.filled == self.rows:
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows."""
        if not self.filled:
            return
        window = Window(0, self.top, self.dst.width, self.filled)
        with gdal_write_errors(self.dst.name):
            self.dst.write(self.buffer[:, : self.filled], window=window)
            if self.valid is not None:
                self.dst.write_mask(self.valid[: self.filled], window=window)
        self.top += self.filled
        self.filled = 0

    def close(self) -> None:
        """Write the buffered rows and close the file (GDAL writes its cached blocks)."""
        self.flush()
        with gdal_write_errors(self.dst.name):
            self.dst.close()


@contextlib.contextmanager
def open_writers(
    src: rasterio.DatasetReader,
    region: Window,
    info: ModelInfo,
    tags: dict[str, str],
    class_path: Path,
    probabilities: tuple[Path, str] | None,
    creation_options: dict[str, str],
) -> Iterator[list[RowWriter]]:
    """Open the class map (and the probabilities) on ``region`` of ``src``'s grid.

    The class map gets the nodata value of :func:`class_dtype`, a colour table and the
    tags; the probabilities (path and dtype) one band per class, named after it, with a
    mask instead of a nodata value.

    Yields:
        A row writer per output, the class map first.
    """
    num_classes = info.model.num_classes
    dtype, nodata = class_dtype(num_classes)
    with contextlib.ExitStack() as stack:

        def create(path: Path, **profile: object) -> rasterio.io.DatasetWriter:
            dst = stack.enter_context(
                rasterio.open(
                    path,
                    "w",
                    **output_profile(
                        src, window=region, creation_options=creation_options, **profile
                    ),
                )
            )
            dst.update_tags(**tags)
            return dst

        class_dst = create(class_path, count=1, dtype=dtype, nodata=nodata)
        class_dst.set_band_description(1, "class")
        colormap = {i: (*c.color, 255) for i, c in enumerate(info.classes)}
        colormap[nodata] = (0, 0, 0, 0)
        class_dst.write_colormap(1, colormap)
        writers = [RowWriter(class_dst, with_mask=False)]
        if probabilities is not None:
            path, prob_dtype = probabilities
            prob_dst = create(path, count=num_classes, dtype=prob_dtype, nodata=None)
            for i, c in enumerate(info.classes, start=1):
                prob_dst.set_band_description(i, c.name)
            writers.append(RowWriter(prob_dst, with_mask=True))
        yield writers
        for writer in writers:
            writer.close()


def to_cog(source: Path, target: Path, resampling: str, creation_options: dict[str, str]) -> None:
    """Copy a GeoTIFF to a Cloud-Optimized GeoTIFF with overviews (GDAL's COG driver)."""
    options = {"COMPRESS": "DEFLATE", "BIGTIFF": "IF_SAFER", "OVERVIEW_RESAMPLING": resampling}
    options.update({key.upper(): value for key, value in creation_options.items()})
    with gdal_write_errors(target):
        rasterio.shutil.copy(source, target, driver="COG", **options)
