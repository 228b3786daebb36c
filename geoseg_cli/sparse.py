"""Sparse labels: points, lines and polygons burnt with pixel buffers, the rest ignored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import rasterio
import shapely
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg_cli.classes import ClassTable
from geoseg_cli.errors import UsageError
from geoseg_cli.labels import LabelReader, LabelSource, RasterLabels, VectorLabels, open_labels
from geoseg_cli.vector import is_vector_path

#: Default buffer of points, in pixels.
POINT_BUFFER = 2.0
#: Default buffer of lines, in pixels.
LINE_BUFFER = 1.0
#: Segments per quarter circle of the buffers' round parts.
_QUAD_SEGS = 8
#: Buffer polygons circumscribe the true round buffer (their edges touch a circle of the
#: buffer radius from outside), and a pixel centre at exactly the buffer distance is inside.
_RADIUS_FACTOR = 1 / np.cos(np.pi / (4 * _QUAD_SEGS))
_TOLERANCE = 1e-3


class SparseVectorLabels(VectorLabels):
    """Points, lines and polygons burnt with pixel buffers; unlabelled pixels are ignore.

    Reads the file, its classes and CRS exactly as :class:`~geoseg_cli.labels.VectorLabels`.
    ``geoseg tile --sparse`` burns digitised points and lines (scribbles) into label chips
    with a buffer measured in pixels of the image grid, whatever its CRS:

    - points (``Point``, ``MultiPoint``): the pixel holding the point, and every pixel whose
      centre lies within the point buffer (default :data:`POINT_BUFFER` px: a disc of 13 px
      around a point at a pixel centre);
    - lines (``LineString``, ``MultiLineString``): every pixel the line touches, and every pixel
      whose centre lies within the line buffer (default :data:`LINE_BUFFER` px: a band three
      pixels wide along a horizontal line);
    - polygons: their interior, burnt as dense tiling burns polygons (pixel centres inside),
      without a buffer: a polygon says "all of this area is the class". To label only a
      polygon's outline, convert it to lines first (QGIS "Polygons to lines", or
      ``ogr2ogr -nlt MULTILINESTRING``).

    ``--buffer PX`` replaces both the point and the line buffer (0: only the touched pixels).
    Round buffers are polygons of 8 segments per quarter circle drawn around the true circle,
    so a pixel centre up to 0.5 % of the buffer beyond it may be burnt too.
    Every other pixel is the ignore index, never a background class. Buffers and polygons are
    drawn first, in file order (later features over earlier ones), then the pixels the points
    and lines touch: a buffer never covers another feature's own pixels.

    Args:
        path: Vector file.
        class_field: Attribute holding each feature's class (number or class name).
        class_value: Class value of every feature (instead of ``class_field``).
        buffer: Buffer of points and lines in pixels (default: :data:`POINT_BUFFER` for
            points, :data:`LINE_BUFFER` for lines).
    """

    fills_background = False

    def __init__(
        self,
        path: str,
        class_field: str | None = None,
        class_value: int | None = None,
        buffer: float | None = None,
    ) -> None:
        if buffer is not None and not buffer >= 0:
            raise UsageError(f"--buffer must be ≥ 0 pixels, not {buffer}")
        super().__init__(path, class_field, class_value)
        self.point_buffer = POINT_BUFFER if buffer is None else float(buffer)
        self.line_buffer = LINE_BUFFER if buffer is None else float(buffer)

    @contextlib.contextmanager
    def reader(self, table: ClassTable, image: rasterio.DatasetReader) -> Iterator[LabelReader]:
        """Yield a function that burns the features over a window of ``image``."""
        with super().reader(table, image):  # its checks, and its warning when nothing overlaps
            shapes, tree = self._geometries_in(image)
            ids = self._ids(table)
            dims = shapely.get_dimensions(shapes)
            radii = (
                np.where(dims == 0, self.point_buffer, self.line_buffer) * _RADIUS_FACTOR
                + _TOLERANCE
            )
            margin = int(np.ceil(max(self.point_buffer, self.line_buffer))) + 1

            def read(window: Window) -> np.ndarray:
                out_shape = (int(window.height), int(window.width))
                out = np.full(out_shape, table.ignore_index, dtype=table.dtype)
                reach = Window(
                    window.col_off - margin,
                    window.row_off - margin,
                    window.width + 2 * margin,
                    window.height + 2 * margin,
                )
                hits = np.sort(
                    tree.query(shapely.box(*rasterio.windows.bounds(reach, image.transform)))
                )
                if not hits.size:
                    return out
                pixels = _to_pixels(shapes[hits], window_transform(window, image.transform))
                drawn = dims[hits] < 2
                burnt = pixels.copy()
                burnt[drawn] = shapely.buffer(
                    pixels[drawn], radii[hits][drawn], quad_segs=_QUAD_SEGS
                )
                _burn(out, burnt, ids[hits], all_touched=False)
                _burn(out, pixels[drawn], ids[hits][drawn], all_touched=True)
                return out

            yield read


def _to_pixels(geometries: np.ndarray, transform: Affine) -> np.ndarray:
    """Geometries in the coordinates of the pixel grid of ``transform`` (x = column)."""
    inverse = ~transform

    def to_pixel(coords: np.ndarray) -> np.ndarray:
        cols, rows = inverse * (coords[:, 0], coords[:, 1])
        return np.column_stack([cols, rows])

    return shapely.transform(geometries, to_pixel)


def _burn(out: np.ndarray, geometries: np.ndarray, ids: np.ndarray, all_touched: bool) -> None:
    """Burn geometries in pixel coordinates into ``out`` in order (later over earlier)."""
    keep = ~shapely.is_empty(geometries)
    if not keep.any():
        return
    rasterize(
        zip(geometries[keep], ids[keep].tolist(), strict=True),
        out=out,
        transform=Affine.identity(),
        all_touched=all_touched,
    )


def open_sparse_labels(
    path: str,
    class_field: str | None = None,
    class_value: int | None = None,
    buffer: float | None = None,
) -> LabelSource:
    """Open a label source for ``geoseg tile --sparse``.

    Vector files give :class:`SparseVectorLabels`. A label raster is taken as already
    sparse: its unlabelled pixels must be its nodata value or the ignore index.

    Raises:
        UsageError: ``buffer`` with a label raster.
    """
    if is_vector_path(path):
        return SparseVectorLabels(path, class_field, class_value, buffer)
    if buffer is not None:
        raise UsageError(f"--buffer applies to vector labels; {path} is a label raster")
    return RasterLabels(path)


def open_tile_labels(
    paths: list[str],
    class_field: str | None,
    class_value: int | None,
    sparse: bool,
    buffer: float | None,
) -> list[LabelSource]:
    """The label sources of ``geoseg tile``: sparse (:func:`open_sparse_labels`) or dense.

    Raises:
        UsageError: ``buffer`` without ``sparse`` or with a label raster, or a class field
            or value without a vector file.
    """
    if sparse:
        sources = [open_sparse_labels(p, class_field, class_value, buffer) for p in paths]
    elif buffer is not None:
        raise UsageError("--buffer applies to sparse labels; add --sparse")
    else:
        sources = [open_labels(p, class_field, class_value) for p in paths]
    if (class_field is not None or class_value is not None) and not any(
        s.kind == "vector" for s in sources
    ):
        raise UsageError("--class-field/--class-value apply to vector labels only")
    return sources
