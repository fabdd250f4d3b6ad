"""``instructblip-train``: train any stage from a Hydra experiment, e.g. ``instructblip-train experiment=smoke``.

Config errors (an unknown group option, a wrong type, an impossible combination) and the project's own errors are
printed as one line on stderr with exit status 2 (``HYDRA_FULL_ERROR=1`` shows the traceback instead).
"""

from __future__ import annotations

import os
import sys

from instructblip.train.validate import CONF_DIR


def _fail(message: str) -> None:
    print(f"instructblip-train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from instructblip.errors import InstructBlipError
    from instructblip.train.validate import check_overrides

    os.environ.setdefault("INSTRUCTBLIP_ROOT", str(CONF_DIR.parent))
    full_errors = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        check_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except InstructBlipError as error:
        _fail(str(error))

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
    def run(cfg: DictConfig) -> float | None:
        from instructblip.train.run import train

        try:
            metrics = train(cfg)
        except (InstructBlipError, OSError) as error:
            if full_errors:
                raise
            _fail(str(error))
        return metrics.get(cfg.get("optimized_metric") or "", None)

    run()


if __name__ == "__main__":
    main()
