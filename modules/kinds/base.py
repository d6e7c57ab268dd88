"""The reserved task `base`: no module at all."""

from __future__ import annotations

from modules.core.backbone import Backbone
from modules.core.module import BackboneRef, Manifest, Strict, TaskModule


class NoModule(TaskModule):
    """The reserved task `base`: the backbone alone, through its chat template when it has one."""

    kind = "base"
    Config = Strict

    def __init__(self, backbone: Backbone):
        manifest = Manifest(kind="base", backbone=BackboneRef.of(backbone),
                            chat=backbone.tokenizer.chat_template is not None,
                            description="The frozen backbone with no task module.")
        super().__init__(manifest, Strict(), backbone)
