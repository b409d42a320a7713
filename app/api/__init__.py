"""HTTP layer: one blueprint per API surface."""
