"""The ``geoseg`` command line: a thin click layer over the geoseg library."""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading

import click

from geoseg_cli import __version__
from geoseg_cli.allocator import keep_freed_memory
from geoseg_cli.errors import GeosegError, Interrupted, UsageError
from geoseg_cli.progress import ProgressLogHandler

log = logging.getLogger("geoseg_cli")

#: command name -> ("module:attribute" of its click command, one-line help for the listing).
COMMANDS = {
    "tile": ("geoseg_cli.cli.tile:tile", "Cut rasters and labels into georeferenced chips."),
    "train": ("geoseg_cli.cli.train:train", "Train an SCG-Net variant on a chips folder."),
    "pretrain": (
        "geoseg_cli.cli.pretrain:pretrain",
        "Pre-train a backbone on unlabelled rasters (self-supervised).",
    ),
    "pseudolabel": (
        "geoseg_cli.cli.pseudolabel:pseudolabel",
        "Complete sparse label chips by graph propagation.",
    ),
    "predict": ("geoseg_cli.cli.predict:predict", "Segment rasters of any size to GeoTIFF."),
    "cluster": ("geoseg_cli.cli.cluster:cluster", "Cluster a scene without labels (SGSeg)."),
    "export": ("geoseg_cli.cli.export:export", "Export a checkpoint (ONNX)."),
    "evaluate": ("geoseg_cli.cli.evaluate:evaluate", "Score a class map against labels."),
    "info": ("geoseg_cli.cli.info:info", "Show what a checkpoint or ONNX model contains."),
    "models": ("geoseg_cli.cli.models:models", "List the SCG-Net variants."),
    "demo": ("geoseg_cli.cli.demo:demo", "Run the whole lifecycle on a generated scene."),
}


class _Formatter(logging.Formatter):
    """Plain messages for INFO, ``LEVEL: message`` for everything else."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno == logging.INFO:
            return message
        return f"{record.levelname.lower()}: {message}"


def configure_logging(verbosity: int) -> None:
    """Send geoseg's logs to stderr at the level chosen by ``-v``/``-q``.

    Args:
        verbosity: -1 for quiet (warnings only), 0 for info, 1+ for debug.
    """
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = ProgressLogHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    for name in ("geoseg_cli", "models"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


class GeosegGroup(click.Group):
    """A click group that loads commands lazily and turns library errors into one line.

    Commands live in one module each and are imported only when used, so ``geoseg --help``
    stays fast and a missing optional dependency only affects the command that needs it.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command name, sorted."""
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """Import a command's module when it is used."""
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands from the table, without importing them."""
        # Listing from the table keeps `geoseg --help` fast: no command module is imported.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in sorted(COMMANDS.items())])

    def invoke(self, ctx: click.Context):
        """Run the command; library errors become one-line click errors.

        Ctrl-C and SIGTERM exit with 128 + the signal number (130, 143), as a shell reports.
        """
        # SIGTERM (kill, a job scheduler's time limit) cleans up as Ctrl-C does
        received = [signal.SIGINT]

        def terminate(signum: int, frame: object) -> None:
            received[0] = signal.Signals(signum)
            raise KeyboardInterrupt

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminate) if main else None
        try:
            return super().invoke(ctx)
        except GeosegError as exc:
            log.debug("traceback:", exc_info=True)
            if isinstance(exc, UsageError):
                raise click.UsageError(str(exc)) from None
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt as exc:
            log.debug("traceback:", exc_info=True)
            kept = str(exc) if isinstance(exc, Interrupted) else "no partial output was kept"
            error = click.ClickException(f"interrupted; {kept}")
            error.exit_code = 128 + received[0]
            raise error from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)"
            ) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


@click.group(cls=GeosegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (debug, tracebacks).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Segment large aerial and satellite rasters with SCG-Net.

    \b
    Lifecycle:
      geoseg tile scene.tif --labels labels.tif -o chips/
      geoseg train chips/ -o run/
      geoseg predict scene.tif --model run/best.pt --tta
      geoseg export onnx run/best.pt -o model.onnx
      geoseg evaluate scene_pred.tif labels.tif
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose > 0
    configure_logging(-1 if quiet else verbose)
    keep_freed_memory()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="geoseg")
