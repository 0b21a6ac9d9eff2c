"""Moved to `cdp_lang.plan` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.plan is cdp_lang.plan`), private names included.
"""

import sys

import cdp_lang.plan

sys.modules[__name__] = cdp_lang.plan
