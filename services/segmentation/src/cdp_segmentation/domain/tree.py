"""Moved to `cdp_lang.tree` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.tree is cdp_lang.tree`), private names included.
"""

import sys

import cdp_lang.tree

sys.modules[__name__] = cdp_lang.tree
