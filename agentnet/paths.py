"""Where things live: the repository's Hydra configs and a run's output directory."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_DIR", "output_dir_of"]

#: The repository's ``configs/`` (an editable install keeps it beside the package).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def output_dir_of(output_dir: str | None) -> Path:
    """A run's output directory: ``output_dir`` if set, else Hydra's run directory, else the cwd."""
    if output_dir:
        return Path(output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path.cwd()
