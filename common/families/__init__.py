"""Editor families: the family interface and registry (``base``), the flow sampler math (``flow``), one module per
editor (``flux_kontext``; ``qwen_image_edit`` with the pipeline computations it reproduces in ``qwen_image_edit_ops``;
``ddim`` for InstructPix2Pix; ``ar`` for Emu3-style token editors and its vLLM engine ``ar_vllm``), and the tiny
random-weight checkpoint builders (``tiny/``)."""
