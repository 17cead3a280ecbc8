//! Placeholder replaced by the performance work.
fn main() {}
