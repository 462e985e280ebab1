# Re-exports migjax/configs/smollm2_gsm8k.py (`--config=smollm2_gsm8k` or `--config=configs/smollm2_gsm8k.py`).
from migjax.configs.smollm2_gsm8k import __doc__, get_config  # noqa: F401
