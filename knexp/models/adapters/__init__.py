"""Adapters: the only code that knows a model's internals. ``adapter`` is the protocol that methods and evaluation use
(structure, hook sites, prompts, the image span, generation); ``spliced`` serves knexp's own image encoder + projector +
LM models (the embedded model, MiniGPT-4); ``vlm`` serves any Hugging Face image-text family of ``families``' table."""
