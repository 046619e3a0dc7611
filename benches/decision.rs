//! Placeholder replaced by the decision-path benches (issue 7).
fn main() {}
