"""``python -m geoseg_cli``: the ``geoseg`` command (e.g. ``torchrun -m geoseg_cli train``)."""

from geoseg_cli.cli import main

if __name__ == "__main__":
    main()
