"""Contact sheets and reports."""
