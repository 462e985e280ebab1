# Re-exports migjax/configs/arith_tiny.py (`--config=arith_tiny` or `--config=configs/arith_tiny.py`).
from migjax.configs.arith_tiny import __doc__, get_config  # noqa: F401
