"""Moved to `cdp_lang.text` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.text is cdp_lang.text`); the lexer, parser and
writer live in its siblings (`cdp_lang.text_tokens`, `text_parser`, `text_events`, `text_writer`).
"""

import sys

import cdp_lang.text

sys.modules[__name__] = cdp_lang.text
