# Re-exports migjax/configs/math_qwen.py (`--config=math_qwen` or `--config=configs/math_qwen.py`).
from migjax.configs.math_qwen import __doc__, get_config  # noqa: F401
