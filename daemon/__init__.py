"""polymorphd runtime: everything here must import without torch."""
