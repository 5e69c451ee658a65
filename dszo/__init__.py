"""dszo: distributed zeroth-order fine-tuning of LLMs on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
