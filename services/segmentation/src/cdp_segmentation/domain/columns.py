"""Moved to `cdp_lang.columns` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.columns is cdp_lang.columns`), private names included.
"""

import sys

import cdp_lang.columns

sys.modules[__name__] = cdp_lang.columns
