"""Row-local filters, one stage per module: each drops records by a rule and
names the rule as the drop reason (DataTrove's ``filters/`` layout)."""

from gristmill.selectors.filters.gopher_quality import GopherFilter
from gristmill.selectors.filters.length import LengthFilter

__all__ = ["GopherFilter", "LengthFilter"]
