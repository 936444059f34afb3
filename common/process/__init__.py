"""Process setup before a framework loads: threads (and later the allocator)."""
