"""Loading a Qwen-VL-style processor where torchvision cannot be installed (beside torch 2.13 cpu).

transformers builds these processors with a video processor that needs torchvision; without it
``AutoProcessor.from_pretrained`` raises ImportError for a real model id and a tiny local checkpoint alike.
:func:`load_image_text_processor` then assembles the same processor class image-only from the folder's tokenizer
and image processor (no video support; images behave the same). Used by the transformers judge engine and by the
Qwen-Image-Edit policy (whose text encoder is a Qwen2.5-VL).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_image_text_processor(model: str | Path, subfolder: str = "", processor_class: Any = None) -> Any:
    """``processor_class`` (default: ``AutoProcessor``) ``.from_pretrained(model, subfolder=...)``, or, without
    torchvision, the same class with no video processor.

    The fallback subclasses the processor class with an ``__init__`` taking only ``image_processor``, ``tokenizer``
    and ``chat_template`` (``ProcessorMixin`` derives its sub-processors from that signature) and passes
    ``video_processor=None`` on; the chat template comes from the processor files when present, else the tokenizer.
    The class is the model's processor class from its config when ``processor_class`` is not given.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        return (processor_class or AutoProcessor).from_pretrained(str(model), **kwargs)
    except ImportError as exc:  # the video processor needs torchvision
        log.info("processor needs torchvision (%s); assembling it image-only for %s", str(exc).strip()[:80], model)
    if processor_class is None:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

        processor_class = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(str(model), **kwargs))]
    base = processor_class

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None) -> None:
        base.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
        )

    image_only = type(f"ImageOnly{base.__name__}", (base,), {"__init__": __init__})
    tokenizer = AutoTokenizer.from_pretrained(str(model), **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(str(model), **kwargs)
    try:
        processor_dict, _ = base.get_processor_dict(str(model), **kwargs)
        chat_template = processor_dict.get("chat_template")
    except Exception:  # no processor files: the tokenizer's template is the fallback
        chat_template = None
    return image_only(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template or tokenizer.chat_template
    )
