# Re-exports migjax/configs/gsm8k_qwen.py (`--config=gsm8k_qwen` or `--config=configs/gsm8k_qwen.py`).
from migjax.configs.gsm8k_qwen import __doc__, get_config  # noqa: F401
