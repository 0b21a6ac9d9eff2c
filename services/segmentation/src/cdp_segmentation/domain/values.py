"""Moved to `cdp_lang.values` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.values is cdp_lang.values`), private names included.
"""

import sys

import cdp_lang.values

sys.modules[__name__] = cdp_lang.values
