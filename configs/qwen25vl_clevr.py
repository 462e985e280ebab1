# Re-exports migjax/configs/qwen25vl_clevr.py (`--config=qwen25vl_clevr` or `--config=configs/qwen25vl_clevr.py`).
from migjax.configs.qwen25vl_clevr import __doc__, get_config  # noqa: F401
