"""Placeholder removed by the policies work; see issue 2."""
