"""Moved to `cdp_lang.nodes` (the language is shared with orchestration); this name stays so existing imports work.

The module object is the same one (`cdp_segmentation.domain.nodes is cdp_lang.nodes`), private names included.
"""

import sys

import cdp_lang.nodes

sys.modules[__name__] = cdp_lang.nodes
