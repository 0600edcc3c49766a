"""A trained backbone in the formats its users load: transformers (`hf.py`), timm (`timm_format.py`), the official
`.pth` and this project's safetensors (`formats.py` writes any of them), with a model card (`card.py`)."""
