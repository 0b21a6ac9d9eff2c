"""Moved to `cdp_lang.compiler` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.compiler is cdp_lang.compiler`), private names included.
"""

import sys

import cdp_lang.compiler

sys.modules[__name__] = cdp_lang.compiler
