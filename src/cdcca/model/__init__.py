"""Models: the frozen vision encoder, the bridge, the device/cloud MLLM pair, prompts and answering.

Owns the weights' shapes and forward passes (``encoder``, ``bridge``, ``llm``, ``mllm``, ``pair``),
how a question becomes tokens (``prompt``) and how a model answers (``answer``). Nothing here knows
about datasets, packets or rounds.
"""
