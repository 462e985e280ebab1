# Re-exports migjax/configs/gemma3_gsm8k.py (`--config=gemma3_gsm8k` or `--config=configs/gemma3_gsm8k.py`).
from migjax.configs.gemma3_gsm8k import __doc__, get_config  # noqa: F401
