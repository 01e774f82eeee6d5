"""Tiny random models of the real classes, for tests: knexp's own model shapes and LLaVA (``tiny_models``) and every
Hugging Face family of the adapters' table (``tiny_vlm``). Their captions are noise; their structure is real."""
