"""A family's processor without its video part: the image processor, the tokenizer and the chat template that the
generic adapter (``knexp.models.adapters.vlm``) reads, from a model folder or from the tests' tiny parts."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from knexp.models.adapters.families import Family


def without_video(processor_class):
    """``processor_class`` built from an image processor and a tokenizer only. A family's video processor needs
    torchvision, which does not load beside knexp's CPU torch, and knexp shows models images only; the chat template is
    rendered as every processor renders it (a family's own ``apply_chat_template`` may read its video settings)."""
    from transformers.processing_utils import ProcessorMixin

    class ImagesOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            processor_class.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                     chat_template=chat_template, **kwargs)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template=chat_template, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = f"{processor_class.__name__}ImagesOnly"
    return ImagesOnly


def load_processor(path: str, fam: Family, overrides: dict | None = None):
    """The family's processor from ``path`` (a folder or a cached hub id): its tokenizer, its image processor and its
    chat template, and the processor's own settings (``processor_config.json``, then ``overrides``), without the video
    part."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file

    cls = getattr(transformers, fam.processor_class)
    if "video_processor" in inspect.signature(cls.__init__).parameters:
        cls = without_video(cls)
    parameters = set(inspect.signature(cls.__init__).parameters)
    allowed = parameters - {"self", "image_processor", "tokenizer", "chat_template", "kwargs"}

    def file(name: str) -> str | None:
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    settings = {**(json.loads(Path(found).read_text()) if (found := file("processor_config.json")) else {}),
                **(overrides or {})}
    template = Path(found).read_text() if (found := file("chat_template.jinja")) else None
    if template is None and (found := file("chat_template.json")):
        template = json.loads(Path(found).read_text()).get("chat_template")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return cls(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
               chat_template=template or tokenizer.chat_template, **{k: v for k, v in settings.items() if k in allowed})
