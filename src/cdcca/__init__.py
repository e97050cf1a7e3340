"""cdcca: cloud-device collaborative continual adaptation for multimodal LLMs."""

__version__ = "0.1.0"
