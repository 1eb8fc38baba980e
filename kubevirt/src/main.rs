//! Placeholder until the hook server lands (issue 17).
fn main() {}
