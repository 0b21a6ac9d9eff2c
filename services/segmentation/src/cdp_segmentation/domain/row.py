"""Moved to `cdp_lang.row` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.row is cdp_lang.row`), private names included.
"""

import sys

import cdp_lang.row

sys.modules[__name__] = cdp_lang.row
