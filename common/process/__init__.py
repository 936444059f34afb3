"""Process setup and lifetimes: threads and the allocator chosen before a framework loads, and child
processes that never outlive their job."""
