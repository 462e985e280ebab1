"""The configs ship inside the package (migjax/configs/); these files re-export them so that
`--config=configs/NAME.py[:variant]` and `from configs.NAME import ...` keep working."""
