"""Re-exports migjax/configs/base.py, where every default lives."""

from migjax.configs.base import RETIRED_VARIANTS, VARIANTS, apply_variant, get_config

__all__ = ["RETIRED_VARIANTS", "VARIANTS", "apply_variant", "get_config"]
