# Re-exports migjax/configs/scenes_tiny.py (`--config=scenes_tiny` or `--config=configs/scenes_tiny.py`).
from migjax.configs.scenes_tiny import __doc__, get_config  # noqa: F401
