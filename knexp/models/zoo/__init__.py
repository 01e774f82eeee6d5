"""Model builders and their loaders: the embedded MLLM built from offline PyPI packages (``embedded``, its weight
sources in ``offline``) and MiniGPT-4 (``minigpt4``)."""
