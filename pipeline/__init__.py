"""finetune-pipeline: collect -> validate -> train -> evaluate -> register, one module per step."""

__version__ = "0.1.0"
