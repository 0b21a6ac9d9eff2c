"""Moved to `cdp_lang.vector` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.vector is cdp_lang.vector`), private names included.
"""

import sys

import cdp_lang.vector

sys.modules[__name__] = cdp_lang.vector
