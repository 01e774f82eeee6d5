"""The prompts an edit is measured with besides captions (``edit.prompts``): T-generality's questions on held-out
images of k (docs/method.md, "Editing with the found neurons")."""

from __future__ import annotations

from dataclasses import dataclass

from knexp.settings import SettingError, Text, check_fields


@dataclass(frozen=True)
class Prompts:
    """T-generality's questions (``{a_k}`` is the object's noun phrase, e.g. "a banana") and the rephrased caption
    prompt's prefix."""

    what: str = "What is in this image?"
    rephrased: str = "Describe this picture in one sentence."
    rephrased_prefix: str = "The picture shows"
    yes_no: str = "Is there {a_k} in this image? Answer yes or no."

    def __post_init__(self):
        check_fields(self, "edit.prompts", what=Text(), rephrased=Text(), rephrased_prefix=Text(), yes_no=Text())
        if "{a_k}" not in self.yes_no:
            raise SettingError("edit.prompts.yes_no", self.yes_no,
                               "must hold {a_k}, where the object's noun phrase goes")
