"""Kind `template`: no weights, just a template (and label verbalizers): zero-shot tasks.

Useful on its own (a classifier by verbalizers) and as the zero-shot baseline of a trained kind
with the same template and labels.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from modules.core.module import TaskModule


class TemplateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TemplateModule(TaskModule):
    kind = "template"
    Config = TemplateConfig
